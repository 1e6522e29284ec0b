"""Shared config of the experiments; each ``<env>.py`` calls ``base(env)``.

Every field has one line saying what it does. Sentinels instead of None (``ml_collections``
cannot type a command-line override of a None field): "" / 0 / -1 mean "derived at run time"
(from the env's benchmark, the method, or the earlier stages), never fixed when this file is read,
so ``--config.env=alfworld`` on any env's file gets ALFWorld's data, splits and run dir.
"""
from __future__ import annotations

import ml_collections as mlc

# set per run from the top-level fields (config.model, config.multi_agent, config.env, config.method)
_DERIVED_MODEL = ("planner", "reflector", "multi_agent", "param_dtype")


def base(env: str) -> mlc.ConfigDict:
    from retroact_jax.stages import configs
    c = mlc.ConfigDict()
    c.env = env                      # hotpotqa | alfworld | intercode_sql | intercode_bash
    c.split = ""                     # evaluation split ("" = the paper's: test / valid_unseen; validation)
    c.method = "retroact"            # react | reflexion | sft | sft_ei | sft_rl | retroact (README table)
    c.methods = ""                   # comma list: several methods, one table ("" = config.method)
    c.multi_agent = True             # False: single agent, one model for both roles (retroact only)
    c.stages = ""                    # "" = the method's whole pipeline; else a subset, e.g. "eval"
    c.rl_schedule = ""               # "" = rl.train / rl.optimizer as set; original | iterated
    c.run_dir = ""                   # outputs ("" = runs/<env>): per method dirs + results.{json,md}
    c.backbone = ""                  # the table rows' backbone label ("" = the planner source's name)
    c.publish = ""                   # also copy the table's artifacts here (results/..., publish.py; "" = off)

    c.validation = mlc.ConfigDict()  # a seeded slice of the train split for tuning, never trained on
    c.validation.num_tasks = 0       #   its size (0 = none); evaluate it with split=validation
    c.validation.seed = 0            #   which tasks

    c.model = mlc.ConfigDict()
    c.model.planner = "embedded"     # "embedded" (SmolLM2-135M-Instruct), "qwen2.5-coder-0.5b-instruct"
                                     #   (opt-in: setup.sh --qwen-coder), HF dir, .gguf, "tiny-random"
    c.model.reflector = ""           # "" = the planner's source; else another (two backbones)
    c.model.planner_lora = ""        # PEFT LoRA dirs on the untrained planner, comma list merged in turn ("" none)
    c.model.reflector_lora = ""      # the same for the reflector (published Table 2 adapters: IL, then RL)
    c.model.param_dtype = "float32"  # float32 on CPU (bf16 is slower there), bfloat16 on accelerators
    c.model.attention = "default"    # default (CPU) | dot_product (cuDNN on GPU) | blockwise (any backend)
    c.model.min_new_tokens = 0       # no stop/EOS in a completion's first n tokens (vLLM min_tokens);
                                     #   0 = the benchmark's: HotpotQA 2, else 1 (WORKSPACE.md)
    c.model.policy = "lm"            # lm (the sampler) | scripted-gold (the gold script; stages=eval)
    c.model.incremental = True       # keep each episode's KV cache and extend it (False: re-prefill)

    c.eval = mlc.ConfigDict()
    c.eval.num_tasks = 0             # tasks evaluated from start_task (0 = the paper's: 100/134/100/200)
    c.eval.start_task = 0            # first task index of the split
    c.eval.trials = 10               # K: trials per task (paper: 10); 1 for methods without a reflector
    c.eval.batch_size = 8            # tasks in flight (rows of the sampler batch)
    c.eval.temperature = 0.0         # planner sampling temperature (paper: 0 at test time)
    c.eval.reflector_temperature = 0.0
    c.eval.seed = 0                  # sampling seed (folded with task, trial, call)
    c.eval.max_steps = 0             # 0: env default (HotpotQA 5, ALFWorld 50, InterCode 10)
    c.eval.planner_max_tokens = 0    # 0: default (HotpotQA 250, else 100: the original's)
    c.eval.reflector_max_tokens = 0  # 0: default (HotpotQA 250, else 100)
    c.eval.memory_last = -1          # -1: default (HotpotQA all, else last 3); 0: none; n: last n
    c.eval.env_backend = ""          # "" = the env's (ALFWorld processes, else threads) | threads | processes
    c.eval.cache_buckets = ""        # sampler KV-cache lengths / extension chunk lengths, comma lists
    c.eval.chunk_buckets = ""        #   ("" = powers of two); fewer = fewer compilations, more padding
    c.eval.env_workers = 4           # threads or worker processes stepping the envs
    c.eval.reflector_rows = 0        # failed trials per reflector call (0: all at once; fewer: less memory)
    c.eval.num_examples = 2          # few-shot exemplars (react / reflexion)
    c.eval.progress = True           # tqdm progress bar
    c.eval.compare = ""              # also evaluated on the same tasks, printed beside the trained model
                                     #   (compare.md): base (config.model) and/or il (IL exports)

    # The training stages' own fields (retroact_jax/stages/configs.py); their model sources, roles,
    # RL method and data sources are derived per method at run time (stages/pipeline.py).
    c.il = configs.il_config()
    c.rl = configs.rl_config()
    for stage in (c.il, c.rl):
        for k in _DERIVED_MODEL:
            del stage.model[k]
        del stage["validation"]      # = the top-level c.validation, per run
    del c.il.data["roles"], c.rl["env"], c.rl["method"]
    c.il.data.released = "auto"      # auto = RetroAct's file where released (ALFWorld, InterCode-SQL)
    c.il.data.expert_envs = "auto"   # auto = the expert on the env's train split where none is released
    c.rl.il_data.released = "auto"   # the IL regulariser's data: the IL stage's sources
    c.rl.il_data.expert_envs = "auto"
    c.rl.collect.min_new_tokens = 0  # 0 = config.model.min_new_tokens
    return c
