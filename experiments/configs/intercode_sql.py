"""intercode_sql evaluation (PAPER.md §5.4): `python -m experiments.run --config=experiments/configs/intercode_sql.py`."""
from experiments.configs.common import base


def get_config():
    return base("intercode_sql", "test", num_tasks=100, env_backend="threads")
