"""The stages' default configs and config helpers, importable without JAX (the entry point checks
a whole config before anything heavy loads).

* ``il_config()``: the IL stage (``stages/il.py``); defaults = RetroAct's SFT (docs/paper.md §4).
* ``rl_config()``: the RL stage (``stages/rl.py``); defaults = the original code (docs/paper.md §3.2).
* ``SCHEDULES`` / ``apply_schedule``: the RL schedules worth naming.
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections as mlc

# (train.iterations, train.epochs, optimizer.schedule) of the two RL schedules worth naming
SCHEDULES = {"original": (1, 3, "linear"), "iterated": (3, 1, "constant")}


def as_list(s: Any) -> list[str]:
    """A comma-separated config string as a list of its non-empty, stripped items."""
    return [x.strip() for x in str(s).split(",") if x.strip()]


def to_dict(c: Any) -> dict:
    return c.to_dict() if hasattr(c, "to_dict") else json.loads(json.dumps(c))


def il_config() -> mlc.ConfigDict:
    """IL defaults = RetroAct's (docs/paper.md §4): LoRA r 8 / alpha 16 / dropout 0.05 on q, v; lr 1e-4,
    100 warmup steps, linear decay, AdamW without weight decay, clip 1.0; 5 epochs; batch 1 per role."""
    c = mlc.ConfigDict()
    c.seed = 0                        # data order, held-out split, LoRA init, expert task subset
    c.model = mlc.ConfigDict()
    c.model.planner = "embedded"      # "embedded" | "qwen2.5-coder-0.5b-instruct" | HF dir | .gguf | "tiny-random"
    c.model.reflector = ""            # "" = the planner's source
    c.model.multi_agent = True        # two models (planner, reflector); False: one shared model
    c.model.param_dtype = "float32"   # float32 (CPU) | bfloat16 (accelerators)
    c.model.attention = "default"     # default (CPU) | dot_product (cuDNN on GPU) | blockwise (any; long rows)
    c.model.remat = "none"            # per-layer rematerialisation: none | dots | full | layer
    c.model.lora = True               # LoRA adapters (False: full fine-tuning)
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.lora_dropout = 0.05
    c.model.lora_targets = "q_proj,v_proj"
    c.validation = mlc.ConfigDict()   # the validation slice of the train split, never trained on (holdout.py)
    c.validation.env = ""             # the env whose train split it slices ("" = none)
    c.validation.num_tasks = 0        # its size (0 = none)
    c.validation.seed = 0             # which tasks (a seeded permutation of the train split)
    c.data = mlc.ConfigDict()
    c.data.roles = "planner,reflector"  # roles trained
    c.data.released = "alfworld_il"   # comma list of released files ("" none): alfworld_il, intercode_il
    c.data.expert_envs = ""           # comma list: hotpotqa, alfworld, intercode_sql ("" none)
    c.data.expert = "gold"            # gold (scripted) | model source: few-shot LLM expert (HotpotQA)
    c.data.expert_tasks = -1          # tasks per expert env (seeded; 0 all; -1 the benchmark's: hotpotqa all, else 100)
    c.data.expert_trials = 0          # trials per task (0: gold 2, model 10)
    c.data.expert_reflect_fraction = 0.3  # expert tasks failing trial 1 on purpose (reflector data)
    c.data.expert_batch_size = 8
    c.data.expert_env_workers = 4
    c.data.files = ""                 # comma list of sample JSONL files
    c.data.empty_reflections = "keep"  # released InterCode rows with empty reflections: keep | skip
    c.data.append_eos = True          # train input + output + eos (the original)
    c.data.max_tokens = 2048          # the original's cutoff_len
    c.data.long_rows = "truncate"     # truncate (original) | drop rows over max_tokens
    c.data.max_rows_per_role = 0      # cap on training rows per role after shuffling (0: all)
    c.data.eval_rows = 16             # held-out rows per role (eval loss)
    c.train = mlc.ConfigDict()
    c.train.epochs = 5
    c.train.max_steps = 0             # stop after this many steps (0: the epochs decide)
    c.train.rows_planner = 1          # planner rows per step (the original: batch 1)
    c.train.rows_reflector = 1
    c.train.buckets = "256,512,1024,2048"  # padded row lengths (one compile each)
    # several short rows per padded row (packing.py; needs il_normalization=tokens). Off by default:
    # the original trains one sample per optimizer step (batch 1), packing makes each step carry
    # several, and it measured 1.02x useful tokens/s (bench/README.md "bench/il_pack.py")
    c.train.pack = False
    c.train.pack_len = 0              # tokens per packed row (0: the largest bucket)
    c.train.observations = "trained"  # trained (original: whole output) | masked
    c.train.mesh = ""                 # e.g. "data=2,fsdp=-1" ("" single device)
    c.train.log_every = 10
    c.train.eval_every = 200          # held-out loss every N steps (and before / after); 0 off
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.progress = True
    c.train.peak_flops = 0.0          # per-device peak for MFU (0: known accelerators only)
    c.train.tensorboard = True
    c.train.max_update_ratio = 10.0   # stop when a role's update norm passes this x its param norm (0: off)
    c.train.head_chunk = 256          # vocabulary head + log-prob in chunks of this many positions (0: whole)
    c.train.attention = "blockwise"   # train-step attention: default | dot_product | blockwise (no [T, T] scores)
    c.train.remat = "layer"           # per-layer recompute in the backward: layer (keeps only layer inputs) | none | dots | full
    c.loss = mlc.ConfigDict()
    c.loss.il_normalization = "tokens"  # tokens (original SFT: HF mean over label tokens) | positions
    c.optimizer = mlc.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.kwargs = mlc.ConfigDict({"weight_decay": 0.0})  # HF Trainer default
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "linear"
    c.optimizer.warmup_steps = 100
    c.optimizer.total_steps = 0       # 0: the stage's step count (/ accumulate_steps)
    c.optimizer.end_lr_ratio = 0.0
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.accumulate_steps = 1
    c.export = mlc.ConfigDict()
    c.export.enabled = True           # HF safetensors (LoRA merged) + PEFT adapters at the end
    c.export.dtype = ""               # "" keep, or bfloat16 / float32
    return c


def apply_schedule(c: Any, name: str) -> None:
    """Set ``train.iterations``, ``train.epochs`` and ``optimizer.schedule`` to a named schedule."""
    if name not in SCHEDULES:
        raise ValueError(f"RL schedule {name!r}: choose one of {sorted(SCHEDULES)}")
    c.train.iterations, c.train.epochs, c.optimizer.schedule = SCHEDULES[name]


def rl_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0                        # task stream, rollout seeds, buffer order, IL draws, LoRA init
    c.method = "retroact"             # retroact (both roles, reflector in the loop) | sft_rl (planner
                                      #   only, no reflector) | sft_ei (expert iteration of the planner)
    c.env = "hotpotqa"                # hotpotqa | alfworld | intercode_sql | intercode_bash
    c.model = mlc.ConfigDict()
    c.model.planner = "embedded"      # the SFT planner: an HF dir (IL export), .gguf, a packaged name, "tiny-random"
    c.model.reflector = ""            # "" = the planner's source
    c.model.multi_agent = True        # False: single agent, one model with shared parameters
    c.model.param_dtype = "float32"
    c.model.attention = "default"     # default (CPU) | dot_product (cuDNN on GPU) | blockwise (any; long rows)
    c.model.remat = "none"            # per-layer rematerialisation: none | dots | full | layer
    c.model.lora = True               # fresh LoRA on the SFT weights (the original); False: full fine-tune
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.lora_dropout = 0.05
    c.model.lora_targets = "q_proj,v_proj"
    c.validation = mlc.ConfigDict()   # the validation slice of the train split, never trained on (holdout.py)
    c.validation.env = ""             # the env whose train split it slices ("" = none)
    c.validation.num_tasks = 0        # its size (0 = none)
    c.validation.seed = 0             # which tasks (a seeded permutation of the train split)
    c.collect = mlc.ConfigDict()
    c.collect.split = "train"
    c.collect.tasks_per_iteration = 0  # tasks rolled out per iteration (0: the whole train split)
    c.collect.trials = 10             # K trials per task (reflections between them); 1 without a reflector
    c.collect.temperature = 1.0       # exploration temperature (docs/paper.md §4)
    c.collect.reflector_temperature = 1.0
    c.collect.top_p = 1.0
    c.collect.min_new_tokens = 1      # no stop/EOS in a completion's first n tokens (vLLM min_tokens)
    c.collect.batch_size = 8          # tasks in flight
    c.collect.env_workers = 4
    c.collect.env_backend = ""        # "" = the env's default (ALFWorld processes, else threads)
    c.collect.max_steps = 0           # 0: the env's default
    c.collect.planner_max_tokens = 0  # 0: the protocol's default
    c.collect.reflector_max_tokens = 0
    c.collect.score_rows = 8          # rows per behaviour-scoring call
    c.collect.reflector_rows = 0      # failed trials per reflector call (0: all at once; fewer: less memory)
    c.collect.batch_buckets = ""      # sampler / scorer shape buckets, comma lists ("" = powers of two);
    c.collect.chunk_buckets = ""      #   fewer buckets = fewer compilations, more padding
    c.collect.cache_buckets = ""      #   (KV-cache lengths)
    c.collect.new_token_buckets = ""
    c.collect.score_buckets = ""      #   (behaviour scoring: sequence lengths)
    c.replay = mlc.ConfigDict()
    c.replay.capacity = 0             # entries per role (0: unbounded), FIFO beyond it
    c.replay.max_age = 0              # iterations an entry stays (1: latest collection only; 0: forever)
    c.replay.drop_zero_reward = True  # the original filter_json
    c.replay.max_chars = 5000         # the original filter_null (0: off)
    c.replay.max_tokens = 2048        # drop rows longer than this (0: off; else rows are cut at the bucket)
    c.il_data = mlc.ConfigDict()      # the IL regulariser's data (stages/il.load_samples sources)
    c.il_data.released = ""           # alfworld_il | intercode_il (comma list)
    c.il_data.expert_envs = ""        # expert rollouts (cached in <expert_workdir>/expert)
    c.il_data.expert_workdir = ""     # "" = this stage's workdir; the pipeline: the IL stage's
    c.il_data.expert = "gold"
    c.il_data.expert_tasks = -1
    c.il_data.expert_trials = 0
    c.il_data.expert_reflect_fraction = 0.3
    c.il_data.expert_batch_size = 8
    c.il_data.expert_env_workers = 4
    c.il_data.files = ""              # sample JSONL files, e.g. <il_workdir>/expert/<env>/il_samples.jsonl
    c.il_data.empty_reflections = "keep"
    c.train = mlc.ConfigDict()
    # The schedule of the original code (SCHEDULES["original"]): one collection round, 3 epochs over
    # it, lr linearly decayed to 0 over those steps after 100 warmup steps (HF Trainer's default).
    # The paper does not state the number of iterations. SCHEDULES["iterated"]: 3 x 1, constant lr.
    c.train.iterations = 1            # RL iterations (collect + update)
    c.train.epochs = 3                # passes over the buffer per iteration
    c.train.rows_planner = 1          # RL rows per step (the original: batch 1)
    c.train.rows_reflector = 1
    c.train.il_rows_planner = 1       # IL regulariser rows per step with planner RL rows (1:1 as the original)
    c.train.il_rows_reflector = 1
    c.train.append_eos = True         # train input + output + eos (the original)
    c.train.buckets = "256,512,1024,2048"
    c.train.observations = "trained"  # trained (original) | masked
    c.train.reflector_reward = "delta_scaled"  # delta_scaled (original code) | delta (paper Eq. 6)
    c.train.alpha = 1.0               # reflector reward coefficient
    c.train.mesh = ""
    c.train.log_every = 10
    c.train.checkpoint_every = 200    # also at the end of every iteration
    c.train.keep_checkpoints = 2
    c.train.progress = True
    c.train.tensorboard = True
    c.train.max_update_ratio = 10.0   # stop when a role's update norm passes this x its param norm (0: off)
    c.train.head_chunk = 256          # vocabulary head + log-prob in chunks of this many positions (0: whole)
    c.train.attention = "blockwise"   # train-step attention: default | dot_product | blockwise (no [T, T] scores)
    c.train.remat = "layer"           # per-layer recompute in the backward: layer (keeps only layer inputs) | none | dots | full
    c.train.peak_flops = 0.0
    c.loss = mlc.ConfigDict()
    c.loss.rl_variant = "detached_clip"  # detached_clip (original) | paper_clip | ppo_clip | rlmec_min
    c.loss.epsilon = 0.3
    c.loss.rl_normalization = "positions"
    c.loss.il_normalization = "positions"
    c.loss.il_coef = 1.0              # lambda
    c.loss.role_pooling = "per_role"
    c.loss.behaviour_dtype = "float32"  # float32 (exact) | bfloat16 (the original collator's rounding)
    c.optimizer = mlc.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.kwargs = mlc.ConfigDict({"weight_decay": 0.0})
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "linear"   # linear | cosine | constant
    c.optimizer.warmup_steps = 100
    c.optimizer.total_steps = 0       # 0: iterations x the step count of iteration 1 (schedule.json)
    c.optimizer.end_lr_ratio = 0.0
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.accumulate_steps = 1
    c.eval = mlc.ConfigDict()
    c.eval.every = 0                  # evaluate after every n-th iteration (0: off); agent limits = collect's
    c.eval.split = "test"             # test | validation (the slice of config.validation: for tuning)
    c.eval.num_tasks = 100
    c.eval.trials = 10
    c.eval.batch_size = 8
    c.eval.temperature = 0.0
    c.export = mlc.ConfigDict()
    c.export.enabled = True
    c.export.dtype = ""
    return c
