"""Shared config of the agent experiments; each ``<env>.py`` calls ``base(env, ...)``.

Every field has one line saying what it does. Sentinels instead of None (``ml_collections``
cannot type a command-line override of a None field): 0 / -1 mean "the environment's default".
"""
from __future__ import annotations

import ml_collections as mlc


def base(env: str, split: str, num_tasks: int, env_backend: str = "threads") -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.env = env                      # hotpotqa | alfworld | intercode_sql | intercode_bash
    c.split = split                  # the evaluation split of the env
    c.stages = "eval"                # comma-separated stages, run in order (eval now; il, rl later)
    c.run_dir = f"runs/{env}"        # outputs: trajectories.jsonl, results.{json,md}, metrics.png
    c.method = "retroact"            # retroact (zero-shot fine-tuned roles) | reflexion | react
    c.backbone = ""                  # label of the Table 2 row ("" = the planner model source)

    c.model = mlc.ConfigDict()
    c.model.planner = "embedded"     # "embedded" (SmolLM2-135M-Instruct), an HF dir or a .gguf file
    c.model.reflector = ""           # "" = the planner's model (single-agent); else another source
    c.model.planner_lora = ""        # LoRA adapter dir applied to the planner ("" = none)
    c.model.reflector_lora = ""      # LoRA adapter dir applied to the reflector ("" = none)
    c.model.param_dtype = "float32"  # float32 on CPU (bf16 is slower there), bfloat16 on accelerators
    c.model.attention = "default"    # default (CPU) | dot_product (cuDNN on GPU) | blockwise (any backend)
    c.model.policy = "lm"            # lm (the sampler) | scripted-gold (the env's gold actions; checks)
    c.model.incremental = True       # keep each episode's KV cache and extend it (False: re-prefill)
    # no stop/EOS in a completion's first n tokens (vLLM min_tokens); 2 on HotpotQA, whose calls never
    # end after one token, 1 elsewhere (" look\n", " submit\n" are 2 tokens); figures in WORKSPACE.md
    c.model.min_new_tokens = 2 if env == "hotpotqa" else 1

    c.eval = mlc.ConfigDict()
    c.eval.num_tasks = num_tasks     # tasks evaluated, from start_task on (paper: 100 / 134 / 100)
    c.eval.start_task = 0            # first task index of the split
    c.eval.trials = 10               # K: trials per task (paper: 10)
    c.eval.batch_size = 8            # tasks in flight (rows of the sampler batch)
    c.eval.temperature = 0.0         # planner sampling temperature (paper: 0 at test time)
    c.eval.reflector_temperature = 0.0
    c.eval.seed = 0                  # sampling seed (folded with task, trial, call)
    c.eval.max_steps = 0             # 0: env default (HotpotQA 5, ALFWorld 50, InterCode 10)
    c.eval.planner_max_tokens = 0    # 0: default (HotpotQA 250, else 100: the original's)
    c.eval.reflector_max_tokens = 0  # 0: default (HotpotQA 250, else 100)
    c.eval.memory_last = -1          # -1: default (HotpotQA all, else last 3); 0: none; n: last n
    c.eval.env_backend = env_backend # threads (I/O-bound envs) | processes (envs/pool.py workers)
    c.eval.env_workers = 4           # threads or worker processes stepping the envs
    c.eval.num_examples = 2          # few-shot exemplars (react / reflexion methods)
    c.eval.progress = True           # tqdm progress bar
    c.eval.cache_buckets = ""        # sampler KV-cache lengths / extension chunk lengths, comma lists
    c.eval.chunk_buckets = ""        #   ("" = powers of two); fewer = fewer compilations, more padding

    # Training stages (``--config.stages=il,rl,eval``). The pipeline chains them: IL starts from
    # c.model; RL starts from the IL export when the IL stage ran in this run_dir; eval uses the
    # newest export (rl > il > c.model). Each stage's own fields: retroact_jax/rl/{il,rl}_stage.py.
    from retroact_jax.rl import il_stage, rl_stage
    released = RELEASED_IL.get(env, "")
    c.il = il_stage.default_config()
    c.il.data.released = released            # the original RetroAct imitation files, where released
    c.il.data.expert_envs = "" if released else (env if env in EXPERT_ENVS else "")
    c.rl = rl_stage.default_config()
    c.rl.env = env
    c.rl.collect.min_new_tokens = c.model.min_new_tokens
    c.rl.il_data.released = released         # the IL regulariser's data (+ the IL stage's expert
    c.rl.il_data.expert_envs = ""            #   samples, added by the pipeline when they exist)
    return c


# The original RetroAct imitation files (data/retroact): ALFWorld and InterCode-SQL only.
RELEASED_IL = {"alfworld": "alfworld_il", "intercode_sql": "intercode_il"}
# Envs with a train split and a gold-script expert (rl/expert.py); InterCode-Bash has no train split.
EXPERT_ENVS = ("hotpotqa", "alfworld", "intercode_sql")
