"""Gold-action scripts per environment: a ``ScriptedPolicy`` that solves tasks from the packs' gold
data, and one that fails them in a scripted way with a matching reflection.

Uses: the ``scripted-gold`` policy of the eval stage (an end-to-end check: every trial-1 score
is the gold's), the few-shot exemplars of fewshot.py (gold and failed trajectories rendered in the
exact inference format by running them through the real env and loop), and tests.

Each benchmark's script lives in its module (``retroact_jax/benchmarks/``): HotpotQA searches the
supporting-fact titles then answers; InterCode-SQL lists the tables, DESCs the ones the gold query
reads, runs the gold and submits; InterCode-Bash executes the gold command then submits; ALFWorld
states the goal in a ``think:`` then plays the walkthrough. The scripts read the step number from
the prompt, so they are pure functions of (task, prompt).
"""
from __future__ import annotations

from typing import Mapping

from envs.base import Task
from retroact_jax import benchmarks
from retroact_jax.agent.policy import ScriptCall, ScriptedPolicy


def gold_planner(task: Task, prompt: str, fail: bool = False) -> str:
    """The gold (or, with ``fail``, a wrong) next completion of ``task`` for ``prompt``."""
    return benchmarks.get(task.env).gold_planner(task, prompt, fail)


def gold_reflection(task: Task) -> str:
    """A reflection for the scripted failure of ``task`` that names the gold plan."""
    return benchmarks.get(task.env).gold_reflection(task)


def gold_policy(tasks: Mapping[int, Task], fail_trials: int = 0) -> ScriptedPolicy:
    """Planner + reflector script: trials <= ``fail_trials`` fail on purpose, later ones are gold."""
    def script(call: ScriptCall) -> str:
        index, trial, role = call.key
        task = tasks[index]
        if role == "reflector":
            return gold_reflection(task)
        return gold_planner(task, call.prompt, fail=trial <= fail_trials)
    return ScriptedPolicy(script)
