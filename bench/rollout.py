"""Agent rollout throughput with SmolLM2 (the CPU Table 2's evaluation path): agent steps/s and
where the wall time goes, with ``bench.sampler``'s decode figure at the same batch measured in the
same process, interleaved with the rollouts. Prints one JSON.

    taskset -c 1 python -m bench.rollout --envs hotpotqa,intercode_sql --tasks 32 --threads 1

Per (env, prompt) cell: ``TrialRunner`` with ``LMPolicy`` over the embedded SmolLM2-135M, greedy,
``--tasks`` tasks in flight, the benchmark's min_new_tokens; prompts ``zero_shot`` (the fine-tuned
methods' planner prompt) and ``few_shot`` (ReAct's, ``agent.fewshot`` exemplars). A warm-up run of
``--warm_steps`` steps compiles first (compile time reported apart). The wall is split into:

- ``prefill_s``: ``Sampler.start`` / ``extend`` (prefill of prompts and observations, compaction),
- ``decode_s``: ``Sampler.generate`` (the decode loop; its host-side argument handling included),
- ``env_s``: env ``reset`` / ``step``,
- ``host_s``: everything else (tokenisation, longest common prefix, padding, masks, stop handling,
  the loop's own Python); ``tokenize_s`` is its tokeniser part.

Sampler calls are timed with ``block_until_ready``. Decode: ``decode_ms_per_step`` = decode time /
loop iterations (each call runs until its longest row stops), at the batch bucket the calls used,
against the sampler reference: ``Sampler.start`` + ``generate`` of ``--ref_new`` tokens from
``--ref_prompt``-token random prompts at that batch bucket (no early stop), measured right before
and after each cell; ``decode_vs_sampler`` = reference ms/step / episode ms/step (>= 0.7 wanted).
``--reprefill`` also runs ``incremental=False`` (every context re-prefilled) for comparison.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import numpy as np

ENVS = ("hotpotqa", "intercode_sql", "intercode_bash", "alfworld")


class Probe:
    """Proxy adding the wall time of some methods to ``acc[name]`` (``sync``: block on the result)."""

    def __init__(self, inner, acc, names: dict, sync=None, log=None):
        self.inner, self.acc, self.names, self.sync, self.log = inner, acc, names, sync, log

    def __getattr__(self, attr):
        fn = getattr(self.inner, attr)
        if attr not in self.names:
            return fn

        def timed(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            if self.sync is not None:
                self.sync(out)
            dt = time.perf_counter() - t
            self.acc[self.names[attr]] += dt
            if self.log is not None:
                self.log(attr, a, k, out, dt)
            return out
        return timed


def _sync(out):
    import jax
    jax.block_until_ready(out)


def run_cell(env, prompts, sampler, tok, a, max_steps, incremental=True):
    from retroact_jax import benchmarks
    from retroact_jax.agent import loop, protocols, rollout
    from retroact_jax.agent.lm_policy import LMPolicy
    import envs
    acc = collections.Counter()
    decode_calls = []

    def log(attr, args, kw, out, dt):
        if attr == "generate":
            state, comp = out
            decode_calls.append((state.cache.batch, int(comp.lengths_B.max(initial=0)),
                                 int(comp.lengths_B.sum()), int(state.num_rows), dt))

    s = Probe(sampler, acc, {"start": "prefill_s", "extend": "prefill_s", "generate": "decode_s",
                             "sample": "decode_s"}, _sync, log)
    t = Probe(tok, acc, {"encode": "tokenize_s", "decode": "tokenize_s"})
    pol = LMPolicy(s, t, incremental=incremental, min_new_tokens=benchmarks.get(env).min_new_tokens)
    p = protocols.protocol_for(env)
    p.max_steps = max_steps
    if a.max_new_tokens:
        p.planner_max_tokens = a.max_new_tokens
    split = benchmarks.get(env).eval_split
    factory = rollout.make_slots_factory(env, split, max_steps, "threads", a.env_workers)
    probe = envs.make(env, split)
    states = [loop.TaskState(probe.task_at(i)) for i in range(a.tasks)]
    probe.close()
    examples = None
    if prompts == "few_shot":
        from retroact_jax.agent import fewshot
        examples = fewshot.planner_examples(env, a.num_examples)
    recs = []
    runner = loop.TrialRunner(p, lambda n: Probe(factory(n), acc, {"step": "env_s", "reset": "env_s"}),
                              pol, None, loop.AgentConfig(trials=1, batch_size=a.tasks,
                                                          env_workers=a.env_workers),
                              planner_examples=examples)
    t0 = time.perf_counter()
    runner.run(states, recs.append)
    wall = time.perf_counter() - t0
    steps = sum(r["num_steps"] for r in recs)
    host = wall - acc["prefill_s"] - acc["decode_s"] - acc["env_s"]
    iters = sum(c[1] for c in decode_calls)
    by_batch = collections.defaultdict(lambda: [0, 0.0, 0])
    for b, it, toks, rows, dt in decode_calls:
        by_batch[b][0] += it
        by_batch[b][1] += dt
        by_batch[b][2] += toks
    out = {"agent_steps": steps, "model_calls": len(decode_calls), "wall_s": round(wall, 2),
           "agent_steps_per_s": round(steps / wall, 3),
           **{k: round(acc[k], 2) for k in ("prefill_s", "decode_s", "env_s", "tokenize_s")},
           "host_s": round(host, 2),
           "share": {k: round(v / wall, 3) for k, v in (("prefill", acc["prefill_s"]),
                                                        ("decode", acc["decode_s"]),
                                                        ("env", acc["env_s"]), ("host", host))},
           "new_tokens": sum(c[2] for c in decode_calls), "decode_iterations": iters,
           "useful_decode_tok_s": round(sum(c[2] for c in decode_calls) / max(acc["decode_s"], 1e-9), 1),
           "decode_by_batch": {str(b): {"iterations": v[0], "s": round(v[1], 2),
                                        "ms_per_step": round(1e3 * v[1] / max(v[0], 1), 1),
                                        "useful_tokens": v[2]}
                               for b, v in sorted(by_batch.items())},
           "policy_stats": dict(pol.stats),
           "halted": dict(collections.Counter(str(r["halted"]) for r in recs)),
           "success": sum(bool(r["success"]) for r in recs)}
    out["_trajectories"] = [[c["text"] for c in r["planner"]["calls"]] for r in recs]
    return out


def sampler_ref(sampler, b, a, rng):
    """ms per decode step of ``Sampler.generate`` at batch ``b`` (random prompts, no early stop)."""
    import jax
    prompts = [rng.integers(3, sampler.cfg.vocab_size, a.ref_prompt).tolist() for _ in range(b)]
    state = jax.block_until_ready(sampler.start(prompts, reserve=a.ref_new))
    t = time.perf_counter()
    _, out = sampler.generate(state, None, a.ref_new, eos_ids=())
    dt = time.perf_counter() - t
    assert int(out.lengths_B.min()) == a.ref_new
    return 1e3 * dt / a.ref_new


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--envs", default="hotpotqa,intercode_sql")
    ap.add_argument("--prompts", default="zero_shot,few_shot", help="zero_shot and/or few_shot")
    ap.add_argument("--tasks", type=int, default=32, help="tasks in flight (= tasks run)")
    ap.add_argument("--max_steps", type=int, default=0, help="0 = the protocol's (HotpotQA 5, InterCode 10)")
    ap.add_argument("--warm_steps", type=int, default=1, help="steps of the compile warm-up run")
    ap.add_argument("--max_new_tokens", type=int, default=0, help="0 = the protocol's")
    ap.add_argument("--num_examples", type=int, default=2, help="few-shot exemplars (config.eval's)")
    ap.add_argument("--env_workers", type=int, default=4)
    ap.add_argument("--ref_prompt", type=int, default=512)
    ap.add_argument("--ref_new", type=int, default=64)
    ap.add_argument("--reprefill", action="store_true", help="also run incremental=False")
    ap.add_argument("--threads", type=int, default=0, help="pin to this many cores; 0 = all usable")
    ap.add_argument("--trajectories", default="", help="write the completions of every cell here (JSON)")
    a = ap.parse_args()
    for e in a.envs.split(","):
        if e not in ENVS:
            sys.exit(f"error: unknown env {e!r} (one of {', '.join(ENVS)})")
    for pm in a.prompts.split(","):
        if pm not in ("zero_shot", "few_shot"):
            sys.exit(f"error: --prompts takes zero_shot and/or few_shot, got {pm!r}")
    if a.threads:
        from bench.train import pin_threads
        pin_threads(a.threads)
    from retroact_jax import benchmarks, sampling
    from retroact_jax.models import hub
    t = time.perf_counter()
    model, tok, _ = hub.load_pretrained("embedded")
    sampler = sampling.Sampler(model, pad_id=tok.pad_id or 0, eos_ids=tok.eos_ids)
    rng = np.random.default_rng(0)
    out = {"bench": "rollout", "model": "SmolLM2-135M-Instruct (embedded, fp32), greedy",
           "args": vars(a), "threads": len(os.sched_getaffinity(0)),
           "loadavg_start": os.getloadavg(), "load_s": round(time.perf_counter() - t, 1), "results": {}}
    trajectories = {}
    for env in a.envs.split(","):
        full = a.max_steps or type(__import__("retroact_jax.agent.protocols", fromlist=["x"])
                                    .protocol_for(env)).max_steps
        for pm in a.prompts.split(","):
            cell = f"{env}/{pm}"
            t = time.perf_counter()
            c0 = dict(sampling.TRACE_COUNTS)
            run_cell(env, pm, sampler, tok, a, a.warm_steps)        # compiles
            compile_s = time.perf_counter() - t
            b = sampling.bucket(a.tasks, sampler.batch_buckets, "batch")
            sampler_ref(sampler, b, a, rng)                           # compiles the reference
            ref = [sampler_ref(sampler, b, a, rng)]
            c1 = dict(sampling.TRACE_COUNTS)
            res = run_cell(env, pm, sampler, tok, a, full)
            ref.append(sampler_ref(sampler, b, a, rng))
            c2 = dict(sampling.TRACE_COUNTS)
            trajectories[cell] = res.pop("_trajectories")
            res["warmup_run_s"] = round(compile_s, 1)
            res["traces_warmup"] = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1 if c1.get(k, 0) != c0.get(k, 0)}
            res["traces_timed_run"] = {k: c2.get(k, 0) - c1.get(k, 0) for k in c2 if c2.get(k, 0) != c1.get(k, 0)}
            res["sampler_ref"] = {"batch": b, "prompt": a.ref_prompt, "new": a.ref_new,
                                  "ms_per_step_before_after": [round(x, 1) for x in ref],
                                  "tok_s": round(b * 1e3 / statistics.mean(ref), 1)}
            ep = res["decode_by_batch"].get(str(b))
            if ep:
                res["decode_vs_sampler"] = round(statistics.mean(ref) / ep["ms_per_step"], 3)
            if a.reprefill:
                res["reprefill"] = run_cell(env, pm, sampler, tok, a, full, incremental=False)
                res["reprefill"].pop("_trajectories")
            res["loadavg_end"] = os.getloadavg()
            out["results"][cell] = res
            print(json.dumps({"partial": {cell: res}}), file=sys.stderr, flush=True)
    out["trace_counts"] = dict(sampling.TRACE_COUNTS)
    if a.trajectories:
        with open(a.trajectories, "w") as f:
            json.dump(trajectories, f)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
