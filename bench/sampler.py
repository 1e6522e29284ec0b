"""Decode throughput of our compiled sampler vs transformers' ``generate`` (KV cache), same model
(SmolLM2-135M-Instruct, the embedded weights; ``--random`` for random weights of that shape;
``--model qwen2.5-coder-0.5b-instruct`` another packaged model, models/embedded.py), fp32,
the same thread count on both sides; plus the cost of agent step 1 vs step 20 of a growing episode
with incremental ``extend`` vs a full re-prefill. Prints ONE JSON object.

Method: prompts of 256 random token ids (identical on both sides), 128 new tokens with no early
stop (no eos, no stop mask), greedy. Per batch size the two sides run interleaved A B A B ...;
medians. Prefill is timed apart (ours: ``Sampler.start``; torch: one forward with
``use_cache=True``); decode ms/step = (ours) ``Sampler.generate`` wall time / 128 steps (each writes
one token and computes the next logits), (torch) (``generate`` - prefill) / 127 forwards. Compile
time = first call - steady call. Roofline fractions use docs/benchmarking.md's SmolLM2 fp32 rooflines of
this 2-core CPU (batch 1: 135 tok/s, 8: 909, 32: 927; SmolLM2's shape only: null for other models).
The CPU is shared: note ``loadavg``.

    python -m bench.sampler [--batches 1,8,32] [--reps 3] [--random] [--skip-episode] [--threads N]
                            [--model NAME]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

ROOFLINE_TOK_S = {1: 135.0, 8: 909.0, 32: 927.0}
# one core: batch 1 from the 1-thread read bandwidth (40.8 GB/s), 8 and 32 at half the 2-core figure
ROOFLINE_TOK_S_1T = {1: 75.0, 8: 455.0, 32: 464.0}
PROMPT, NEW = 256, 128


def _model(random_weights: bool, name: str = "embedded"):
    import torch
    import transformers
    from retroact_jax.models import convert, embedded
    from retroact_jax.models.config import ModelConfig
    from retroact_jax.models.decoder import Decoder
    if random_weights:
        cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                          num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5,
                          tie_word_embeddings=True, max_position_embeddings=8192)
        model = Decoder(cfg, rngs=nnx.Rngs(0))
        tensors = convert.to_hf_state_dict(model)
        source = "random weights, SmolLM2-135M shape"
    else:
        cfg, tensors = embedded.load_weights(name)
        model = convert.load_model(cfg, tensors)
        source = f"{embedded.get(name).label} ({name} GGUF, dequantised to fp32)"
    hc = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf().items()
                                              if k not in ("architectures", "torch_dtype")})
    hf = transformers.AutoModelForCausalLM.from_config(hc).eval().float()
    hf.load_state_dict({k: torch.tensor(np.asarray(tensors[k])) for k in tensors}, strict=False)
    hf.tie_weights()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return cfg, model, hf, source


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


SMOLLM2_SHAPE = True      # the rooflines are SmolLM2-135M's (main() clears this for other models)


def _roofline_fraction(tok_s: float, b: int):
    table = ROOFLINE_TOK_S_1T if len(os.sched_getaffinity(0)) == 1 else ROOFLINE_TOK_S
    return round(tok_s / table[b], 3) if SMOLLM2_SHAPE and b in table else None


def bench_batch(sampler, hf, b, reps, rng):
    import torch
    prompts = [rng.integers(3, sampler.cfg.vocab_size, PROMPT).tolist() for _ in range(b)]
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    def ours():
        tp, state = _timed(lambda: jax.block_until_ready(sampler.start(prompts, reserve=NEW)))
        td, (_, out) = _timed(lambda: sampler.generate(state, None, NEW))
        assert out.lengths_B.tolist() == [NEW] * b
        return tp, td

    def theirs():
        with torch.no_grad():
            tp, _ = _timed(lambda: hf(input_ids=ids, attention_mask=mask, use_cache=True))
            tg, out = _timed(lambda: hf.generate(input_ids=ids, attention_mask=mask,
                                                 do_sample=False, max_new_tokens=NEW,
                                                 min_new_tokens=NEW))
        assert out.shape == (b, PROMPT + NEW)
        return tp, tg - tp

    first = ours()
    o, t = [], []
    for _ in range(reps):                       # interleaved A B A B
        o.append(ours())
        t.append(theirs())
    op, od = statistics.median(x[0] for x in o), statistics.median(x[1] for x in o)
    tp, td = statistics.median(x[0] for x in t), statistics.median(x[1] for x in t)
    ours_tok_s, theirs_tok_s = b * NEW / od, b * (NEW - 1) / td
    return {
        "ours": {"decode_tok_s": round(ours_tok_s, 1), "ms_per_step": round(1e3 * od / NEW, 2),
                 "prefill_s": round(op, 3), "compile_s": round(sum(first) - op - od, 2),
                 "roofline_fraction": _roofline_fraction(ours_tok_s, b),
                 "decode_s_runs": [round(x[1], 3) for x in o]},
        "transformers": {"decode_tok_s": round(theirs_tok_s, 1),
                         "ms_per_step": round(1e3 * td / (NEW - 1), 2), "prefill_s": round(tp, 3),
                         "roofline_fraction": _roofline_fraction(theirs_tok_s, b),
                         "decode_s_runs": [round(x[1], 3) for x in t]},
        "ratio_decode": round(ours_tok_s / theirs_tok_s, 2),
    }


def bench_episode(sampler, rng, steps=20, obs=40, gen=20, batch=1):
    """Per-step wall time of a growing episode: (a) extend + generate, (b) full re-prefill of the
    whole history + generate (``Sampler.sample``). Run twice; the second (compiled) run is timed."""
    v = sampler.cfg.vocab_size
    prompt = [rng.integers(3, v, PROMPT).tolist() for _ in range(batch)]
    observations = [[rng.integers(3, v, obs).tolist() for _ in range(batch)] for _ in range(steps)]

    def run_extend():
        state = sampler.start(prompt)
        times = []
        for k in range(steps):
            t0 = time.perf_counter()
            state = sampler.extend(state, observations[k])
            state, out = sampler.generate(state, None, gen)
            times.append(time.perf_counter() - t0)
        return times, int(state.cache.length)

    def run_reprefill():
        hist = [list(p) for p in prompt]
        times = []
        for k in range(steps):
            t0 = time.perf_counter()
            for h, o in zip(hist, observations[k]):
                h.extend(o)
            _, out = sampler.sample(hist, None, gen)
            times.append(time.perf_counter() - t0)
            for h, o in zip(hist, out.tokens_BxN):
                h.extend(o.tolist())
        return times

    cold, _ = run_extend()
    ext, slots = run_extend()
    cold_re = run_reprefill()
    re = run_reprefill()
    return {
        "batch": batch, "observation_tokens": obs, "generated_tokens": gen, "steps": steps,
        "final_cache_slots": slots,
        "extend_step1_s": round(ext[0], 3), "extend_step20_s": round(ext[-1], 3),
        "extend_step20_over_step1": round(ext[-1] / ext[0], 2),
        "extend_steps_s": [round(x, 3) for x in ext],
        "reprefill_step1_s": round(re[0], 3), "reprefill_step20_s": round(re[-1], 3),
        "reprefill_step20_over_step1": round(re[-1] / re[0], 2),
        "reprefill_steps_s": [round(x, 3) for x in re],
        "first_run_compile_and_growth_s": {"extend": round(sum(cold) - sum(ext), 2),
                                           "reprefill": round(sum(cold_re) - sum(re), 2)},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--model", default="embedded", help="a packaged model name (models/embedded.py)")
    ap.add_argument("--skip-episode", action="store_true")
    ap.add_argument("--episode-batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0,
                    help="pin to this many cores (both frameworks); 0 = every usable core")
    args = ap.parse_args()
    if args.threads:
        from bench.train import pin_threads
        pin_threads(args.threads)               # before XLA's CPU client and torch's pool start
    import torch
    from retroact_jax import sampling
    threads = len(os.sched_getaffinity(0))     # XLA's CPU thread pool uses every usable core
    torch.set_num_threads(threads)
    global SMOLLM2_SHAPE
    SMOLLM2_SHAPE = args.random or args.model == "embedded"
    cfg, model, hf, source = _model(args.random, args.model)
    sampler = sampling.Sampler(model, eos_ids=())
    rng = np.random.default_rng(0)
    result = {"bench": "sampler", "model": source, "dtype": "float32",
              "prompt_tokens": PROMPT, "new_tokens": NEW, "reps": args.reps,
              "threads": {"jax_xla_cpu": threads, "torch": torch.get_num_threads()},
              "loadavg_start": os.getloadavg()[0], "batches": {}}
    if not args.skip_episode:
        result["episode"] = bench_episode(sampler, rng, batch=args.episode_batch)
        print(json.dumps({"partial": {"episode": result["episode"]}}), file=sys.stderr, flush=True)
    for b in [int(x) for x in args.batches.split(",")]:
        result["batches"][str(b)] = bench_batch(sampler, hf, b, args.reps, rng)
        print(json.dumps({"partial": {str(b): result["batches"][str(b)]}}), file=sys.stderr,
              flush=True)                       # progress survives an interrupted run
    result["loadavg_end"] = os.getloadavg()[0]
    result["trace_counts"] = dict(sampling.TRACE_COUNTS)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
