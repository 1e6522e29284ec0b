"""The validation slice: a seeded, fixed set of train-split tasks held out of training, for tuning.

Every choice tuned for a table (IL steps, learning rate, RL iterations, temperature, ...) is tuned on
these tasks, never on the test split. Within a run with ``validation.num_tasks = n > 0``:

* ``indices(n_train, n, seed)``: the slice = the first ``n`` of a seeded permutation of the train
  split (sorted); ``training_indices`` = every other train task, in split order;
* the IL stage's expert plays only ``training_indices`` (stages/expert.py via ``il.load_samples``);
* released IL rows that mention a slice task's instruction as a whole line (InterCode ``Question: q``,
  ALFWorld ``Your task is to: ...``; conservative: other ALFWorld games with the same goal sentence
  are dropped too) are left out (``drop_released``);
* RL collection draws its tasks from ``training_indices`` only (``rl_state`` / ``collect``);
* ``split = "validation"`` (the eval stage's ``config.split``, the RL stage's ``eval.split``) plays the
  slice's tasks of the train split instead of a test split.

Imports no JAX (config checks use it before anything heavy loads).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import numpy as np

SPLIT = "validation"


class HoldoutError(ValueError):
    pass


def indices(n_train: int, num: int, seed: int) -> list[int]:
    """The validation slice: ``num`` train-task indices from a seeded permutation, sorted."""
    if num <= 0:
        return []
    if num >= n_train:
        raise HoldoutError(f"validation.num_tasks={num} leaves no training task of the {n_train}")
    perm = np.random.default_rng([int(seed), 29]).permutation(n_train)
    return sorted(int(i) for i in perm[:num])


def training_indices(n_train: int, num: int, seed: int) -> list[int]:
    """Every train-task index outside the validation slice, in split order."""
    held = set(indices(n_train, num, seed))
    return [i for i in range(n_train) if i not in held]


def env_split(split: str, train_split: str) -> str:
    """The env split a (possibly ``validation``) split name is played on."""
    return train_split if split == SPLIT else split


def slice_tasks(env: str, train_split: str, num: int, seed: int) -> list[Any]:
    """The ``envs.Task`` objects of the validation slice."""
    import envs
    probe = envs.make(env, train_split)
    try:
        return [probe.task_at(i) for i in indices(len(probe.tasks), num, seed)]
    finally:
        probe.close()


def _pattern(instructions: Iterable[str]) -> re.Pattern | None:
    qs = sorted({q.strip() for q in instructions if q and q.strip()}, key=len, reverse=True)
    if not qs:
        return None
    return re.compile(r"(?:^|\n|: )(?:" + "|".join(re.escape(q) for q in qs) + r")[ \t]*(?:\n|$)")


def sample_text(sample: Any) -> str:
    return "".join(text for _, text in sample.spans)


def drop_released(samples: Sequence[Any], instructions: Iterable[str]) -> tuple[list[Any], int]:
    """(samples without any slice task's instruction as a whole line, how many were dropped)."""
    pat = _pattern(instructions)
    if pat is None:
        return list(samples), 0
    kept = [s for s in samples if not pat.search(sample_text(s))]
    return kept, len(samples) - len(kept)


def mentions(text: str, instructions: Iterable[str]) -> bool:
    """Whether ``text`` holds one of ``instructions`` as a whole line (tests, audits)."""
    pat = _pattern(instructions)
    return bool(pat and pat.search(text))


class Slice:
    """The validation slice of one env's train split: its indices and the tasks' instructions."""

    def __init__(self, env: str, num_tasks: int, seed: int):
        from retroact_jax import benchmarks
        self.env, self.num_tasks, self.seed = env, int(num_tasks), int(seed)
        self.train_split = benchmarks.get(env).train_split
        if not self.train_split:
            raise HoldoutError(f"{env} has no train split to hold a validation slice out of")
        tasks = slice_tasks(env, self.train_split, self.num_tasks, self.seed)
        self.indices = [int(t.index) for t in tasks]
        self.instructions = [t.instruction for t in tasks]


def from_config(v: Any) -> Slice | None:
    """A stage config's ``validation`` block ({env, num_tasks, seed}) as a ``Slice`` (None: off)."""
    if v is None or not getattr(v, "env", "") or int(getattr(v, "num_tasks", 0)) <= 0:
        return None
    return Slice(str(v.env), int(v.num_tasks), int(v.seed))
