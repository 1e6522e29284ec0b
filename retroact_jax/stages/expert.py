"""The project's own imitation data: scripted experts rolled out through the agent loop on the
TRAIN split of each environment, filtered by the benchmark's evaluator (docs/paper.md §2.1).

RetroAct's expert was Mixtral-8x7B with few-shot prompts. ``expert="gold"`` (the default, offline
and model-free) is the gold script of ``agent.gold`` instead; ``expert=<model source>`` is the
few-shot LLM expert of ``model_expert.py`` (HotpotQA). The gold script differs from the paper's
expert in two ways: it retrieves with privileged knowledge (it searches the supporting-fact
titles), and its reflections are fixed templates naming the gold plan, not a model's diagnosis.
Gold (HotpotQA: search the supporting-fact titles, then answer; ALFWorld: state the goal, then play
the game's walkthrough; InterCode-SQL: SHOW TABLES, DESC the tables the gold query reads (at most
2), execute the gold query, then submit: the expert reads the schema as RetroAct's released
InterCode rows do, 91% of which run SHOW TABLES / DESC, and as the few-shot exemplars do). To give
the reflector something to imitate, a seeded fraction of the tasks (``reflect_fraction``) fails
its first trial on purpose (``gold_planner(fail=True)``); the loop then asks the reflector, whose
script writes ``gold_reflection`` (the failure named, the gold plan given), and the second trial,
which sees that reflection in its prompt, plays the gold.

Everything goes through ``agent.rollout.evaluate``, so the rollouts are the agent's exact inference
format (zero-shot prompts, cues, memory), they are cached as ``<dir>/<env>/trajectories.jsonl`` and
an interrupted collection resumes where it stopped. Filtering (``passes_evaluator``) keeps trials
the benchmark's evaluator accepts: HotpotQA exact match (normalised EM), ALFWorld ``won``,
InterCode reward exactly 1. Samples (``stages.samples``): a planner sample per kept trial, a reflector
sample per reflection that preceded a kept trial. The selected samples are written to
``<dir>/<env>/il_samples.jsonl`` with counts in ``<dir>/<env>/summary.json``.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from retroact_jax import benchmarks
from retroact_jax.batching import Sample
from retroact_jax.stages import samples as S



class ExpertError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    expert: str = "gold"            # gold (scripted) | a model source: few-shot LLM (model_expert.py)
    num_tasks: int = -1             # tasks per env (seeded subset of the train split; 0 all; -1 the benchmark's expert_tasks)
    reflect_fraction: float = 0.3   # gold: tasks whose first trial fails on purpose (reflector data)
    trials: int = 0                 # trials per task; 0: the expert's default (gold 2, model 10)
    seed: int = 0                   # task subset and which tasks fail first
    batch_size: int = 8             # tasks in flight
    env_workers: int = 4            # threads / worker processes stepping the envs
    progress: bool = True
    exclude: tuple[int, ...] = ()   # train-task indices never played (the validation slice, holdout.py)


def check(env_names: Sequence[str], cfg: ExpertConfig) -> None:
    """Refuse an env / expert combination that cannot work, before any expert runs."""
    for env in env_names:
        if not benchmarks.get(env).train_split:
            raise ExpertError(f"{env} has no train split for the expert to play")
        if cfg.expert != "gold":
            from retroact_jax.stages import model_expert
            model_expert.check(env, cfg.expert, model_expert.ModelExpertConfig())


def passes_evaluator(rec: Mapping[str, Any]) -> bool:
    """The benchmark's evaluator on a trial record (docs/paper.md §2.1)."""
    return benchmarks.get(rec["env"]).passes_evaluator(rec)


def num_tasks_for(env_name: str, num_tasks: int) -> int:
    return benchmarks.get(env_name).expert_tasks if num_tasks < 0 else num_tasks


def select_tasks(n_all: int, num_tasks: int, seed: int) -> list[int]:
    """A seeded subset of task indices, sorted (train splits are ordered by type or source)."""
    if num_tasks <= 0 or num_tasks >= n_all:
        return list(range(n_all))
    perm = np.random.default_rng([int(seed), 7]).permutation(n_all)
    return sorted(int(i) for i in perm[:num_tasks])


def pick(n_all: int, env_name: str, cfg: ExpertConfig, skip: Sequence[int] = ()) -> list[int]:
    """The expert's task indices: a seeded subset of the tasks outside ``cfg.exclude`` and ``skip``."""
    out = set(int(i) for i in cfg.exclude) | set(int(i) for i in skip)
    pool = [i for i in range(n_all) if i not in out]
    return [pool[j] for j in select_tasks(len(pool), num_tasks_for(env_name, cfg.num_tasks), cfg.seed)]


def fails_first(index: int, fraction: float, seed: int) -> bool:
    return bool(np.random.default_rng([int(seed), int(index), 11]).random() < fraction)


def expert_policy(tasks: Mapping[int, Any], fail_first: Mapping[int, bool]):
    """The gold script; tasks marked in ``fail_first`` fail trial 1 on purpose and reflect."""
    from retroact_jax.agent import gold
    from retroact_jax.agent.policy import ScriptedPolicy

    def script(call):
        index, trial, role = call.key
        task = tasks[index]
        if role == "reflector":
            return gold.gold_reflection(task)
        return gold.gold_planner(task, call.prompt, fail=trial == 1 and fail_first[index])
    return ScriptedPolicy(script)


def collect(env_name: str, out_dir: str | pathlib.Path, cfg: ExpertConfig = ExpertConfig(),
            split: str | None = None, task_indices: Sequence[int] | None = None) -> list[dict]:
    """Roll the expert out (or resume / reuse the cache); returns all trial records of the tasks."""
    import envs
    from retroact_jax import evaluation
    from retroact_jax.agent import loop, rollout
    bench = benchmarks.get(env_name)
    split = split or bench.train_split
    if not split:
        raise ExpertError(f"{env_name} has no train split for the expert to play")
    trials = cfg.trials or 2
    if trials < 1 or not 0.0 <= cfg.reflect_fraction <= 1.0:
        raise ExpertError(f"expert trials must be >= 1 and reflect_fraction in [0, 1]: {cfg}")
    if cfg.reflect_fraction > 0 and trials < 2:
        raise ExpertError("reflect_fraction > 0 needs trials >= 2 (a failure, then the gold)")
    probe = envs.make(env_name, split)
    try:
        n_all = len(probe.tasks)
        indices = list(task_indices) if task_indices is not None else pick(n_all, env_name, cfg)
        tasks = {i: probe.task_at(i) for i in indices}
    finally:
        probe.close()
    fail = {i: fails_first(i, cfg.reflect_fraction, cfg.seed) for i in indices}
    pol = expert_policy(tasks, fail)
    run_dir = pathlib.Path(out_dir) / env_name
    run_dir.mkdir(parents=True, exist_ok=True)
    agent_cfg = loop.AgentConfig(trials=trials, batch_size=cfg.batch_size, env_workers=cfg.env_workers)
    rollout.evaluate(env_name, split, indices, pol, pol, agent_cfg, run_dir,
                     env_backend=bench.env_backend, show_progress=cfg.progress)
    recs = evaluation.TrajectoryLog(run_dir / "trajectories.jsonl").load()
    wanted = {tasks[i].id for i in indices}
    return [r for r in recs if r["task_id"] in wanted]


def il_samples(records: Sequence[Mapping[str, Any]]) -> tuple[list[Sample], list[Sample], dict]:
    """(planner samples, reflector samples, counts) of evaluator-accepted trials (docs/paper.md §2.1)."""
    planner = S.planner_samples(records, "il", keep=passes_evaluator)
    reflector = S.reflector_samples(records, "il", keep=lambda prev, nxt: passes_evaluator(nxt))
    tasks = {S.task_key(r) for r in records}
    solved = {S.task_key(r) for r in records if passes_evaluator(r)}
    counts = {"tasks": len(tasks), "tasks_solved": len(solved), "trials": len(records),
              "trials_kept": len(planner), "reflections": sum(bool(r.get("reflection")) for r in records),
              "reflector_kept": len(reflector),
              "success_but_rejected": sum(bool(r.get("success")) and not passes_evaluator(r) for r in records)}
    return planner, reflector, counts


def write_samples(d: pathlib.Path, samples: Sequence[Sample]) -> None:
    """``<d>/il_samples.jsonl``, written atomically."""
    tmp = d / "il_samples.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(S.sample_to_json(s)) + "\n")
    tmp.replace(d / "il_samples.jsonl")


def expert_il_data(env_name: str, out_dir: str | pathlib.Path, cfg: ExpertConfig = ExpertConfig(),
                   **kw) -> tuple[list[Sample], list[Sample], dict]:
    """collect -> filter -> samples; writes ``il_samples.jsonl`` and ``summary.json`` beside the
    trajectories. A repeated call reads the cached rollouts (no env step is repeated)."""
    if cfg.expert != "gold":                   # the few-shot LLM expert (HotpotQA)
        from retroact_jax.stages import model_expert
        return model_expert.expert_il_data(env_name, out_dir, cfg, **kw)
    recs = collect(env_name, out_dir, cfg, **kw)
    planner, reflector, counts = il_samples(recs)
    d = pathlib.Path(out_dir) / env_name
    write_samples(d, planner + reflector)
    (d / "summary.json").write_text(json.dumps({"env": env_name, **counts,
                                                "config": dataclasses.asdict(cfg)}, indent=2) + "\n")
    return planner, reflector, counts
