"""Agent rollout throughput with SmolLM2: agent steps/s, time in sampling vs environment, and the
incremental KV cache vs re-prefilling every context, measured in the same run. Prints one JSON.

    python -m bench.rollout --envs=intercode_sql,alfworld --tasks=4 --trials=1 --max_steps=4
"""
from __future__ import annotations

import argparse
import json
import time

import envs
from retroact_jax import sampling
from retroact_jax.agent import loop, protocols, rollout
from retroact_jax.agent.lm_policy import LMPolicy


class Timed:
    """Wraps a policy or slots object and adds the wall time of its calls to ``acc[name]``."""

    def __init__(self, inner, acc, name):
        self.inner, self.acc, self.name = inner, acc, name

    def __getattr__(self, attr):
        fn = getattr(self.inner, attr)
        if attr not in ("generate", "step", "reset"):
            return fn

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.acc[self.name] += time.perf_counter() - t
        return timed


def run_one(env, sampler, tok, incremental, a):
    acc = {"sampling": 0.0, "env": 0.0}
    pol = Timed(LMPolicy(sampler, tok, incremental=incremental), acc, "sampling")
    p = protocols.protocol_for(env)
    p.max_steps = a.max_steps
    p.planner_max_tokens = a.max_new_tokens
    factory = rollout.make_slots_factory(env, "valid_unseen" if env == "alfworld" else "test",
                                         a.max_steps, "threads", 1)
    probe = envs.make(env, "valid_unseen" if env == "alfworld" else "test")
    states = [loop.TaskState(probe.task_at(i)) for i in range(a.tasks)]
    probe.close()
    recs = []
    runner = loop.TrialRunner(p, lambda n: Timed(factory(n), acc, "env"), pol, None,
                              loop.AgentConfig(trials=a.trials, batch_size=a.tasks))
    t = time.perf_counter()
    runner.run(states, recs.append)
    wall = time.perf_counter() - t
    steps = sum(r["num_steps"] for r in recs)
    return {"agent_steps": steps, "wall_s": round(wall, 2), "agent_steps_per_s": round(steps / wall, 3),
            "sampling_s": round(acc["sampling"], 2), "env_s": round(acc["env"], 2),
            "sampling_share": round(acc["sampling"] / wall, 3), "env_share": round(acc["env"] / wall, 3),
            "policy_stats": pol.inner.stats}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--envs", default="intercode_sql,alfworld")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--max_steps", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    a = ap.parse_args()
    from retroact_jax.models import hub
    model, tok, _ = hub.load_pretrained("embedded")
    sampler = sampling.Sampler(model, pad_id=tok.pad_id or 0, eos_ids=tok.eos_ids)
    out = {"model": "SmolLM2-135M-Instruct (embedded, fp32)", "args": vars(a), "results": {}}
    for env in a.envs.split(","):
        run_one(env, sampler, tok, True, argparse.Namespace(**{**vars(a), "max_steps": 1}))
        run_one(env, sampler, tok, False, argparse.Namespace(**{**vars(a), "max_steps": 1}))
        inc = run_one(env, sampler, tok, True, a)        # after a warm-up of both (compiles)
        ref = run_one(env, sampler, tok, False, a)
        out["results"][env] = {"incremental": inc, "reprefill": ref,
                               "speedup_sampling": round(ref["sampling_s"] / max(inc["sampling_s"], 1e-9), 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
