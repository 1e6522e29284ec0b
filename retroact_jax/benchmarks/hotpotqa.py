"""HotpotQA (distractor setting, the paper's 100 Reflexion test questions; metric F1, then EM)."""
from __future__ import annotations

import re

from retroact_jax.benchmarks import Benchmark, last_info

_CUE = re.compile(r"(Thought|Action) (\d+):$")


def cue(prompt: str) -> tuple[str, int]:
    """The last ``Thought n:`` / ``Action n:`` cue of a prompt: (kind, n), or ("", 0)."""
    m = _CUE.search(prompt)
    return (m.group(1), int(m.group(2))) if m else ("", 0)


def titles(task) -> list[str]:
    """The supporting-fact titles in order, without repeats."""
    seen = []
    for title, _ in task.data["supporting_facts"]:
        if title not in seen:
            seen.append(title)
    return seen


def gold_planner(task, prompt: str, fail: bool = False) -> str:
    """Search every supporting-fact title, then answer (``fail``: one search, a wrong answer)."""
    kind, n = cue(prompt)
    ts = titles(task)
    plan = [(f"I need to search {t} to find information relevant to the question.", f"Search[{t}]")
            for t in ts]
    answer = ts[0] if fail else task.data["answer"]
    if fail:
        plan = plan[:1]
    plan.append((f"From the observations, the answer is {answer}.", f"Finish[{answer}]"))
    thought, action = plan[min(n, len(plan)) - 1]
    return f" {thought}\n" if kind == "Thought" else f" {action}\n"


def gold_reflection(task) -> str:
    ts = titles(task)
    return (f" I searched {ts[0]} and answered with it without looking up the other entity. "
            f"Next time I should search {' and '.join(ts)} and combine the facts before "
            "giving the answer.\n")


def passes_evaluator(rec) -> bool:
    """Exact match (normalised), as the original kept expert trials."""
    return bool(last_info(rec).get("em", rec.get("success")))


def example_text(head: str, rest: str) -> str:
    return "Question: " + head.rsplit("Question: ", 1)[1] + rest


def reflect_instruction(protocol) -> str:
    from retroact_jax.agent import prompts
    return prompts.HOTPOT_REFLECT_INSTRUCTION


BENCHMARK = Benchmark(
    name="hotpotqa", label="HotpotQA", metrics=("f1", "em"), eval_split="test", eval_tasks=100,
    train_split="train", example_split="train", env_backend="threads", released_il="",
    gold_planner=gold_planner, gold_reflection=gold_reflection, passes_evaluator=passes_evaluator,
    example_text=example_text, reflect_instruction=reflect_instruction,
    expert_tasks=0,                 # all 753 train questions (the gold script takes ~10 s for them)
    min_new_tokens=2)               # its calls never end after one token (WORKSPACE.md)
