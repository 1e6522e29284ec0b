"""intercode_bash evaluation (PAPER.md §5.4): `python -m experiments.run --config=experiments/configs/intercode_bash.py`."""
from experiments.configs.common import base


def get_config():
    return base("intercode_bash", "test", num_tasks=200, env_backend="threads")
