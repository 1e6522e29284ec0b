"""What each benchmark knows, behind one interface: one module per benchmark.

A ``Benchmark`` names its environment (``envs.make(name, split)``), its splits (evaluation, the
train split RL collects on and the expert plays, the split few-shot exemplars come from), its
metrics (the first is the Table 2 metric), the released imitation file where RetroAct released
one, and its scripts: the gold planner and reflection (``agent.gold``, the expert of
``stages.expert``, the few-shot exemplars of ``agent.fewshot``) and the evaluator that accepts a
trial for imitation data (docs/paper.md §2.1). Nothing outside this package switches on an env name.

    bench = benchmarks.get("hotpotqa")
    bench.metrics, bench.train_split, bench.gold_planner(task, prompt)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping


class BenchmarkError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str                        # the env's registry name
    label: str                       # column label of the results table
    metrics: tuple[str, ...]         # reported metrics, x100; the first is Table 2's
    eval_split: str                  # the paper's evaluation split
    eval_tasks: int                  # the paper's number of evaluation tasks
    train_split: str                 # RL collection and expert split ("" = none)
    example_split: str               # few-shot exemplars come from here ("" = none)
    env_backend: str                 # threads | processes (envs/pool.py; non-thread-safe envs)
    released_il: str                 # RetroAct's released imitation file ("" = none)
    gold_planner: Callable[..., str]         # (task, prompt, fail=False) -> the next completion
    gold_reflection: Callable[[Any], str]    # (task) -> a reflection naming the gold plan
    passes_evaluator: Callable[[Mapping], bool]  # a trial record the benchmark counts as solved
    example_text: Callable[[str, str], str]  # (prompt head, rest of the trial) -> exemplar text
    examples_per_type: bool = False          # exemplars grouped by ``task.data["task_type"]``
    example_ok: Callable[[Any], bool] | None = None  # (task) -> may be an exemplar (None: every task)
    reflect_instruction: Callable[[Any], str] | None = None  # (protocol) -> the reflector's
    expert_tasks: int = 100                  # expert tasks by default (a seeded subset; 0 = all)
    min_new_tokens: int = 1                  # no stop in a completion's first n tokens (WORKSPACE.md)

    @property
    def primary(self) -> str:
        return self.metrics[0]


def _registry() -> dict[str, Benchmark]:
    from retroact_jax.benchmarks import alfworld, hotpotqa, intercode_bash, intercode_sql
    return {b.name: b for b in (hotpotqa.BENCHMARK, alfworld.BENCHMARK, intercode_sql.BENCHMARK,
                                intercode_bash.BENCHMARK)}


NAMES = ("hotpotqa", "alfworld", "intercode_sql", "intercode_bash")   # the paper's table order


def get(name: str) -> Benchmark:
    reg = _registry()
    if name not in reg:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(NAMES)}")
    return reg[name]


def last_info(rec: Mapping) -> dict:
    steps = rec.get("steps") or []
    return dict(steps[-1].get("info", {})) if steps else {}
