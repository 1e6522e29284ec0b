"""Environments: HotpotQA, ALFWorld, InterCode-SQL, InterCode-Bash behind one protocol.

``envs.make(name, split, **kwargs)`` builds one env; back ends are imported lazily so that
``import envs`` stays cheap and a missing optional back end names itself only when used.
"""
from __future__ import annotations

import importlib

from envs.base import Env, EnvError, StepResult, Task

# name -> "module:Class". Each class takes (split, max_steps=None, **kwargs).
REGISTRY: dict[str, str] = {
    "hotpotqa": "envs.hotpotqa:HotpotQAEnv",
    "alfworld": "envs.alfworld:ALFWorldEnv",
    "intercode_sql": "envs.intercode_sql:InterCodeSQLEnv",
    "intercode_bash": "envs.intercode_bash:InterCodeBashEnv",
}


def env_class(name: str) -> type[Env]:
    if name not in REGISTRY:
        raise EnvError(f"unknown env {name!r}; known: {sorted(REGISTRY)}")
    mod, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def make(name: str, split: str = "test", **kwargs) -> Env:
    """Build env ``name`` on ``split``; kwargs go to the env class (e.g. ``max_steps``)."""
    return env_class(name)(split=split, **kwargs)


__all__ = ["Env", "EnvError", "StepResult", "Task", "REGISTRY", "env_class", "make"]
