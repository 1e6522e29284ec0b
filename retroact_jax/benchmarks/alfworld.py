"""ALFWorld (the paper's 134 valid_unseen games; metric success rate)."""
from __future__ import annotations

from retroact_jax.benchmarks import Benchmark, last_info


def step(prompt: str) -> int:
    """The number of actions taken so far in the prompt's trial (``>`` lines after the task)."""
    return prompt.rsplit("Here is the task:", 1)[-1].count("\n>") - 1


def gold_planner(task, prompt: str, fail: bool = False) -> str:
    """State the goal in a ``think:``, then play the walkthrough (``fail``: check the inventory)."""
    n = step(prompt)
    goal = task.instruction.rsplit("Your task is to: ", 1)[-1].rstrip(".")
    walk = list(task.data["walkthrough"])
    if fail:
        walk = walk[:1] + ["inventory", "inventory"]
    if n == 0:
        return f" think: To solve the task, I need to {goal}.\n"
    return f" {walk[n - 1] if n - 1 < len(walk) else 'look'}\n"


def gold_reflection(task) -> str:
    walk = "; ".join(task.data["walkthrough"])
    return (" I checked my inventory instead of acting on the objects the task needs. "
            f"In the next trial I will do: {walk}.\n")


def passes_evaluator(rec) -> bool:
    return bool(last_info(rec).get("won", rec.get("success")))


def example_text(head: str, rest: str) -> str:
    return head.split("Here is the task:\n", 1)[1] + rest


def reflect_instruction(protocol) -> str:
    from retroact_jax.agent import prompts
    return prompts.reflexion_instruction(protocol.task_kind)


BENCHMARK = Benchmark(
    name="alfworld", label="ALFWorld", metrics=("success_rate",), eval_split="valid_unseen",
    eval_tasks=134, train_split="train", example_split="valid_train", env_backend="processes",
    released_il="alfworld_il", gold_planner=gold_planner, gold_reflection=gold_reflection,
    passes_evaluator=passes_evaluator, example_text=example_text, examples_per_type=True,
    reflect_instruction=reflect_instruction)
