"""Stage 2, the off-policy joint policy gradient with IL regularisation (docs/paper.md §3, Algorithm 1),
read top to bottom in ``run_rl``:

    for k in 1..iterations:
        collect   roll out the current planner / reflector (temperature 1) on train tasks (collect.py)
        score     the behaviour log-probs of the new samples, admit them to the replay buffer (replay.py)
        update    epochs over the buffer: each step = RL rows + lambda * IL rows drawn from the IL data,
                  one jitted joint step of both roles (train.Learner, Eq. 9-10)
        evaluate  optional: greedy trials on the test split, logged as eval metrics

Each step is a top-level function of one state record (``RLState``); nothing else holds state.

Methods (``config.method``, docs/methods.md): ``retroact`` (both roles trained, the reflector in
the loop), ``sft_rl`` (the planner only, no reflector at collection), ``sft_ei`` (expert iteration of
the planner: each collection's successes become imitation samples, IL loss, no reflector).
``model.multi_agent = False`` is the single-agent setting (one model, shared parameters). Start
from the SFT models by pointing ``model.planner`` / ``model.reflector`` at the IL stage's exports:
fresh LoRA adapters go on top, as the original.

Defaults = the original code (docs/paper.md §3.2, §4): detached clipped token ratio, eps 0.3,
lambda 1, mean over all positions, observation tokens trained, reflector reward
``(R_cur - R_last)(R_last+a)/a`` with a = 1, zero-reward planner trials dropped, temperature 1,
one collection round x 3 epochs with linear decay (``SCHEDULES``).

Several processes (``jax.distributed``, README "Several hosts"): each process plays its share of
the collection and evaluation tasks and scores its share of the samples; the records and log-probs
are gathered, so every process builds the same buffer and the same global batches for the learner,
whose mesh spans all processes. Process 0 writes the shared files; checkpoints are saved by all.

Resume: a checkpoint (trainable params, optimizer + schedule step, dropout RNG state) every
``checkpoint_every`` steps and at the end of each iteration; its meta holds the iteration, the step
within it and the replay buffer file (sha256-checked). Tasks, rollout seeds, buffer batches and IL
draws are pure functions of (seed, iteration, step) and rollouts resume from their trajectory files,
so a run killed at any point continues with the parameters and buffer an uninterrupted run has.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import numpy as np

from retroact_jax import batching, distributed, train
from retroact_jax.stages import behaviour as behaviour_lib
from retroact_jax.stages import collect as collect_lib
from retroact_jax.stages import holdout
from retroact_jax.stages import replay as replay_lib
from retroact_jax.stages import setup
from retroact_jax.stages.configs import SCHEDULES, apply_schedule, rl_config as default_config
from retroact_jax.stages.rl_state import (METHODS, STAGE, RLState, StageError, fix_schedule, init,
                                          log_metrics, refresh, save, seed_of)
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ Algorithm 1 steps
def policies(s: RLState, explore: bool):
    """(planner, reflector or None) LM policies over the behaviour samplers."""
    from retroact_jax.agent.lm_policy import LMPolicy
    kw = dict(top_p=float(s.c.collect.top_p) if explore else 1.0, min_new_tokens=int(s.c.collect.min_new_tokens))
    planner = LMPolicy(s.behaviour["planner"].sampler, s.t.tokenizer, **kw)
    if not s.reflector:
        return planner, None
    return planner, LMPolicy(s.behaviour["reflector"].sampler, s.t.tokenizer, hold_cache=False, **kw)


def agent_config(s: RLState, trials: int, temperature: float, reflector_temperature: float, seed: int):
    from retroact_jax.agent import loop
    c = s.c
    return loop.AgentConfig(trials=trials if s.reflector else 1, temperature=temperature,
                            reflector_temperature=reflector_temperature, seed=seed,
                            batch_size=int(c.collect.batch_size), env_workers=int(c.collect.env_workers),
                            max_steps=int(c.collect.max_steps) or None,
                            planner_max_tokens=int(c.collect.planner_max_tokens) or None,
                            reflector_max_tokens=int(c.collect.reflector_max_tokens) or None,
                            reflector_rows=int(c.collect.reflector_rows))


def collect(s: RLState) -> tuple[list[dict], dict]:
    """Roll out the current policies on the iteration's train tasks: (trial records, summary)."""
    c, k = s.c, s.iteration
    idx = [s.pool[i] for i in collect_lib.task_indices(len(s.pool), int(c.collect.tasks_per_iteration),
                                                       int(c.seed), k)]      # never the validation slice
    acfg = agent_config(s, int(c.collect.trials), float(c.collect.temperature),
                        float(c.collect.reflector_temperature), seed_of(int(c.seed), k, "collect"))
    planner, reflector = policies(s, explore=True)
    return collect_lib.rollout(c.env, c.collect.split, idx, planner, reflector, acfg,
                               s.workdir / "rollouts" / f"iter-{k:04d}", env_backend=s.backend,
                               show_progress=bool(c.train.progress))


def score(s: RLState, records: list[dict], summary: dict) -> None:
    """Samples of the records, admitted by the replay filters, behaviour-scored, into the buffer."""
    from retroact_jax.agent import protocols
    c, k, tok = s.c, s.iteration, s.t.tokenizer
    samples = (collect_lib.ei_samples if s.ei else collect_lib.rl_samples)(records, s.roles)
    tss = collect_lib.tokenize(samples, tok, s.eos)
    stop = tuple(protocols.protocol_for(c.env).reflector_stop)
    kept, rejected = replay_lib.admit(samples, s.buffer.cfg, [len(x) for x in tss], stop=stop)
    samples = [samples[i] for i in kept]
    tss = [tss[i] for i in kept]
    health: dict[str, float] = {}
    if not s.ei:
        samples, _, health = collect_lib.score_shared(
            samples, {r: s.behaviour[r].scorer for r in s.roles}, tok, eos_id=s.eos, records=records,
            batch_rows=int(c.collect.score_rows), tokenized=tss)
        tss = [collect_lib.with_behaviour(x, y) for x, y in zip(tss, samples)]
        if not (float(c.collect.temperature) == 1.0 and float(c.collect.top_p) == 1.0):
            health = {a: b for a, b in health.items() if not a.startswith("behaviour_gap")}
    first = s.buffer.next_uid
    s.buffer.add(samples, k, [len(x) for x in tss])
    s.tokenized.update({first + i: x for i, x in enumerate(tss)})   # training reuses these rows
    s.replay_ref = behaviour_lib.save_buffer(s.workdir / "replay", k, s.buffer)
    live = {e.uid for es in s.buffer.entries.values() for e in es}
    s.tokenized = {u: x for u, x in s.tokenized.items() if u in live}
    m = {"iteration": k, "tasks": len({r["task_index"] for r in records}), "trials": len(records),
         "added": len(samples), **{f"rejected_{a}": b for a, b in rejected.items()}, **health,
         **s.buffer.stats()}
    prim = summary["primary"]
    m.update({f"train_{prim}_{x}": summary["metrics"][prim][x] for x in ("IR", "FR", "AR")})
    log_metrics(s, m, "collect")


def plan(s: RLState) -> list[dict[str, list]]:
    """Each update step's buffer entries per role for the current iteration (deterministic)."""
    per_role = {}
    for r in s.roles:
        seq = []
        for e in range(int(s.c.train.epochs)):
            seq += s.buffer.epoch_batches(r, s.rl_rows[r], seed_of(int(s.c.seed), s.iteration, "epochs"), e)
        per_role[r] = seq
    n = max([len(v) for v in per_role.values()] + [0])
    return [{r: (per_role[r][j] if j < len(per_role[r]) else []) for r in s.roles} for j in range(n)]


def batch(s: RLState, entries: dict[str, list]) -> dict[str, list]:
    """An update step's rows: the entries' tokens + IL regulariser rows drawn from (seed, step, role)."""
    part = {}
    for i, r in enumerate(s.roles):
        rows = []
        for e in entries[r]:
            if e.uid not in s.tokenized:
                s.tokenized[e.uid] = batching.tokenize_sample(e.sample, s.t.tokenizer, eos_id=s.eos)
            rows.append(s.tokenized[e.uid])
        if rows and s.il_rows[r]:
            rng = np.random.default_rng([int(s.c.seed), s.t.learner.step_count, train.ROLES.index(r), 17])
            rows += [s.il_data[r][int(j)] for j in rng.choice(len(s.il_data[r]), s.il_rows[r])]
        part[r] = rows
    return part


def update(s: RLState) -> None:
    """The iteration's epochs over the buffer (Eq. 9-10), resumable at any step."""
    c = s.c
    steps = plan(s)
    if not s.started:
        fix_schedule(s, len(steps))
    learner = s.t.learner
    rows = {r: s.rl_rows[r] + s.il_rows[r] for r in s.roles}
    bar = setup.progress(len(steps), s.it_step, f"RL iteration {s.iteration}", bool(c.train.progress))
    for j in range(s.it_step, len(steps)):
        arrays, st = train.collate_step(batch(s, steps[j]), rows, s.buckets, s.t.pad_id, **s.collate_kw)
        host = {"iteration": s.iteration, "tokens": int(arrays["lengths_B"].sum()),
                "seq_len": int(arrays["tokens_BxT"].shape[1]),
                **{f"rows_{r}": st[r]["rows"] for r in s.roles},
                **{f"truncated_{r}": st[r]["truncated"] for r in s.roles}, "last": j + 1 == len(steps)}
        log_train(s, s.lag.push(learner.step_count + 1, learner.step(arrays), host))
        bar.update(1)
        s.it_step = j + 1
        every = int(c.train.checkpoint_every)
        if every > 0 and learner.step_count % every == 0 and s.it_step < len(steps):
            save(s, done=False)
    bar.close()
    log_train(s, s.lag.flush())
    s.it_done = True
    if steps:
        save(s, done=True)
    else:
        log.warning("RL iteration %d: the replay buffer has no rows to train on", s.iteration)
    refresh(s)


def log_train(s: RLState, item) -> None:
    if item is None:
        return
    step, m = item
    if not s.ei and m.get("rl_tokens_missing_behaviour", 0):
        raise StageError(f"step {step}: RL tokens without behaviour log-probs")
    if step % max(1, int(s.c.train.log_every)) == 0 or m.get("last"):
        m.pop("last", None)
        s.t.writer.write(step, m)


def evaluate(s: RLState) -> None:
    """Greedy trials of the current policies on ``eval.split`` after every ``eval.every``-th iteration."""
    from retroact_jax.agent import rollout as rollout_lib
    c, k = s.c, s.iteration
    out = s.workdir / "eval" / f"iter-{k:04d}"
    if not int(c.eval.every) or k % int(c.eval.every) or distributed.agree((out / "summary.json").exists()):
        return
    split, indices = eval_tasks(c)
    acfg = agent_config(s, int(c.eval.trials), float(c.eval.temperature), float(c.eval.temperature), int(c.seed))
    acfg = dataclasses.replace(acfg, batch_size=int(c.eval.batch_size))
    planner, reflector = policies(s, explore=False)
    _, summary = rollout_lib.evaluate_shared(c.env, split, indices, planner, reflector, acfg, out,
                                             summary_trials=int(c.eval.trials), env_backend=s.backend,
                                             show_progress=bool(c.train.progress))
    out.mkdir(parents=True, exist_ok=True)
    setup.write_json_atomic(out / "summary.json", summary)
    m = {"iteration": k}
    for metric, v in summary["metrics"].items():
        m.update({f"{metric}_{x}": v[x] for x in ("IR", "FR", "AR")})
    log_metrics(s, m, "eval")


def eval_tasks(c: Any) -> tuple[str, list[int]]:
    """(env split, task indices) of the eval hook: the first ``eval.num_tasks`` of ``eval.split``, or
    of the validation slice (``eval.split = "validation"``, played on the train split)."""
    import envs
    if c.eval.split == holdout.SPLIT:
        held = holdout.from_config(c.get("validation"))
        if held is None:
            raise StageError("config.eval.split='validation' needs config.validation.num_tasks > 0")
        return held.train_split, held.indices[: int(c.eval.num_tasks)]
    probe = envs.make(c.env, c.eval.split)
    try:
        return c.eval.split, list(range(min(len(probe.tasks), int(c.eval.num_tasks))))
    finally:
        probe.close()


# -------------------------------------------------------------------------------------- the stage
def run_rl(config: Any, workdir: str | pathlib.Path) -> dict:
    """Run (or resume, or find finished) the RL stage in ``workdir``; returns the summary."""
    c = config
    s = init(c, pathlib.Path(workdir))
    try:
        if s.t.meta is not None and s.it_done:
            evaluate(s)                       # killed between an update and its evaluation
        while not (s.it_done and s.iteration >= int(c.train.iterations)):
            if s.it_done:
                # ---------------------------------------- roll out pi_theta, mu_phi on train tasks
                s.iteration, s.it_step, s.it_done = s.iteration + 1, 0, False
                records, summary = collect(s)
                # ---------------------------------------- behaviour log-probs -> D_planner, D_reflector
                score(s, records, summary)
            # -------------------------------------------- update theta, phi with Eq. 9-10
            update(s)
            # -------------------------------------------- evaluate (optional)
            evaluate(s)
        exported = setup.finish(s.t, c, s.workdir) if s.started else {}
    finally:
        s.t.close()
    return setup.write_summary(s.workdir, STAGE, {
        "stage": STAGE, "method": c.method, "iterations": s.iteration,
        "steps": s.t.learner.step_count if s.started else 0, "resumed_from_step": s.resumed_from_step,
        "roles": s.roles,
        "reflector_in_loop": s.reflector, "multi_agent": bool(c.model.multi_agent),
        "replay": s.buffer.stats(), "history": s.history, "export": exported,
        "lora": dataclasses.asdict(s.t.lora) if s.t.lora else None})


trained_params = setup.trained_params


def read_buffer(workdir: str | pathlib.Path) -> replay_lib.ReplayBuffer:
    """The replay buffer the latest checkpoint of an RL run refers to."""
    _, meta = setup.read_checkpoint(workdir)
    return behaviour_lib.load_buffer(pathlib.Path(workdir) / "replay" / meta["replay_file"],
                                     meta["replay_sha256"], None)


__all__ = ("default_config", "run_rl", "trained_params", "read_buffer", "METHODS", "SCHEDULES",
           "apply_schedule", "RLState")
