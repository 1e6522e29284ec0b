"""Quickstart, CPU-sized end to end on the embedded SmolLM2-135M-Instruct (README's first command):

    IL on a slice of expert data -> one RL iteration -> evaluation of a few tasks with 2 trials

on HotpotQA (the quickest environment). The IL data are the project's own expert rollouts (gold
scripts on train questions, filtered by exact match; HotpotQA has no released imitation file); the
RL iteration rolls out the IL models at temperature 1 on 2 train questions x 2 trials; the
evaluation runs the RL models on the first test questions. Every size below is cut for a 2-core
laptop; experiments/configs/hotpotqa.py has the paper's settings.

    python -m experiments.run --config=experiments/configs/quickstart.py
"""
from experiments.configs.common import base


def get_config():
    c = base("hotpotqa")
    c.method = "retroact"
    c.run_dir = "runs/quickstart"
    c.eval.num_tasks = 3
    # --- IL: 16 expert tasks (30% with a failed first trial + reflection), 4 LoRA steps per role,
    # rows cut at 512 tokens (the original truncates at 2048)
    c.il.data.expert_tasks = 16
    c.il.data.max_tokens = 512
    c.il.data.eval_rows = 2
    c.il.train.buckets = "512"
    c.il.train.epochs = 1
    c.il.train.max_steps = 4
    c.il.train.eval_every = 4            # = max_steps: held-out loss before and after only
    c.il.train.log_every = 1
    c.il.train.attention = "default"     # 512-token rows: full scores are small and compile 2-3x faster
    c.il.optimizer.learning_rate = 3e-4
    c.il.optimizer.warmup_steps = 1
    # --- RL: one iteration: 2 train questions x 2 trials at temperature 1, one pass over the buffer
    c.rl.train.iterations = 1
    c.rl.train.epochs = 1
    c.rl.optimizer.schedule = "constant"
    c.rl.collect.tasks_per_iteration = 2
    c.rl.collect.trials = 2
    c.rl.collect.batch_size = 2
    c.rl.collect.planner_max_tokens = 48
    c.rl.collect.reflector_max_tokens = 48
    c.rl.collect.cache_buckets = "2048,4096"   # one KV-cache length for these prompts: no regrowth,
    c.rl.collect.chunk_buckets = "16,64,256,1024"  # fewer shapes to compile (bench/README.md)
    c.rl.replay.drop_zero_reward = False  # the untrained model rarely scores: keep R = 0 rows
    c.rl.replay.max_chars = 0             # keep long rows (the original drops > 5000 chars)
    c.rl.replay.max_tokens = 0            # rows are cut at the bucket instead of dropped
    c.rl.train.buckets = "512"
    c.rl.train.log_every = 1
    c.rl.train.attention = "default"
    c.rl.optimizer.learning_rate = 1e-4
    c.rl.optimizer.warmup_steps = 1
    # --- evaluation: 3 test questions x 2 trials
    c.eval.trials = 2
    c.eval.batch_size = 3
    c.eval.planner_max_tokens = 48
    c.eval.reflector_max_tokens = 48
    c.eval.cache_buckets = c.rl.collect.cache_buckets   # as the RL rollouts: few shapes to compile
    c.eval.chunk_buckets = c.rl.collect.chunk_buckets
    return c
