"""Training throughput: our jitted joint train step (``train.Learner``) vs a transformers-on-PyTorch
training step on the same model, same batch, fp32, AdamW with the same hyperparameters, the same
thread count, in the same run. Full fine-tuning and LoRA (r=8, alpha=16, dropout 0.05, q_proj+v_proj).
Prints ONE JSON object on stdout (progress goes to stderr).

    python -m bench.train                       # SmolLM2-135M-Instruct, 4 x 256, full + LoRA
    python -m bench.train --tiny --steps 3      # tiny random config: a smoke run in seconds
    python -m bench.train --modes lora --threads 1 --no-profile --no-memory

Method
- Model: ours ``hub.load_pretrained("embedded")``; torch ``AutoModelForCausalLM.from_pretrained(dir,
  gguf_file=...)`` of the same GGUF (``models.embedded.gguf_path``), float32. ``--tiny``: a random
  ``config.tiny`` Decoder, written as an HF directory and loaded by transformers (same weights).
- Batch: ``--batch`` rows of ``--seq`` seeded random token ids, one IL planner sample per row through
  ``train.collate_step``; every token but a row's first is trained, so our IL loss with
  ``il_normalization="tokens"`` is exactly HF's shifted cross-entropy mean over B*(T-1) tokens (the
  first losses of both sides are reported: they must agree). Tokens/s counts B*T tokens per step.
- Optimizer: AdamW lr 1e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0.01, global-norm clip 1.0, on
  both sides (ours via ``optim.make_optimizer``; torch ``torch.optim.AdamW`` + ``clip_grad_norm_``).
- LoRA: ours ``models.lora.apply_lora``; torch ``peft.get_peft_model`` with the same LoraConfig.
  Only adapters train on both sides.
- Threads: the process is pinned to ``--threads`` cores (``sched_setaffinity``, which also sizes XLA's
  thread pool) and ``torch.set_num_threads(--threads)``; with 1 thread XLA's Eigen pool is turned off.
- Timing: per mode, one warm-up step each (ours: compile + run), then ``--steps`` steps interleaved
  ours, torch, ours, torch...; medians and min. ``compile_s`` = first step - median step.
  Load time (weights -> model -> optimizer state) is reported apart.
- Roofline: 6*N FLOPs per token (N = all parameters incl. the tied embedding) at the FMA peak of
  docs/benchmarking.md (550 GFLOP/s on 2 threads, 273 on 1); LoRA also against 4*N (no weight gradients).
- Memory (``--memory``, default on): each side and mode in its own child process, so one side's
  allocations cannot hide in the other's: RSS after importing its framework is the baseline, then
  the RSS delta after loading, the peak delta during the first step (compile for ours) and during
  the steady steps (``/proc/self/clear_refs`` resets the peak between phases).
- Profile (``--profile``, default on; ours only, torch's phases are timed inside every step): jitted
  forward loss, forward+backward (``jax.grad``), and the same with the CE-only log-prob (no entropy),
  built from the Learner's own ``_logp``; backward = grad - forward, optimizer = step - grad.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

FMA_PEAK = {1: 273e9, 2: 550e9}            # docs/benchmarking.md, fp32 FLOP/s on this CPU
LR, BETAS, EPS, WD, CLIP = 1e-5, (0.9, 0.999), 1e-8, 0.01, 1.0
LORA = dict(rank=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ process
def pin_threads(n: int) -> None:
    """Pin this process to n cores before jax/torch start their pools."""
    cpus = sorted(os.sched_getaffinity(0))
    if n > len(cpus):
        raise SystemExit(f"--threads {n} but only {len(cpus)} cores are available")
    os.sched_setaffinity(0, cpus[:n])
    if n == 1:
        # (no bare "intra_op_parallelism_threads=1" here: XLA stops parsing XLA_FLAGS at a token
        # without "--", silently dropping every flag after it)
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _median(xs):
    return round(statistics.median(xs), 4) if xs else None


# ------------------------------------------------------------------------------------------- models
def make_ids(vocab: int, B: int, T: int, seed: int = 0):
    """Seeded random token ids [B, T] (int64, what torch takes); ids 0..2 (pad, bos, eos) avoided."""
    import numpy as np
    return np.random.default_rng(seed).integers(3, vocab, size=(B, T)).astype(np.int64)


def make_batch(vocab: int, B: int, T: int, seed: int = 0):
    """(our step arrays from collate_step, token ids [B, T] int64 for torch)."""
    import numpy as np
    from retroact_jax import batching, train
    ids = make_ids(vocab, B, T, seed).astype(np.int32)
    samples = []
    for row in ids:
        s = batching.Sample("planner", (("generated", "x"),), objective="il")
        samples.append(batching.TokenizedSample(
            s, row.copy(), np.full(T, batching.KIND_GENERATED, np.int8),
            np.zeros(T, np.float32), np.zeros(T, bool)))
    arrays, _ = train.collate_step({"planner": samples}, {"planner": B}, buckets=(T,), pad_id=0)
    assert arrays["loss_mask_BxT"].sum() == B * (T - 1)
    return arrays, ids.astype(np.int64)


def tiny_weights_dir(tmp: str):
    """A tiny random Decoder written as an HF directory: (our model, dir) with the same weights."""
    from flax import nnx
    from retroact_jax.models import safetensors_io as sio
    from retroact_jax.models.config import tiny
    from retroact_jax.models.convert import to_hf_state_dict
    from retroact_jax.models.decoder import Decoder
    cfg = tiny(vocab_size=2048, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
               num_kv_heads=2, head_dim=32)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    sio.write_hf_dir(tmp, cfg, to_hf_state_dict(model))
    return model, cfg


class Ours:
    """Our Learner on the model; ``step()`` runs one blocking update."""

    def __init__(self, args, mode: str, tmp: str | None):
        import jax
        from flax import nnx
        from retroact_jax import losses, train
        from retroact_jax.models import lora
        t = time.perf_counter()
        if args.tiny:
            self.model, self.cfg = tiny_weights_dir(tmp) if tmp else (None, None)
        else:
            from retroact_jax.models import hub
            self.model, _, self.cfg = hub.load_pretrained("embedded")
        if mode == "lora":
            lora.apply_lora(self.model, lora.LoRAConfig(rank=LORA["rank"], alpha=LORA["alpha"],
                                                        dropout=LORA["dropout"],
                                                        target_modules=LORA["targets"]),
                            nnx.Rngs(params=0, dropout=1))
        opt = {"name": "adamw", "learning_rate": LR, "schedule": "constant", "grad_clip_norm": CLIP,
               "kwargs": {"b1": BETAS[0], "b2": BETAS[1], "eps": EPS, "weight_decay": WD}}
        self.loss_cfg = losses.LossConfig(il_normalization="tokens", il_coef=1.0)
        self.learner = train.Learner({"planner": self.model}, optimizer=opt, loss=self.loss_cfg,
                                     rows={"planner": args.batch},
                                     memory={"remat": getattr(args, "remat", "none")})
        jax.block_until_ready(self.learner.state)
        self.load_s = time.perf_counter() - t
        self.n_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))
        self.n_trainable = sum(int(x.size) for x in jax.tree.leaves(self.learner.state["params"]))

    def step(self, arrays) -> float:
        m = self.learner.step(arrays)
        return float(m["loss"])        # blocks until the step is done

    def profile(self, arrays, reps: int) -> dict:
        """Forward / forward+backward timings of the same loss, and the CE-only variant."""
        import jax
        from retroact_jax import losses
        L = self.learner
        batch = {k: jax.numpy.asarray(v) for k, v in arrays.items() if k in
                 ("tokens_BxT", "positions_BxT", "valid_BxT", "loss_mask_BxT", "reward_BxT",
                  "behaviour_logp_BxT", "behaviour_mask_BxT", "role_B", "objective_B")}
        name = L.names[0]

        def loss(params, state, frozen, with_entropy):
            if with_entropy:
                logp, ent, _ = L._logp(params, state["rngs"], frozen, batch)
                return losses.joint_loss(logp, ent, batch, self.loss_cfg)[0]
            from flax import nnx
            part = L._parts[name]
            model = nnx.merge(part.graphdef, params[name], jax.tree.map(lambda x: x, state["rngs"][name]),
                              frozen[name])
            logits, _ = model(batch["tokens_BxT"], batch["positions_BxT"], batch["valid_BxT"])
            logp = losses.token_logprobs(logits, batch["tokens_BxT"])
            return losses.il_loss(logp, batch["loss_mask_BxT"], batch["valid_BxT"])

        out = {}
        for label, ent in (("", True), ("_ce_only", False)):
            fns = {f"forward{label}": jax.jit(lambda p, s, f, e=ent: loss(p, s, f, e)),
                   f"grad{label}": jax.jit(jax.grad(lambda p, s, f, e=ent: loss(p, s, f, e)))}
            for k, fn in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(fn(L.state["params"], L.state, L._frozen))
                first = time.perf_counter() - t
                ts = []
                for _ in range(reps):
                    t = time.perf_counter()
                    jax.block_until_ready(fn(L.state["params"], L.state, L._frozen))
                    ts.append(time.perf_counter() - t)
                out[f"{k}_s"] = _median(ts)
                out[f"{k}_compile_s"] = round(first - statistics.median(ts), 2)
                log(f"  profile ours {k}: {out[f'{k}_s']} s")
        out["trace"] = self.trace(arrays)
        return out

    def trace(self, arrays, top: int = 12) -> dict:
        """One step under ``jax.profiler``: thunk time by category (summed over XLA's threads)."""
        import collections
        import glob
        import gzip
        import jax
        with tempfile.TemporaryDirectory() as d:
            jax.profiler.start_trace(d)
            t = time.perf_counter()
            self.step(arrays)
            wall = time.perf_counter() - t
            jax.profiler.stop_trace()
            files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
            if not files:
                return {"error": "jax.profiler wrote no trace"}
            with gzip.open(files[0]) as f:
                events = json.load(f)["traceEvents"]
        ops = collections.Counter()
        for e in events:
            name = e.get("name", "")
            if e.get("ph") == "X" and not name.startswith(("$", "ThunkExecutor", "Pjit", "Common",
                                                            "np.", "Parse")):
                ops[name] += e.get("dur", 0) / 1e6
        cats = collections.Counter()
        for name, s in ops.items():
            cats[_op_category(name)] += s
        return {"step_wall_s": round(wall, 3), "thunk_s_by_category": {k: round(v, 3) for k, v in
                                                                       cats.most_common()},
                "top_ops_s": {k: round(v, 3) for k, v in ops.most_common(top)}}


def _op_category(name: str) -> str:
    """Coarse kind of an XLA:CPU thunk from its name (fusion names list their fused ops)."""
    if name.startswith(("dot", "ynn_fusion")) or "onednn" in name or "matmul" in name:
        return "matmul (dot / ynn_fusion)"
    if "scatter" in name or "gather" in name:
        return "gather/scatter"
    if name.startswith(("copy", "transpose")) or "transpose" in name:
        return "layout copies (copy*/transpose)"
    if "reduce" in name or "exponential" in name or "log" in name:
        return "reductions / softmax"
    return "other elementwise fusions"


class Theirs:
    """transformers LlamaForCausalLM on torch (+ peft LoRA); ``step()`` runs one update, phases timed."""

    def __init__(self, args, mode: str, tmp: str | None):
        import torch
        import transformers
        t = time.perf_counter()
        if args.tiny:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        else:
            from retroact_jax.models import embedded
            g = embedded.gguf_path()
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                str(g.parent), gguf_file=g.name, dtype=torch.float32)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        if mode == "lora":
            import peft
            self.model = peft.get_peft_model(self.model, peft.LoraConfig(
                r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                target_modules=list(LORA["targets"]), bias="none", task_type="CAUSAL_LM"))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        self.load_s = time.perf_counter() - t
        self.phases: dict[str, list[float]] = {"forward_s": [], "backward_s": [], "optimizer_s": []}

    def step(self, ids) -> float:
        import torch
        x = torch.from_numpy(ids)
        t0 = time.perf_counter()
        out = self.model(input_ids=x, attention_mask=torch.ones_like(x), labels=x)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        for k, v in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2)):
            self.phases[k].append(v)
        return float(out.loss)


# ---------------------------------------------------------------------------------------- per mode
def roofline(tok_s, n_params, threads, flops_per_param=6):
    return round(tok_s * flops_per_param * n_params / FMA_PEAK.get(threads, threads * 275e9), 4)


def side_figures(times, first, load_s, tokens, n_params, n_trainable, threads, lora):
    med = statistics.median(times)
    tok_s = tokens / med
    d = {"step_s_median": round(med, 4), "step_s_min": round(min(times), 4),
         "tokens_per_s": round(tok_s, 2), "first_step_s": round(first, 2),
         "compile_s": round(first - med, 2), "load_s": round(load_s, 2),
         "params": n_params, "trainable_params": n_trainable,
         "roofline_fraction_6N": roofline(tok_s, n_params, threads)}
    if lora:
        d["roofline_fraction_4N"] = roofline(tok_s, n_params, threads, 4)
    return d


def run_mode(args, mode: str) -> dict:
    import gc
    with tempfile.TemporaryDirectory() as tmp:
        log(f"[{mode}] loading ours")
        ours = Ours(args, mode, tmp)
        log(f"[{mode}] loaded ours in {ours.load_s:.1f} s; loading torch")
        theirs = Theirs(args, mode, tmp)
        log(f"[{mode}] loaded torch in {theirs.load_s:.1f} s")
    arrays, ids = make_batch(ours.cfg.vocab_size, args.batch, args.seq)
    t = time.perf_counter()
    loss0_ours = ours.step(arrays)
    first_ours = time.perf_counter() - t
    t = time.perf_counter()
    loss0_theirs = theirs.step(ids)
    first_theirs = time.perf_counter() - t
    for v in theirs.phases.values():
        v.clear()
    log(f"[{mode}] first steps: ours {first_ours:.2f} s (loss {loss0_ours:.5f}), "
        f"torch {first_theirs:.2f} s (loss {loss0_theirs:.5f})")
    t_ours, t_theirs, losses_ours, losses_theirs = [], [], [], []
    cpu_ours, cpu_theirs = [], []
    load_before = os.getloadavg()[0]
    for i in range(args.steps):
        c, t = time.process_time(), time.perf_counter()
        losses_ours.append(ours.step(arrays))
        t_ours.append(time.perf_counter() - t)
        cpu_ours.append(time.process_time() - c)
        c, t = time.process_time(), time.perf_counter()
        losses_theirs.append(theirs.step(ids))
        t_theirs.append(time.perf_counter() - t)
        cpu_theirs.append(time.process_time() - c)
        log(f"[{mode}] step {i}: ours {t_ours[-1]:.3f} s (cpu {cpu_ours[-1]:.1f}), "
            f"torch {t_theirs[-1]:.3f} s (cpu {cpu_theirs[-1]:.1f})")
    tokens = args.batch * args.seq
    o = side_figures(t_ours, first_ours, ours.load_s, tokens, ours.n_params, ours.n_trainable,
                     args.threads, mode == "lora")
    th = side_figures(t_theirs, first_theirs, theirs.load_s, tokens, theirs.n_params,
                      theirs.n_trainable, args.threads, mode == "lora")
    th["phases"] = {k: _median(v) for k, v in theirs.phases.items()}
    # CPU seconds of the process during the step: less sensitive to other processes than wall time
    # (torch's OpenMP threads spin while waiting, which counts here too)
    o["cpu_s_median"], th["cpu_s_median"] = _median(cpu_ours), _median(cpu_theirs)
    o["losses"] = [round(loss0_ours, 5)] + [round(x, 5) for x in losses_ours]
    th["losses"] = [round(loss0_theirs, 5)] + [round(x, 5) for x in losses_theirs]
    res = {"ours": o, "torch": th, "ratio_ours_over_torch": round(o["tokens_per_s"] / th["tokens_per_s"], 3),
           "first_loss_abs_diff": round(abs(loss0_ours - loss0_theirs), 6),
           "loadavg_1min_timed_steps": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if args.profile:
        log(f"[{mode}] profiling ours")
        p = ours.profile(arrays, max(2, min(args.steps, 3)))
        step = o["step_s_median"]
        p["backward_s"] = round(p["grad_s"] - p["forward_s"], 4)
        p["optimizer_and_update_s"] = round(step - p["grad_s"], 4)
        p["entropy_cost_s"] = round(p["grad_s"] - p["grad_ce_only_s"], 4)
        o["phases"] = p
    del ours, theirs
    gc.collect()
    return res


# ------------------------------------------------------------------------------------------ memory
def memory_child(args, side: str, mode: str) -> dict:
    """In a fresh process: RSS deltas over the baseline after importing the side's framework."""
    tmp = tempfile.TemporaryDirectory()
    if side == "ours":
        import jax  # noqa: F401
        import retroact_jax.train  # noqa: F401
        import retroact_jax.models.hub  # noqa: F401
        import retroact_jax.models.lora  # noqa: F401
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import retroact_jax.models.embedded  # noqa: F401
        if mode == "lora":
            import peft  # noqa: F401
        if args.tiny:      # written before the baseline (it builds the model with jax)
            tiny_weights_dir(tmp.name)
    import gc
    gc.collect()
    base = rss_mb()
    reset_peak()
    obj = (Ours if side == "ours" else Theirs)(args, mode, tmp.name)
    after_load = rss_mb()
    load_peak = peak_mb()
    if side == "ours":
        data, _ = make_batch(obj.cfg.vocab_size, args.batch, args.seq)
    else:
        data = make_ids(obj.model.config.vocab_size, args.batch, args.seq)
    reset_peak()
    obj.step(data)
    first_peak = peak_mb()
    reset_peak()
    for _ in range(2):
        obj.step(data)
    steady_peak = peak_mb()
    return {"baseline_rss_mb": round(base), "load_delta_mb": round(after_load - base),
            "load_peak_delta_mb": round(load_peak - base),
            "first_step_peak_delta_mb": round(first_peak - base),
            "steady_step_peak_delta_mb": round(steady_peak - base)}


def run_memory(args, mode: str) -> dict:
    out = {}
    for side in ("ours", "torch"):
        cmd = [sys.executable, "-m", "bench.train", "--_memory_child", f"{side}:{mode}",
               "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
               "--remat", getattr(args, "remat", "none")]
        if args.tiny:
            cmd.append("--tiny")
        log(f"[{mode}] memory child: {side}")
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        if r.returncode != 0:
            out[side] = {"error": f"child exited {r.returncode}: {r.stderr.strip()[-500:]}"}
        else:
            out[side] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# -------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side and mode (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny random config (smoke run)")
    ap.add_argument("--remat", default="none", help="our step's per-layer recompute (train.REMATS)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--_memory_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("full", "lora")]
    if bad or not modes:
        raise SystemExit(f"--modes: unknown {bad}; valid: full, lora")
    if args.steps < 1 or args.batch < 1 or args.seq < 2:
        raise SystemExit("--steps and --batch must be >= 1, --seq >= 2")
    pin_threads(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    if args._memory_child:
        side, mode = args._memory_child.split(":")
        print(json.dumps(memory_child(args, side, mode)))
        return
    import jax
    import transformers
    out = {"bench": "train", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "model": "tiny random llama (4 layers, d=128, V=2048)" if args.tiny
           else "SmolLM2-135M-Instruct (embedded GGUF, fp32)",
           "batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq,
           "dtype": "float32", "threads": {"torch.set_num_threads": torch.get_num_threads(),
                                           "cpu_affinity": sorted(os.sched_getaffinity(0)),
                                           "xla": "pool sized by the affinity"},
           "optimizer": {"name": "AdamW", "lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WD,
                         "grad_clip_norm": CLIP},
           "lora": {"r": LORA["rank"], "alpha": LORA["alpha"], "dropout": LORA["dropout"],
                    "targets": list(LORA["targets"]), "torch_side": "peft"},
           "loss": "IL cross-entropy over all B*(T-1) shifted tokens (ours: joint_loss, "
                   "il_normalization=tokens; torch: HF labels=input_ids)",
           "fma_peak_flops": FMA_PEAK.get(args.threads),
           "versions": {"jax": jax.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__},
           "loadavg_start": list(os.getloadavg()), "steps": args.steps, "modes": {}}
    for mode in modes:
        out["modes"][mode] = run_mode(args, mode)
        if args.memory:
            out["modes"][mode]["memory"] = run_memory(args, mode)
    out["loadavg_end"] = list(os.getloadavg())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
