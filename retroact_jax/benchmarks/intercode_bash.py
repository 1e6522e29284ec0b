"""InterCode-Bash (the 200 NL2Bash tasks; metric reward, then success rate). It has no train split:
no expert, no RL collection and no few-shot exemplars (they would show evaluated tasks)."""
from retroact_jax.benchmarks import Benchmark, intercode

BENCHMARK = Benchmark(
    name="intercode_bash", label="InterCode-Bash", metrics=("reward", "success_rate"),
    eval_split="test", eval_tasks=200, train_split="", example_split="",
    env_backend="threads", released_il="",
    gold_planner=intercode.gold_planner("bash", "ls"),
    gold_reflection=intercode.gold_reflection, passes_evaluator=intercode.passes_evaluator,
    example_text=intercode.example_text, reflect_instruction=intercode.reflect_instruction)
