"""Uneven cache extensions: ``Sampler.extend`` (long additions in a sub-batch first,
``decode_segments.extend_groups``) vs one whole-batch call (every row padded to the longest
addition's chunk), SmolLM2-135M-Instruct fp32. Prints ONE JSON object.

The case is an agent batch where one episode starts (its whole prompt) or gets a long observation
while the others add a short observation: ``--rows`` rows hold ``--held`` tokens each, then row 0
adds ``--long`` tokens and the others ``--short``. Both sides start from the same prefilled state,
run interleaved A B A B (``--reps``; medians after one warm-up call each, which compiles) and
must give the same next-token logits (max abs difference reported).

    python -m bench.extend [--rows 16] [--held 600] [--long 900] [--short 60] [--reps 3] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--held", type=int, default=600)
    ap.add_argument("--long", type=int, default=900)
    ap.add_argument("--short", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="pin to this many cores (0: all)")
    a = ap.parse_args()
    if a.threads:
        from bench.train import pin_threads
        pin_threads(a.threads)
    import jax
    from retroact_jax import sampling
    from retroact_jax.decode_segments import extend_plan
    from retroact_jax.models import hub

    model, _, _ = hub.load_pretrained("embedded")
    sampler = sampling.Sampler(model, eos_ids=(), chunk_buckets=(16, 64, 256, 1024, 2048, 4096),
                               length_buckets=(1024, 2048, 4096), batch_buckets=(1, 2, 4, 8, 16, 32))
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(100, 40000, n).tolist()          # noqa: E731
    prompts = [ids(a.held) for _ in range(a.rows)]
    new = [ids(a.long)] + [ids(a.short) for _ in range(a.rows - 1)]

    sides = {"one_call": lambda s: sampler.extend(s, new, grouped=False),
             "grouped": lambda s: sampler.extend(s, new)}
    times = {k: [] for k in sides}
    logits = {}
    for rep in range(a.reps + 1):
        for name, fn in sides.items():
            state = sampler.start(prompts, reserve=a.long + 1100)
            jax.block_until_ready(state.last_logits_BxV)
            t0 = time.perf_counter()
            state = fn(state)
            logits[name] = np.asarray(jax.block_until_ready(state.last_logits_BxV))[:a.rows]
            if rep:                                                  # rep 0 compiles
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    plan = extend_plan([len(r) for r in new], sampling.bucket(a.rows, sampler.batch_buckets, "batch"),
                       sampler.batch_buckets, sampler.chunk_buckets)
    print(json.dumps({
        "case": vars(a), "plan": [[r, c] for r, c in plan],
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "speedup_grouped_vs_one_call": round(med["one_call"] / med["grouped"], 2),
        "max_abs_logit_diff": float(np.abs(logits["grouped"] - logits["one_call"]).max()),
        "loadavg": os.getloadavg()}))


if __name__ == "__main__":
    main()
