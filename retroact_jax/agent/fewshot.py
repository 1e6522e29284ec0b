"""Few-shot exemplars for the expert and the prompting baselines (ReAct, Reflexion).

The original's exemplar files are not released (docs/paper.md §7), so exemplars are written here from
the packs' gold data of the *training* splits (never the evaluated tasks): the gold scripts of
gold.py are played through the real environment and the trial loop, and the resulting trajectories
are rendered in exactly the inference format (so an exemplar reads like the trajectory the model is
asked to continue). Planner exemplars are solved trajectories; reflector exemplars are scripted
failures followed by a reflection naming the gold plan (Reflexion's "STATUS: FAIL ... New plan:").

What an exemplar shows is its benchmark's gold script (retroact_jax/benchmarks/): HotpotQA searches
the supporting-fact titles, then answers; ALFWorld plays the walkthrough; InterCode-SQL looks at the
database first (``SHOW TABLES``, ``DESC`` of the tables the gold query reads), then runs the gold
query and submits, as InterCode's own demos read the schema (exemplars that ran the gold straight
away led SmolLM2 and Qwen2.5-Coder to query tables and columns they had never looked at).

ALFWorld exemplars are per task type (the original uses two of the task's own type); the planner
prompt picks ``examples[task_type]``. InterCode-Bash has no training split: few-shot methods are
refused there rather than showing evaluated tasks. InterCode-SQL exemplars are golds on one table
without ``LIMIT`` (``example_ok``): MariaDB breaks ``ORDER BY ... LIMIT`` ties per connection (train
task 0 gave four different ids on six connections), so such an exemplar's text, and with it the
prompt, changed from run to run; a join's exemplar was too long for the small models.
"""
from __future__ import annotations

import functools

import envs
from retroact_jax import benchmarks
from retroact_jax.agent import gold, loop, protocols, slots


def _split(env: str) -> str:
    split = benchmarks.get(env).example_split
    if not split:
        raise ValueError(f"{env}: no training split to draw few-shot exemplars from; use "
                         f"a fine-tuned method (zero-shot) for this env")
    return split


def _pick(env: str, n: int):
    """``n`` training tasks (per task type where the benchmark groups them), first in split order
    among those the benchmark's ``example_ok`` accepts."""
    e = envs.make(env, _split(env))
    try:
        ts = list(e.tasks)
    finally:
        e.close()
    ok = benchmarks.get(env).example_ok
    if ok is not None:
        ts = [t for t in ts if ok(t)]
    if not benchmarks.get(env).examples_per_type:
        return {None: ts[:n]}
    by_type: dict = {}
    for t in ts:
        if len(by_type.setdefault(t.data["task_type"], [])) < n:
            by_type[t.data["task_type"]].append(t)
    return by_type


def example_task_indices(env: str, n: int) -> set[int]:
    """Indices (in the exemplar split) of the tasks that ``n`` exemplars are drawn from."""
    return {t.index for ts in _pick(env, n).values() for t in ts}


def _run(env: str, tasks, fail: bool) -> list[dict]:
    p = protocols.protocol_for(env)
    pol = gold.gold_policy({t.index: t for t in tasks}, fail_trials=1 if fail else 0)
    runner = loop.TrialRunner(
        p, lambda n: slots.ThreadSlots(lambda: envs.make(env, _split(env), max_steps=p.max_steps), n, 1),
        pol, pol if fail else None, loop.AgentConfig(trials=2 if fail else 1, batch_size=len(tasks)))
    recs: list[dict] = []
    runner.run([loop.TaskState(t) for t in tasks], recs.append)
    return [r for r in recs if r["trial"] == 1]


def _planner_text(env: str, rec: dict) -> str:
    spans = rec["planner"]["spans"]
    return benchmarks.get(env).example_text(spans[0]["text"], "".join(s["text"] for s in spans[1:]))


@functools.lru_cache(maxsize=None)
def planner_examples(env: str, n: int = 2):
    """Solved gold trajectories: a string, or {task_type: [str]} where exemplars go by task type."""
    groups = _pick(env, n)
    out = {}
    for key, tasks in groups.items():
        recs = sorted(_run(env, tasks, fail=False), key=lambda r: r["task_index"])
        bad = [r["task_id"] for r in recs if not r["success"]]
        if bad:
            raise RuntimeError(f"{env}: the gold script did not solve training tasks {bad}")
        out[key] = [_planner_text(env, r) for r in recs]
    if benchmarks.get(env).examples_per_type:
        return out
    return "\n".join(out[None]) + "\n"


@functools.lru_cache(maxsize=None)
def reflector_examples(env: str, n: int = 2) -> str:
    """Failed trajectories with their reflection, as the reflector prompt shows them."""
    bench = benchmarks.get(env)
    groups = _pick(env, 1 if bench.examples_per_type else n)
    tasks = [t for ts in groups.values() for t in ts][:n]
    recs = sorted(_run(env, tasks, fail=True), key=lambda r: r["task_index"])
    p = protocols.protocol_for(env)
    texts = []
    for r in recs:
        if r["reflection"] is None:
            raise RuntimeError(f"{env}: the scripted failure of {r['task_id']} was not reflected on")
        prompt, gen = (s["text"] for s in r["reflection"]["spans"])
        instr = bench.reflect_instruction(p)
        texts.append(prompt[len(instr):].lstrip("\n") + gen.rstrip("\n"))
    return "\n\n".join(texts) + "\n"
