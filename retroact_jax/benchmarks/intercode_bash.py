"""InterCode-Bash (the 200 NL2Bash tasks; metric reward, then success rate). It has no train split:
no expert, no RL collection and no few-shot exemplars (they would show evaluated tasks)."""
from retroact_jax.benchmarks import intercode

BENCHMARK = intercode.benchmark("intercode_bash", "InterCode-Bash", "bash", "ls", eval_tasks=200,
                                train_split="", released_il="")
