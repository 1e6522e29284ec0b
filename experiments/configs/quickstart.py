"""Quickstart on a laptop CPU: the embedded SmolLM2-135M-Instruct as planner and reflector on a few
HotpotQA test questions (evaluation only for now; the IL and RL stages join ``stages`` when they land).

    python -m experiments.run --config=experiments/configs/quickstart.py
"""
from experiments.configs.common import base


def get_config():
    c = base("hotpotqa", "test", num_tasks=4)
    c.run_dir = "runs/quickstart"
    c.eval.trials = 2
    c.eval.batch_size = 4
    c.eval.planner_max_tokens = 64
    c.eval.reflector_max_tokens = 64
    return c
