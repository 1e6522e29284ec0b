"""Quickstart, CPU-sized end to end on the embedded SmolLM2-135M-Instruct (README's first command):

    IL on expert data -> one RL iteration -> evaluation of a few tasks with 2 trials, the same
    tasks also played by the untrained and the IL models (compare.md: does training change the agent?)

on HotpotQA (the quickest environment). The IL data are the project's own expert rollouts (gold
scripts on the 753 train questions, filtered by exact match; HotpotQA has no released imitation
file); the RL iteration rolls out the IL models at temperature 1 on 2 train questions x 2 trials;
the evaluation runs the base, IL and RL models on the first test questions. Every size below is cut
for a 2-core laptop; experiments/configs/hotpotqa.py has the paper's settings.

IL settings, chosen on held-out *train* questions (README, Quickstart): the base model writes no
valid action; 40 steps at lr 1e-3 (LoRA tolerates ~10x the full fine-tuning rate of 1e-4) with the
observations masked (the loss on the thoughts and actions the agent writes, not on the Wikipedia
text it reads: at 30 steps 100% vs 79% valid actions) and the rows longer than 768 tokens dropped
(truncating them would cut the Finish step off half of the rows: the model then never answers; at
512 tokens only 25 of the 179 rows with a reflection in the prompt fit and the IL agent wrote invalid
actions after reflections: 75% valid on the eval tasks, 100% at 768).

    python -m experiments.run --config=experiments/configs/quickstart.py
"""
from experiments.configs.common import base


def get_config():
    c = base("hotpotqa")
    c.method = "retroact"
    c.run_dir = "runs/quickstart"
    c.eval.num_tasks = 3
    c.eval.compare = "base,il"           # the untrained and the IL models on the same tasks
    # --- IL: the expert on all 753 train questions (30% with a failed first trial + reflection),
    # 40 LoRA steps per role at lr 1e-3 (constant after 3 warmup steps) on the thoughts and actions
    # only (observations masked), rows over 768 tokens dropped (the original truncates at 2048)
    c.il.data.max_tokens = 768
    c.il.data.long_rows = "drop"
    c.il.data.eval_rows = 2
    c.il.train.buckets = "512,768"
    c.il.train.pack = False              # one sample per row: the 40 steps and README's figures as measured
    c.il.train.epochs = 1
    c.il.train.max_steps = 40
    c.il.train.observations = "masked"
    c.il.train.eval_every = 40           # = max_steps: held-out loss before and after only
    c.il.train.log_every = 5
    c.il.train.attention = "default"     # <= 768-token rows: full scores are small and compile 2-3x faster
    #                                      (train.remat = "layer", the default: one layer's scores at a time)
    c.il.optimizer.learning_rate = 1e-3
    c.il.optimizer.schedule = "constant"
    c.il.optimizer.warmup_steps = 3
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
    c.rl.collect.score_rows = 2          # behaviour scoring 2 rows at a time: a forward's temp grows with
    #                                      rows x length (8 x 2048: 1.4 GB, the RL stage's peak; 2: ~0.4)
    c.rl.replay.drop_zero_reward = False  # the untrained model rarely scores: keep R = 0 rows
    c.rl.replay.max_chars = 0             # keep long rows (the original drops > 5000 chars)
    c.rl.replay.max_tokens = 0            # rows are cut at the bucket instead of dropped
    c.rl.train.buckets = "512"
    c.rl.train.log_every = 1
    c.rl.train.attention = "default"
    c.rl.optimizer.learning_rate = 1e-4
    c.rl.optimizer.warmup_steps = 1
    # --- evaluation: 3 test questions x 2 trials, with the RL, IL and base models
    c.eval.trials = 2
    c.eval.batch_size = 3
    c.eval.planner_max_tokens = 48
    c.eval.reflector_max_tokens = 48
    c.eval.cache_buckets = c.rl.collect.cache_buckets   # as the RL rollouts: few shapes to compile
    c.eval.chunk_buckets = c.rl.collect.chunk_buckets
    return c
