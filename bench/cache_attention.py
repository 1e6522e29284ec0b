"""Attention over a KV cache: only the key blocks up to the write cursor (``attention.attend_cached``:
``attend_prefix`` for an extension, ``attend_one_prefix`` for a decode step) vs every slot of the
cache (``attend`` with the full [B, T, S] mask, the code before), SmolLM2-135M-Instruct fp32 through
``Sampler``. Prints ONE JSON object.

Each side runs in its own process (the reference side replaces ``attend_cached`` before anything is
traced), alternating A B A B ``--reps`` times; each process times its cases after one warm-up call
(which compiles) and reports the best of two. Cases: an extension of ``b x t`` tokens into a cache of
S slots holding 8 tokens, and a 32-step greedy decode at batch b (1, 8) with 1,000 tokens held, both at
S = 2,048 and 4,096 (an agent's cache is sized for its longest row plus the decode budget, so most
rows leave much of it empty). Both sides' next-token logits are compared on the first case.

    python -m bench.cache_attention [--threads 1] [--reps 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

EXTEND = [(1, 1024, 2048), (1, 1024, 4096), (1, 2048, 4096), (4, 512, 4096)]    # (b, t, S)
DECODE = [(1, 2048), (1, 4096), (8, 2048), (8, 4096)]      # (b, S); batch 8: two 4,096-slot caches = 3 GB


def _side(full: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from retroact_jax import sampling
    from retroact_jax.models import attention, hub
    if full:   # the reference: every query scores every slot of the cache
        attention.attend_cached = lambda impl, q, k, v, mask, full_BxTxS=None, block=512: \
            attention.attend(impl, q, k, v, mask, mask.full(), block)
    model, _, _ = hub.load_pretrained("embedded")
    sampler = sampling.Sampler(model, eos_ids=(), chunk_buckets=(16, 64, 256, 512, 1024, 2048, 4096),
                               length_buckets=(1024, 2048, 4096), batch_buckets=(1, 2, 4, 8, 16))
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(100, 40000, n).tolist()          # noqa: E731
    out = {"extend_tok_s": {}, "decode_ms_step": {}}
    first = None
    for b, t, s_len in EXTEND:
        times = []
        for _ in range(3):
            state = sampler.start([ids(8)] * b, reserve=s_len - 8 - 64)
            assert state.cache.length == s_len, state.cache.length
            jax.block_until_ready(state.last_logits_BxV)
            t0 = time.perf_counter()
            state = sampler.extend(state, [ids(t)] * b, grouped=False)
            logits = np.asarray(jax.block_until_ready(state.last_logits_BxV))
            times.append(time.perf_counter() - t0)
            first = logits if first is None else first
        out["extend_tok_s"][f"{b}x{t}@{s_len}"] = round(b * t / min(times[1:]), 1)
    for b, s_len in DECODE:
        times, state, held = [], None, None                        # free the last case's caches first
        held = sampler.start([ids(1000)] * b, reserve=s_len - 1000 - 64)    # prefilled once
        assert held.cache.length == s_len, held.cache.length
        for _ in range(3):
            state = jax.tree.map(jnp.copy, held)                     # generate donates its state
            jax.block_until_ready(state.last_logits_BxV)
            t0 = time.perf_counter()
            state, _ = sampler.generate(state, None, 32, min_new_tokens=32)
            jax.block_until_ready(state.last_logits_BxV)
            times.append(time.perf_counter() - t0)
        out["decode_ms_step"][f"{b}@{s_len}"] = round(1000 * min(times[1:]) / 32, 1)
        del state, held
    out["first_logits"] = first[0, :4096].tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="pin to this many cores")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--side", choices=("prefix", "full"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    from bench.train import pin_threads
    pin_threads(a.threads)
    if a.side:
        print(json.dumps(_side(a.side == "full")))
        return
    runs = {"prefix": [], "full": []}
    for _ in range(a.reps):
        for side in runs:
            p = subprocess.run([sys.executable, "-m", "bench.cache_attention", "--threads", str(a.threads),
                                "--side", side], capture_output=True, text=True, check=True)
            runs[side].append(json.loads(p.stdout.strip().splitlines()[-1]))
    med = {side: {kind: {case: statistics.median(r[kind][case] for r in rs) for case in rs[0][kind]}
                  for kind in ("extend_tok_s", "decode_ms_step")} for side, rs in runs.items()}
    diff = max(abs(x - y) for x, y in zip(runs["prefix"][0]["first_logits"], runs["full"][0]["first_logits"]))
    print(json.dumps({
        "threads": a.threads, "reps": a.reps, "prefix": med["prefix"], "full_reference": med["full"],
        "extend_speedup": {c: round(med["prefix"]["extend_tok_s"][c] / med["full"]["extend_tok_s"][c], 2)
                           for c in med["prefix"]["extend_tok_s"]},
        "decode_speedup": {c: round(med["full"]["decode_ms_step"][c] / med["prefix"]["decode_ms_step"][c], 2)
                           for c in med["prefix"]["decode_ms_step"]},
        "max_abs_logit_diff_first_case": diff, "loadavg": os.getloadavg()}))


if __name__ == "__main__":
    main()
