"""intercode_bash, every method of the paper (docs/methods.md): `python -m experiments.run --config=experiments/configs/intercode_bash.py --config.method=retroact`."""
from experiments.configs.common import base


def get_config():
    return base("intercode_bash")
