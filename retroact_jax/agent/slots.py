"""Env slots: N episodes' environments, reset and stepped as a batch.

The trial loop holds ``batch_size`` episodes in flight, each in a numbered slot. ``reset`` and
``step`` take ``{slot: task}`` / ``{slot: action}`` and run them concurrently:

- ``ThreadSlots``: one ``Env`` object per slot, calls run on a thread pool. Right for I/O-bound
  back ends (InterCode-SQL talks to MariaDB, InterCode-Bash to bubblewrap sandboxes, HotpotQA is
  cheap); ``workers=1`` runs them in the calling thread, one after another.
- ``PoolSlots``: over ``envs.pool.EnvPool`` (worker processes) for CPU-bound, thread-unsafe back
  ends: TextWorld's grammar parser (ALFWorld) fails when two threads load games at once.
"""
from __future__ import annotations

import concurrent.futures as cf
from typing import Callable, Mapping

from envs.base import Env, StepResult, Task


class ThreadSlots:
    def __init__(self, make_env: Callable[[], Env], n: int, workers: int = 8):
        self.envs = [make_env() for _ in range(n)]
        self.workers = max(1, int(workers))
        self._pool = cf.ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def _map(self, fn, items):
        if self._pool is None:
            return [fn(x) for x in items]
        return list(self._pool.map(fn, items))

    def reset(self, tasks: Mapping[int, Task]) -> dict[int, str]:
        keys = list(tasks)
        return dict(zip(keys, self._map(lambda s: self.envs[s].reset(tasks[s]), keys)))

    def step(self, actions: Mapping[int, str]) -> dict[int, StepResult]:
        keys = list(actions)
        return dict(zip(keys, self._map(lambda s: self.envs[s].step(actions[s]), keys)))

    def close(self) -> None:
        for e in self.envs:
            e.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class PoolSlots:
    def __init__(self, env_name: str, split: str, n: int, workers: int, env_kwargs: dict | None = None):
        from envs.pool import EnvPool
        self.n = n
        self.pool = EnvPool(env_name, split, workers=max(1, min(workers, n)), env_kwargs=env_kwargs)

    def reset(self, tasks: Mapping[int, Task]) -> dict[int, str]:
        out = self.pool.reset_many([tasks.get(s) for s in range(self.n)])
        return {s: out[s] for s in tasks}

    def step(self, actions: Mapping[int, str]) -> dict[int, StepResult]:
        out = self.pool.step_many([actions.get(s) for s in range(self.n)])
        return {s: out[s] for s in actions}

    def close(self) -> None:
        self.pool.close()
