"""hotpotqa evaluation (PAPER.md §5.4): `python -m experiments.run --config=experiments/configs/hotpotqa.py`."""
from experiments.configs.common import base


def get_config():
    return base("hotpotqa", "test", num_tasks=100, env_backend="threads")
