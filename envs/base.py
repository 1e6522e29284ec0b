"""The one protocol every environment follows.

An ``Env`` holds one episode at a time: ``reset(task) -> observation``, then
``step(action_text) -> (observation, reward, done, info)`` until ``done``. To run many episodes at
once, make many envs (``envs.make`` is cheap) or use a worker pool. Model output is untrusted
input: ``step`` never raises on any string; a malformed action gets the original environment's
observation for an invalid action.

``info`` always carries:
  ``success`` (bool)   the benchmark's success rule on the episode so far (final when ``done``)
  ``score`` (float)    the benchmark's metric of the episode so far (HotpotQA F1, ALFWorld won,
                        InterCode reward); the value the evaluation tables report
  ``invalid`` (bool)   the action could not be parsed / was not valid
  ``truncated`` (bool) the episode ended because the step limit was reached
  ``steps`` (int)      steps taken in this episode
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a benchmark split. ``data`` holds what the env needs (gold answer, db, game)."""
    env: str            # benchmark name, e.g. "hotpotqa"
    split: str          # "test", "train", ...
    index: int          # position within the split (stable; the paper's task id where it has one)
    id: str             # stable id across machines
    instruction: str    # the task text the agent is given (question, NL query, game intro)
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


StepResult = tuple[str, float, bool, dict]


class EnvError(RuntimeError):
    """Misuse of an env by the *caller* (not the model): step before reset, unknown split, ..."""


class Env(abc.ABC):
    """Base class: step counting, the step limit and the info contract live here."""

    name: str = ""
    default_max_steps: int = 10

    def __init__(self, split: str = "test", max_steps: int | None = None):
        self.split = split
        self.max_steps = int(max_steps if max_steps is not None else self.default_max_steps)
        if self.max_steps < 1:
            raise EnvError(f"{self.name}: max_steps must be >= 1, got {self.max_steps}")
        self.task: Task | None = None
        self.steps = 0
        self.done = True

    # -- the task set -----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def tasks(self) -> Sequence[Task]:
        """All tasks of this env's split, in a stable order."""

    def task_at(self, i: int) -> Task:
        ts = self.tasks
        if not 0 <= i < len(ts):
            raise EnvError(f"{self.name}/{self.split}: task index {i} out of range [0, {len(ts)})")
        return ts[i]

    # -- episodes ---------------------------------------------------------------------------
    def reset(self, task: Task | int) -> str:
        if isinstance(task, int):
            task = self.task_at(task)
        if task.env != self.name:
            raise EnvError(f"task {task.id} is a {task.env!r} task, not {self.name!r}")
        self.task, self.steps, self.done = task, 0, False
        return self._reset(task)

    def step(self, action: str) -> StepResult:
        if self.task is None:
            raise EnvError(f"{self.name}: step() before reset()")
        if self.done:
            raise EnvError(f"{self.name}: step() after the episode ended; call reset()")
        if not isinstance(action, str):
            action = "" if action is None else str(action)
        self.steps += 1
        obs, reward, done, info = self._step(action)
        truncated = not done and self.steps >= self.max_steps
        info = {"invalid": False, **info, "truncated": truncated, "steps": self.steps}
        info.setdefault("success", False)
        info.setdefault("score", float(reward))
        self.done = bool(done or truncated)
        return obs, float(reward), self.done, info

    def close(self) -> None:
        """Release back-end resources (processes, connections, sandboxes)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @abc.abstractmethod
    def _reset(self, task: Task) -> str: ...

    @abc.abstractmethod
    def _step(self, action: str) -> StepResult: ...
