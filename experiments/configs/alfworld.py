"""alfworld evaluation (PAPER.md §5.4): `python -m experiments.run --config=experiments/configs/alfworld.py`."""
from experiments.configs.common import base


def get_config():
    return base("alfworld", "valid_unseen", num_tasks=134, env_backend="processes")
