"""InterCode-SQL (Spider dev tasks 0-99 in InterCode's format; metric reward, then success rate)."""
from retroact_jax.benchmarks import intercode

BENCHMARK = intercode.benchmark("intercode_sql", "InterCode-SQL", "SQL", "SHOW TABLES", eval_tasks=100,
                                train_split="train", released_il="intercode_il")
