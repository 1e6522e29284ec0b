"""What InterCode-SQL and InterCode-Bash share: the evaluator, the exemplar text, and the plain gold
script (execute the gold command, then submit) that Bash uses; SQL passes its own script, which
looks at the database first (intercode_sql.py)."""
from __future__ import annotations

from retroact_jax.benchmarks.hotpotqa import cue


def gold_planner(lang: str, listing: str):
    """Execute the gold command, then submit (``fail``: run ``listing`` instead of the gold)."""
    def planner(task, prompt: str, fail: bool = False) -> str:
        _, n = cue(prompt)
        if n == 1:
            code = listing if fail else task.data["gold"]
            return (f" I should write a {lang} command that answers the question.\n"
                    f"Action 1: execute[{code}]\nObservation")
        return (f" The output answers the question, so I can submit it.\nAction {n}: submit\n"
                "Observation")
    return planner


def gold_reflection(task) -> str:
    return (" I submitted the output of a command that only listed what exists instead of "
            f"answering the question. I should have executed {task.data['gold']} and then "
            "submitted its output.\n")


def passes_evaluator(rec) -> bool:
    """InterCode's reward exactly 1."""
    return float(rec.get("score", 0.0)) == 1.0


def example_text(head: str, rest: str) -> str:
    return "Question: " + head.rsplit("Question: ", 1)[1] + rest


def reflect_instruction(protocol) -> str:
    from retroact_jax.agent import prompts
    return prompts.reflexion_instruction(protocol.task_kind)


def benchmark(name: str, label: str, lang: str, listing: str, eval_tasks: int, train_split: str,
              released_il: str, planner=None, reflection=None, example_ok=None):
    """An InterCode benchmark: the plain gold script with its language's gold and listing command,
    unless ``planner`` / ``reflection`` (the benchmark's own scripts) replace it; ``example_ok``
    filters the train tasks exemplars may come from."""
    from retroact_jax.benchmarks import Benchmark
    return Benchmark(
        name=name, label=label, metrics=("reward", "success_rate"), eval_split="test",
        eval_tasks=eval_tasks, train_split=train_split, example_split=train_split,
        env_backend="threads", released_il=released_il, gold_planner=planner or gold_planner(lang, listing),
        gold_reflection=reflection or gold_reflection, passes_evaluator=passes_evaluator,
        example_text=example_text, reflect_instruction=reflect_instruction, example_ok=example_ok)
