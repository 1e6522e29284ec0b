"""Batched, resumable evaluation rollouts: tasks of one env through the trial loop, with outputs.

``evaluate(...)`` runs the selected tasks of ``env_name/split`` through ``TrialRunner`` with the
given planner / reflector policies, appending every finished trial to
``<run_dir>/trajectories.jsonl``. Work already in that file is read back first: finished tasks are
skipped and unfinished ones continue at their next trial with their memory, so an interrupted
evaluation resumes where it stopped and never writes a trial twice. A tqdm bar shows tasks done,
trials run, tasks solved and the ETA.

``evaluate_shared(...)``: the same over several processes (``retroact_jax.distributed``): each
process plays its share of the tasks into its own part directory, then every process gets all the
records, in (task, trial) order, and the summary of all of them.
"""
from __future__ import annotations

import pathlib
import time
from typing import Any, Mapping, Sequence

import envs
from retroact_jax import evaluation
from retroact_jax.agent import loop, protocols, slots as slots_lib


def make_slots_factory(env_name: str, split: str, max_steps: int, backend: str, workers: int,
                       env_kwargs: Mapping | None = None):
    kw = dict(env_kwargs or {})
    if backend == "threads":
        return lambda n: slots_lib.ThreadSlots(
            lambda: envs.make(env_name, split, max_steps=max_steps, **kw), n, workers)
    if backend == "processes":
        return lambda n: slots_lib.PoolSlots(env_name, split, n, workers,
                                             {"max_steps": max_steps, **kw})
    raise ValueError(f"env backend must be 'threads' or 'processes', got {backend!r}")


def evaluate(env_name: str, split: str, task_indices: Sequence[int], planner, reflector,
             agent_cfg: loop.AgentConfig, run_dir: str | pathlib.Path, *,
             summary_trials: int | None = None, env_backend: str = "threads",
             env_kwargs: Mapping | None = None, planner_examples: Any = None,
             reflector_examples: Any = None, show_progress: bool = True) -> dict:
    """Run (or resume) the evaluation; returns ``evaluation.summarize`` of the selected tasks."""
    protocol = protocols.protocol_for(env_name)
    if agent_cfg.max_steps is not None:
        protocol.max_steps = int(agent_cfg.max_steps)
    log = evaluation.TrajectoryLog(pathlib.Path(run_dir) / "trajectories.jsonl")
    done = log.load()
    for r in done:
        if r["env"] != env_name or r["split"] != split:
            raise evaluation.TrajectoryError(f"{log.path} holds {r['env']}/{r['split']} trajectories; this run is "
                             f"{env_name}/{split}: use another run dir")
    probe = envs.make(env_name, split)
    try:
        tasks = [probe.task_at(int(i)) for i in task_indices]
    finally:
        probe.close()
    by_task: dict[int, list] = {}
    for r in done:
        by_task.setdefault(int(r["task_index"]), []).append(r)
    states = []
    for t in tasks:
        prev = by_task.get(t.index, [])
        if prev and prev[0]["task_id"] != t.id:
            raise evaluation.TrajectoryError(f"{log.path}: task {t.index} was {prev[0]['task_id']!r}, now {t.id!r}")
        states.append(loop.TaskState.from_records(t, prev))

    bar = None
    counts = {"trials": sum(len(s.records) for s in states),
              "solved": sum(s.solved for s in states)}
    if show_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(states), initial=sum(s.finished(agent_cfg.trials) for s in states),
                   desc=f"{env_name} eval", unit="task", dynamic_ncols=True)
        bar.set_postfix(counts)

    def on_trial(rec: dict) -> None:
        log.append(rec)
        counts["trials"] += 1
        counts["solved"] += bool(rec["success"])
        if bar is not None:
            bar.set_postfix(counts)

    def progress(event: str, st: loop.TaskState) -> None:
        if bar is not None and event == "task":
            bar.update(1)

    runner = loop.TrialRunner(
        protocol,
        make_slots_factory(env_name, split, protocol.max_steps, env_backend,
                           agent_cfg.env_workers, env_kwargs),
        planner, reflector, agent_cfg, planner_examples, reflector_examples, progress)
    t0 = time.perf_counter()
    try:
        runner.run(states, on_trial)
    finally:
        if bar is not None:
            bar.close()
    summary = evaluation.summarize(env_name, [r for s in states for r in s.records],
                                   summary_trials or agent_cfg.trials)
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def evaluate_shared(env_name: str, split: str, task_indices: Sequence[int], planner, reflector,
                    agent_cfg: loop.AgentConfig, run_dir: str | pathlib.Path, *,
                    summary_trials: int | None = None, **kwargs) -> tuple[list[dict], dict]:
    """``evaluate`` of this process's share of the tasks (all of them with one process), every
    process's records gathered: (the records of all the tasks in (task, trial) order, their summary).
    ``kwargs``: those of ``evaluate``. Every process must call it (a collective)."""
    from retroact_jax import distributed
    mine = distributed.share(task_indices)
    part = distributed.part_dir(run_dir)
    summary = (evaluate(env_name, split, mine, planner, reflector, agent_cfg, part,
                        summary_trials=summary_trials, **kwargs) if mine else None)
    wanted = {int(i) for i in mine}
    recs = ([r for r in evaluation.TrajectoryLog(part / "trajectories.jsonl").load()
             if int(r["task_index"]) in wanted] if mine else [])
    if distributed.count() > 1:
        parts = distributed.allgather_json({"records": recs, "wall_s": summary["wall_s"] if summary else 0.0})
        recs = [r for p in parts for r in p["records"]]
        summary = evaluation.summarize(env_name, recs, summary_trials or agent_cfg.trials)
        summary["wall_s"] = max(p["wall_s"] for p in parts)
        summary["processes"] = len(parts)
    recs.sort(key=lambda r: (int(r["task_index"]), int(r["trial"])))
    return recs, summary
