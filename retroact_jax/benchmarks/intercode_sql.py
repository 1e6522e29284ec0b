"""InterCode-SQL (Spider dev tasks 0-99 in InterCode's format; metric reward, then success rate)."""
from retroact_jax.benchmarks import Benchmark, intercode

BENCHMARK = Benchmark(
    name="intercode_sql", label="InterCode-SQL", metrics=("reward", "success_rate"),
    eval_split="test", eval_tasks=100, train_split="train", example_split="train",
    env_backend="threads", released_il="intercode_il",
    gold_planner=intercode.gold_planner("SQL", "SHOW TABLES"),
    gold_reflection=intercode.gold_reflection, passes_evaluator=intercode.passes_evaluator,
    example_text=intercode.example_text, reflect_instruction=intercode.reflect_instruction)
