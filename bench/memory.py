"""Memory of the pipeline's compiled functions and of the quickstart, as one JSON object on stdout.

    python -m bench.memory                                  # train-step variants (compile only)
    python -m bench.memory --parts train,score,sample --source embedded
    python -m bench.memory --parts quickstart --run_dir /tmp/qs   # the README command, per-stage RSS

Parts:
* ``train``: ``Learner`` steps on SmolLM2-135M with LoRA (r 8, q/v) at the quickstart's shape (one
  planner + one reflector row of 512 tokens, two models) and the CPU Table 2's IL shape (one planner
  row of 2048), under each memory setting: ``before`` (full [B, T, V] logits, full scores kept for the
  backward), ``head_chunk`` (chunked head + log-prob), and the attention / remat options of
  ``ModelConfig``. For each: XLA's ``memory_analysis()`` (temp / argument / output MB) and compile
  seconds. Compile-only: nothing is executed, so the figures do not depend on the machine's load.
* ``score``: the behaviour scorer at (8 rows x 512) and (1 x 2048).
* ``sample``: the sampler's extension (prefill) at batch 32 / 8 into a 2048-slot cache, default and
  blockwise attention: KV cache MB and temp MB.
* ``executables``: RSS per compiled sampler executable at 2 layers and at the model's depth, what
  releasing them frees, and the seconds to read them back from the persistent cache.
* ``rss``: peak RSS of one LoRA train step (``--rss_batch`` x ``--rss_seq``, default the quickstart's
  1 x 768) in child processes: ours with ``remat`` none and layer, transformers + peft (the
  reference), measured in the same run by ``bench.train``'s memory child.
* ``quickstart``: runs ``experiments.run`` on the quickstart config in a subprocess and reports its
  ``stages.json`` (peak RSS, compile seconds and persistent-cache hits per stage) and the process's
  peak RSS; run it twice with the same ``--cache_dir`` to see the persistent cache hit.

The reference for peak RSS of a training step is the plain-JAX / transformers probes (bench/README.md
lists their figures measured beside these).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np

MB = 2 ** 20


def _analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: round(getattr(m, f"{k}_size_in_bytes") / MB, 1) for k in ("temp", "argument", "output")}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
        out["gflops"] = round(float(cost["flops"]) / 1e9, 1)   # XLA's count: recompute shows here
    return out


def _batch(n: int, T: int, planner_rows: int) -> dict:
    z = lambda dt: np.zeros((n, T), dt)  # noqa: E731
    return dict(tokens_BxT=np.ones((n, T), np.int32), positions_BxT=np.tile(np.arange(T, dtype=np.int32), (n, 1)),
                valid_BxT=np.ones((n, T), bool), loss_mask_BxT=np.ones((n, T), bool), reward_BxT=z(np.float32),
                behaviour_logp_BxT=z(np.float32), behaviour_mask_BxT=z(bool),
                role_B=np.array([0] * planner_rows + [1] * (n - planner_rows), np.int32),
                objective_B=np.zeros(n, np.int32))


TRAIN_SHAPES = {"quickstart_il_2x768": ({"planner": 1, "reflector": 1}, 768),
                "table2_il_1x2048": ({"planner": 1}, 2048)}
# (label, head_chunk, attention, remat)
TRAIN_SETTINGS = (("before", 0, "default", "none"), ("head_chunk", 256, "default", "none"),
                  ("head_chunk+remat_full", 256, "default", "full"),
                  ("head_chunk+blockwise", 256, "blockwise", "none"),
                  ("head_chunk+blockwise+remat_dots", 256, "blockwise", "dots"),
                  ("head_chunk+blockwise+remat_full", 256, "blockwise", "full"),
                  ("head_chunk+remat_layer", 256, "default", "layer"),
                  ("head_chunk+blockwise+remat_layer", 256, "blockwise", "layer"))


def part_train(source: str, settings, shapes) -> dict:
    from retroact_jax import train
    from retroact_jax.models.lora import LoRAConfig
    from retroact_jax.stages import setup as stages
    out = {}
    lcfg = LoRAConfig(rank=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj"))
    for shape in shapes:
        rows, T = TRAIN_SHAPES[shape]
        models, _, _ = stages.load_models(source, multi_agent=True, lora=lcfg, roles=tuple(rows))
        res = {}
        for label, chunk, attn, remat in (s for s in TRAIN_SETTINGS if s[0] in settings):
            learner = train.Learner(models, optimizer=dict(learning_rate=1e-4, total_steps=10),
                                    rows=rows, head_chunk=chunk, memory=dict(attention=attn, remat=remat))
            t0 = time.time()
            compiled = learner.lower(_batch(sum(rows.values()), T, rows.get("planner", 0))).compile()
            res[label] = {**_analysis(compiled), "compile_s": round(time.time() - t0, 1)}
            print(f"[memory] train {shape} {label}: {res[label]}", file=sys.stderr)
            del compiled, learner
        out[shape] = res
        del models
    return out


def part_score(source: str) -> dict:
    from retroact_jax import scoring
    from retroact_jax.stages import setup as stages
    from retroact_jax.models.decoder import set_memory_options
    models, _, _ = stages.load_models(source, roles=("planner",))
    model = models["planner"]
    out = {}
    for remat in ("none",):
        set_memory_options(model, remat=remat)
        from flax import nnx
        gd, st = nnx.split(model)
        for B, T in ((8, 512), (1, 2048)):
            t0 = time.time()
            c = jax.jit(scoring.score_fn, static_argnums=(0, 4)).lower(
                gd, st, np.ones((B, T), np.int32), np.ones((B, T), bool), 128).compile()
            out[f"{B}x{T}"] = {**_analysis(c), "compile_s": round(time.time() - t0, 1)}
            print(f"[memory] score {B}x{T}: {out[f'{B}x{T}']}", file=sys.stderr)
    return out


def part_sample(source: str) -> dict:
    """KV cache bytes and the extension's temp at rollout batch sizes (the CPU Table 2: 16-32 tasks
    in flight), with the full-scores attention and the blockwise one (a prefill of 512 tokens into a
    2048 cache at batch 32 holds [32, 9, 512, 2048] float32 scores = 1.2 GB)."""
    from flax import nnx
    from retroact_jax import sampling
    from retroact_jax.stages import setup as stages
    from retroact_jax.models.decoder import KVCache, set_memory_options
    models, _, cfg = stages.load_models(source, roles=("planner",))
    model = models["planner"]
    out = {}
    for attn in ("default", "blockwise"):
        set_memory_options(model, attention=attn)
        gd, st = nnx.split(model)
        for B, T, S in ((32, 512, 2048), (32, 64, 2048), (8, 512, 2048)):
            cache = jax.eval_shape(lambda: KVCache.init(cfg, B, S))
            args = (cache, jax.ShapeDtypeStruct((B, cfg.vocab_size), np.float32),
                    jax.ShapeDtypeStruct((B, T), np.int32), jax.ShapeDtypeStruct((B, T), bool))
            t0 = time.time()
            c = sampling._extend_jit.lower(gd, st, *args).compile()
            kv_mb = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(cache)) / MB
            key = f"extend_{attn}_B{B}_T{T}_S{S}"
            out[key] = {**_analysis(c), "kv_cache_mb": round(kv_mb, 1), "compile_s": round(time.time() - t0, 1)}
            print(f"[memory] sample {key}: {out[key]}", file=sys.stderr)
    return out


def part_executables(source: str, cache_dir: str) -> dict:
    """RSS held per compiled sampler extension (8 shapes: batch 8 / 4 x chunk 16-128 into 512 slots)
    at 2 layers and at the model's depth (the decoder unrolls its layers: code grows with depth),
    what ``jax.clear_caches`` frees (``metrics.release_compiled``), and the cost of reading them back
    from the persistent compilation cache afterwards (``--compiled_budget_gb`` of experiments.run)."""
    import gc
    import tempfile
    import jax.numpy as jnp
    from flax import nnx
    from retroact_jax import metrics, sampling
    from retroact_jax.stages import setup as stages
    from retroact_jax.models.decoder import Decoder, KVCache
    os.makedirs(cache_dir, exist_ok=True)      # a fresh persistent cache: the first pass compiles
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="executables-", dir=cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    _, _, cfg0 = stages.load_models(source, roles=("planner",))

    def rss():
        gc.collect()
        metrics._release_free_heap()
        return metrics.rss_gb()[0]

    def calls(gd, st, cfg):
        t0 = time.time()
        for B in (8, 4):
            for T in (16, 32, 64, 128):
                out = sampling._extend_jit(gd, st, KVCache.init(cfg, B, 512), jnp.zeros((B, cfg.vocab_size)),
                                           jnp.ones((B, T), jnp.int32), jnp.ones((B, T), bool))
                jax.block_until_ready(out)
                del out
        return time.time() - t0

    out = {}
    for layers in sorted({2, cfg0.num_layers}):
        cfg = cfg0.replace(num_layers=layers)
        gd, st = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
        jax.clear_caches()
        r0 = rss()
        wall = calls(gd, st, cfg)                        # compiles (and writes the persistent cache)
        r1 = rss()
        metrics.release_compiled()
        r2 = rss()
        wall_again = calls(gd, st, cfg)                  # retraced, read back from the cache
        r3 = rss()
        out[f"layers_{layers}"] = {
            "mb_per_executable": round((r1 - r0) * 1000 / 8, 1),
            "freed_by_release_mb": round((r1 - r2) * 1000, 1),
            "compile_s_per_executable": round(wall / 8, 2),
            "reload_s_per_executable": round(wall_again / 8, 2),
            "mb_per_reloaded_executable": round((r3 - r2) * 1000 / 8, 1)}
        print(f"[memory] executables layers={layers}: {out[f'layers_{layers}']}", file=sys.stderr)
        metrics.release_compiled()
    return out


def part_rss(batch: int, seq: int, threads: int) -> dict:
    """Peak RSS of a LoRA train step of ``batch`` x ``seq`` tokens, each in its own child process
    (``bench.train``'s memory child: RSS over the framework's import baseline, first step and
    steady steps): ours with ``remat`` none and layer, and transformers + peft, in the same run."""
    out = {}
    for side, remat in (("ours", "none"), ("ours", "layer"), ("torch", "none")):
        cmd = [sys.executable, "-m", "bench.train", "--_memory_child", f"{side}:lora", "--batch", str(batch),
               "--seq", str(seq), "--threads", str(threads), "--remat", remat]
        r = subprocess.run(cmd, capture_output=True, text=True)
        key = f"{side}_remat_{remat}" if side == "ours" else "transformers"
        out[key] = (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0
                    else {"error": f"child exited {r.returncode}: {r.stderr.strip()[-300:]}"})
        print(f"[memory] rss {key}: {out[key]}", file=sys.stderr)
    return out


def part_quickstart(run_dir: str, cache_dir: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "experiments.run", "--config=experiments/configs/quickstart.py",
           f"--config.run_dir={run_dir}", f"--compilation_cache={cache_dir}", *extra]
    t0, ru0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall, ru1 = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"quickstart failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stages_json = json.loads(open(os.path.join(run_dir, "stages.json")).read())
    # each stage resets the kernel's peak counter (ru_maxrss too): the run's peak is the stages' max
    peak = max(s["peak_rss_gb"] for s in stages_json.values())
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_after": os.getloadavg(),
            "process_peak_rss_gb": round(peak, 2), "stages": stages_json,
            "compile_s": round(sum(s["compile_s"] for s in stages_json.values()), 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="train", help="comma list of train, score, sample, executables, rss, quickstart")
    ap.add_argument("--source", default="embedded", help="model source (tiny-random for a smoke run)")
    ap.add_argument("--settings", default=",".join(s[0] for s in TRAIN_SETTINGS))
    ap.add_argument("--shapes", default=",".join(TRAIN_SHAPES))
    ap.add_argument("--run_dir", default="/tmp/retroact_bench_quickstart")
    ap.add_argument("--cache_dir", default="/tmp/retroact_bench_xla", help="persistent compilation cache")
    ap.add_argument("--quickstart_args", default="", help="extra flags for experiments.run (space separated)")
    ap.add_argument("--rss_batch", type=int, default=1, help="rss part: rows per step")
    ap.add_argument("--rss_seq", type=int, default=768, help="rss part: tokens per row")
    ap.add_argument("--threads", type=int, default=2, help="rss part: cores per child")
    a = ap.parse_args(argv)
    unknown = [s for s in a.settings.split(",") if s not in {t[0] for t in TRAIN_SETTINGS}]
    unknown += [s for s in a.shapes.split(",") if s not in TRAIN_SHAPES]
    if unknown:
        raise SystemExit(f"unknown settings / shapes {unknown}")
    result = {"bench": "memory", "jax": jax.__version__, "loadavg_start": os.getloadavg(),
              "cpus": os.cpu_count(), "source": a.source}
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    for p in parts:
        if p == "train":
            result["train_step"] = part_train(a.source, a.settings.split(","), a.shapes.split(","))
        elif p == "score":
            result["score"] = part_score(a.source)
        elif p == "sample":
            result["sample"] = part_sample(a.source)
        elif p == "executables":
            result["executables"] = part_executables(a.source, a.cache_dir)
        elif p == "rss":
            result["train_step_rss"] = part_rss(a.rss_batch, a.rss_seq, a.threads)
        elif p == "quickstart":
            result["quickstart"] = part_quickstart(a.run_dir, a.cache_dir, a.quickstart_args.split())
        else:
            raise SystemExit(f"unknown part {p!r}: train, score, sample, executables, rss, quickstart")
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
