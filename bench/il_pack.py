"""IL throughput on real rows, packed vs unpacked (issue 11 item 4). Prints ONE JSON object.

    python -m bench.il_pack --measure                 # padding shares only (no model, ~30 s)
    taskset -c 1 python -m bench.il_pack --steps 4    # + timed train steps, SmolLM2 LoRA, 1 thread

Padding (``--measure``; also part of a timed run): the released IL files (``intercode_il``,
``alfworld_il``) and, with ``--hotpotqa``, the HotpotQA gold-expert rows, tokenised as the IL stage
does (SmolLM2 tokenizer, EOS appended, truncated at ``--max-len``), one epoch walked by the IL stage's
own ``il.RoleBatches`` for planner + reflector (``rows`` per role, the step's common bucket of
``--buckets``, a role that ran out of rows contributes filler rows as in the stage). ``pad`` = 1 -
non-pad tokens / computed tokens (B x T per step, filler rows included); ``pad_planner_only`` the
same with the planner alone; ``trained`` = loss-mask tokens (a row's / segment's first token and
prompt tokens excluded).

Timing: SmolLM2-135M (embedded) with LoRA r 8 / alpha 16 / dropout 0.05 on q, v, AdamW, the IL
stage's train-step options (blockwise attention, head chunk 256), planner rows of ``--data`` only
(one model, 1 row per step). The same samples on both sides: the first ``--steps`` packed rows of the
packed epoch (rows of up to ``--max-len`` tokens); side A trains each of their samples as a row of its
own (its bucket), side B the packed rows. Each shape is compiled first (untimed), then A and B
alternate row by row; figures per side: useful (trained) tokens/s and non-pad tokens/s = their
totals / the side's total step time. The load
(``os.getloadavg``) is recorded before and after. ``--max-len`` defaults to 1024: a 1 x 2048 LoRA step
needs ~3.4 GB of XLA temp (bench/README.md), over this machine's per-job budget.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def bucket_of(n: int, buckets) -> int:
    return next(b for b in buckets if b >= n)


def tokenised(name: str, tok, max_len: int):
    """{role: [TokenizedSample]} of a released IL file or ``hotpotqa_gold``."""
    from retroact_jax import batching, released_data
    if name == "hotpotqa_gold":
        from retroact_jax.stages import expert
        pl, rf, _ = expert.expert_il_data("hotpotqa", pathlib.Path(os.environ.get(
            "IL_PACK_EXPERT_DIR", "/tmp/il_pack_expert")), expert.ExpertConfig(progress=False))
        samples = pl + rf
    else:
        samples = released_data.load_retroact(name).samples
    out = {"planner": [], "reflector": []}
    for s in samples:
        out[s.role].append(batching.tokenize_sample(s, tok, eos_id=tok.eos_id))
    return out


def trained_count(ts, max_len: int) -> int:
    from retroact_jax import batching
    return int(batching.trained_mask(ts.kinds[:max_len])[1:].sum())


def pad_share(data, rows: int, buckets, max_len: int, capacity: int, roles) -> dict:
    """One epoch of the IL stage's steps: computed, non-pad and trained tokens."""
    from retroact_jax.stages.il import RoleBatches
    its = {r: RoleBatches([min(len(x), max_len) for x in data[r]], rows, 0, i, 1, capacity)
           for i, r in enumerate(roles)}
    steps = max(it.total for it in its.values())
    computed = nonpad = trained = 0
    for _ in range(steps):
        groups = {r: its[r].next() for r in roles}
        lens = [sum(min(len(data[r][j]), max_len) for j in g) for r in roles for g in groups[r]]
        T = bucket_of(max(lens), buckets)
        computed += T * rows * len(roles)
        nonpad += sum(lens)
        trained += sum(trained_count(data[r][j], max_len) for r in roles for g in groups[r] for j in g)
    return {"steps": steps, "pad": round(1 - nonpad / computed, 4), "trained_per_computed":
            round(trained / computed, 4), "computed_tokens": computed, "nonpad_tokens": nonpad}


def measure(args, tok) -> dict:
    buckets = tuple(b for b in args.buckets if b <= args.max_len) or (args.max_len,)
    names = list(args.measure_data) + (["hotpotqa_gold"] if args.hotpotqa else [])
    out = {}
    for name in names:
        data = tokenised(name, tok, args.max_len)
        fig = {"rows": {r: len(v) for r, v in data.items()},
               "mean_len": {r: round(float(np.mean([min(len(x), args.max_len) for x in v])), 1)
                            for r, v in data.items() if v}}
        for rows in (1, 4):
            for label, cap in (("unpacked", 0), ("packed", args.max_len)):
                fig[f"rows{rows}_{label}"] = pad_share(data, rows, buckets, args.max_len, cap,
                                                       ["planner", "reflector"])
                fig[f"rows{rows}_{label}_planner_only"] = pad_share(data, rows, buckets, args.max_len,
                                                                    cap, ["planner"])
        out[name] = fig
        log(name, json.dumps(fig))
    return out


def timed(args, tok, model) -> dict:
    import jax
    from flax import nnx
    from retroact_jax import losses, train
    from retroact_jax.models import lora
    from retroact_jax.stages.il import RoleBatches
    buckets = tuple(b for b in args.buckets if b <= args.max_len) or (args.max_len,)
    lora.apply_lora(model, lora.LoRAConfig(rank=8, alpha=16, dropout=0.05,
                                           target_modules=("q_proj", "v_proj")), nnx.Rngs(params=0, dropout=1))
    learner = train.Learner({"planner": model}, optimizer={"name": "adamw", "learning_rate": 1e-4,
                                                           "kwargs": {"weight_decay": 0.0}},
                            loss=losses.LossConfig(il_normalization="tokens"), rows={"planner": 1},
                            head_chunk=256, memory={"attention": "blockwise", "remat": "none"})
    rows = tokenised(args.data, tok, args.max_len)["planner"]
    lens = [min(len(x), args.max_len) for x in rows]
    # the same samples on both sides: the first --steps packed rows of the epoch; unpacked, each of
    # their samples is a step of its own
    it = RoleBatches(lens, 1, 0, 0, 1, args.max_len)
    packed = [it.next() for _ in range(args.steps)]
    plans = {"unpacked": [[[[j]] for g in st for j in g] for st in packed], "packed": [[st] for st in packed]}
    sides = {}
    for label, groups in plans.items():   # groups[i] = the steps standing for packed row i
        arrays = [[train.collate_step({"planner": [[rows[j] for j in g] for g in st]}, {"planner": 1},
                                      buckets, 0, max_len=args.max_len)[0] for st in steps] for steps in groups]
        flat = [a for x in arrays for a in x]
        sides[label] = {"arrays": arrays, "times": [], "trained": sum(int(a["loss_mask_BxT"].sum()) for a in flat),
                        "nonpad": sum(int(a["lengths_B"].sum()) for a in flat),
                        "T": [int(a["tokens_BxT"].shape[1]) for a in flat], "n_steps": len(flat)}
    compile_s = {}
    for label, s in sides.items():                     # compile every shape first (untimed)
        for a in [a for x in s["arrays"] for a in x]:
            T = a["tokens_BxT"].shape[1]
            if T not in compile_s:
                t = time.perf_counter()
                jax.block_until_ready(learner.step(a)["loss"])
                compile_s[T] = round(time.perf_counter() - t, 1)
                log(f"compiled T={T}: {compile_s[T]} s")
    for i in range(args.steps):                         # interleaved: row i unpacked, row i packed
        for label, s in sides.items():
            t = time.perf_counter()
            for a in s["arrays"][i]:
                float(learner.step(a)["loss"])
            s["times"].append(time.perf_counter() - t)
            log(f"{label} row {i}: {len(s['arrays'][i])} steps, {s['times'][-1]:.2f} s")
    out = {"compile_s": compile_s}
    for label, s in sides.items():
        total = sum(s["times"])
        out[label] = {"steps": s["n_steps"], "seconds": round(total, 2), "T": s["T"],
                      "trained_tok_s": round(s["trained"] / total, 1),
                      "nonpad_tok_s": round(s["nonpad"] / total, 1),
                      "computed_tok_s": round(sum(s["T"]) / total, 1),
                      "pad": round(1 - s["nonpad"] / sum(s["T"]), 4)}
    out["packed_over_unpacked_trained_tok_s"] = round(out["packed"]["trained_tok_s"] /
                                                      out["unpacked"]["trained_tok_s"], 3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", action="store_true", help="padding shares only (no model, no timing)")
    ap.add_argument("--hotpotqa", action=argparse.BooleanOptionalAction, default=True,
                    help="padding of the HotpotQA gold-expert rows too (runs the gold expert, ~15 s)")
    ap.add_argument("--measure-data", nargs="*", default=["intercode_il", "alfworld_il"])
    ap.add_argument("--data", default="intercode_il", help="released IL file of the timed steps")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side")
    ap.add_argument("--max-len", type=int, default=1024, help="truncation = packed row length")
    ap.add_argument("--buckets", type=lambda s: tuple(int(x) for x in s.split(",")), default=(256, 512, 1024, 2048))
    args = ap.parse_args(argv)
    load = {"before": os.getloadavg()}
    from retroact_jax.models import embedded
    tok = embedded.load_tokenizer()
    result = {"args": vars(args), "affinity": sorted(os.sched_getaffinity(0)), "padding": measure(args, tok)}
    if not args.measure:
        from retroact_jax.models import hub
        model, _, _ = hub.load_pretrained("embedded")
        result["timing"] = timed(args, tok, model)
    load["after"] = os.getloadavg()
    result["load"] = load
    print(json.dumps(result))


if __name__ == "__main__":
    main()
