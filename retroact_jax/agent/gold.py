"""Gold-action scripts per environment: a ``ScriptedPolicy`` that solves tasks from the packs' gold
data, and one that fails them in a scripted way with a matching reflection.

Uses: the ``scripted-gold`` policy of experiments/run.py (an end-to-end check: every trial-1 score
is the gold's), the few-shot exemplars of fewshot.py (gold and failed trajectories rendered in the
exact inference format by running them through the real env and loop), and tests.

Gold: HotpotQA searches the supporting-fact titles then answers; InterCode-SQL executes the gold
SQL then submits; InterCode-Bash executes the gold command then submits; ALFWorld states the goal
in a ``think:`` then plays the game's walkthrough. The scripts read the step number from the prompt
(the last ``Thought n:`` / ``Action n:`` cue, or the number of ``>`` lines), so they are pure
functions of (task, prompt).
"""
from __future__ import annotations

import re
from typing import Mapping

from envs.base import Task
from retroact_jax.agent.policy import ScriptCall, ScriptedPolicy

_CUE = re.compile(r"(Thought|Action) (\d+):$")


def _cue(prompt: str) -> tuple[str, int]:
    m = _CUE.search(prompt)
    return (m.group(1), int(m.group(2))) if m else ("", 0)


def _alf_step(prompt: str) -> int:
    return prompt.rsplit("Here is the task:", 1)[-1].count("\n>") - 1


def hotpot_titles(task: Task) -> list[str]:
    seen = []
    for title, _ in task.data["supporting_facts"]:
        if title not in seen:
            seen.append(title)
    return seen


def gold_planner(task: Task, prompt: str, fail: bool = False) -> str:
    """The gold (or, with ``fail``, a wrong) next completion of ``task`` for ``prompt``."""
    env = task.env
    if env == "hotpotqa":
        kind, n = _cue(prompt)
        titles = hotpot_titles(task)
        plan = [(f"I need to search {t} to find information relevant to the question.", f"Search[{t}]")
                for t in titles]
        answer = titles[0] if fail else task.data["answer"]
        if fail:
            plan = plan[:1]
        plan.append((f"From the observations, the answer is {answer}.", f"Finish[{answer}]"))
        thought, action = plan[min(n, len(plan)) - 1]
        return f" {thought}\n" if kind == "Thought" else f" {action}\n"
    if env in ("intercode_sql", "intercode_bash"):
        kind, n = _cue(prompt)
        lang = "SQL" if env == "intercode_sql" else "bash"
        if n == 1:
            code = task.data["gold"] if not fail else (
                "SHOW TABLES" if env == "intercode_sql" else "ls")
            return (f" I should write a {lang} command that answers the question.\n"
                    f"Action 1: execute[{code}]\nObservation")
        return (f" The output answers the question, so I can submit it.\nAction {n}: submit\n"
                "Observation")
    if env == "alfworld":
        n = _alf_step(prompt)
        goal = task.instruction.rsplit("Your task is to: ", 1)[-1].rstrip(".")
        walk = list(task.data["walkthrough"])
        if fail:
            walk = walk[:1] + ["inventory", "inventory"]
        if n == 0:
            return f" think: To solve the task, I need to {goal}.\n"
        return f" {walk[n - 1] if n - 1 < len(walk) else 'look'}\n"
    raise ValueError(f"no gold script for env {env!r}")


def gold_reflection(task: Task) -> str:
    """A reflection for the scripted failure of ``task`` that names the gold plan."""
    env = task.env
    if env == "hotpotqa":
        titles = hotpot_titles(task)
        return (f" I searched {titles[0]} and answered with it without looking up the other entity. "
                f"Next time I should search {' and '.join(titles)} and combine the facts before "
                "giving the answer.\n")
    if env in ("intercode_sql", "intercode_bash"):
        return (" I submitted the output of a command that only listed what exists instead of "
                f"answering the question. I should have executed {task.data['gold']} and then "
                "submitted its output.\n")
    if env == "alfworld":
        walk = "; ".join(task.data["walkthrough"])
        return (" I checked my inventory instead of acting on the objects the task needs. "
                f"In the next trial I will do: {walk}.\n")
    raise ValueError(f"no gold reflection for env {env!r}")


def gold_policy(tasks: Mapping[int, Task], fail_trials: int = 0) -> ScriptedPolicy:
    """Planner + reflector script: trials <= ``fail_trials`` fail on purpose, later ones are gold."""
    def script(call: ScriptCall) -> str:
        index, trial, role = call.key
        task = tasks[index]
        if role == "reflector":
            return gold_reflection(task)
        return gold_planner(task, call.prompt, fail=trial <= fail_trials)
    return ScriptedPolicy(script)
