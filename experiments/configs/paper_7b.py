"""The paper's Llama-2-7B setting on accelerators (docs/paper.md §4): IL, then one RL round, then evaluation.

    python -m experiments.run --config=experiments/configs/paper_7b.py:alfworld,/models/Llama-2-7b-chat-hf

The argument is ``<env>[,<local Llama-2-7b-chat HF directory>]`` (env: hotpotqa | alfworld |
intercode_sql; the env's own config, experiments/configs/<env>.py, is the base, so the
env-specific fields follow the env). Everything else by ``--config.<key>=...`` as usual.

Paper / original code: LoRA r 8, alpha 16, dropout 0.05 on q_proj, v_proj (the stage defaults);
batch 1 (one RL row + one IL row per role and step), rows cut at 2048 tokens, AdamW lr 1e-4, warmup
100; IL 5 epochs with linear decay; RL: eps 0.3, lambda 1, alpha 1, exploration temperature 1, one
collection round trained for 3 epochs; K = 10 trials, greedy at test time.
The RL rate decays linearly over its 3 epochs as the original (the RL stage's default schedule: its
horizon is set once the round is collected).

Accelerator options: bfloat16 base weights and compute (float32 softmax / RMSNorm / logits / loss,
float32 LoRA + AdamW state), cuDNN flash attention (``dot_product``; on TPU use
``--config.{il,rl}.model.attention=blockwise`` and ``--config.model.attention=blockwise``), per-layer
rematerialisation, mesh ``fsdp=4,tensor=-1`` (4 or 8 devices: 4 FSDP shards x the rest as tensor
parallel; on one device pass ``--config.il.train.mesh= --config.rl.train.mesh=``). The memory this
needs per device is checked by ``python -m bench.memory_plan`` (bench/README.md).
"""
import importlib

ENVS = ("hotpotqa", "alfworld", "intercode_sql")   # InterCode-Bash has no train split (eval only)
MESH = "fsdp=4,tensor=-1"


def get_config(arg: str = "hotpotqa"):
    env, _, model_dir = str(arg).partition(",")
    if env not in ENVS:
        raise ValueError(f"paper_7b.py:<env>[,<model dir>]: env {env!r} is not one of {ENVS}")
    c = importlib.import_module(f"experiments.configs.{env}").get_config()
    c.method = "retroact"
    c.run_dir = f"runs/paper_7b/{env}"
    c.backbone = "Llama-2-7b-chat"
    c.model.planner = model_dir or "Llama-2-7b-chat-hf"   # a local HF directory (config.json + safetensors)
    c.model.param_dtype = "bfloat16"
    c.model.attention = "dot_product"
    c.eval.trials = 10                   # K
    c.eval.batch_size = 32               # tasks in flight in the sampler
    c.eval.env_workers = 16
    for stage in (c.il, c.rl):
        stage.model.attention = "dot_product"
        stage.model.remat = "full"
        stage.model.lora, stage.model.lora_rank, stage.model.lora_alpha = True, 8, 16.0
        stage.model.lora_dropout, stage.model.lora_targets = 0.05, "q_proj,v_proj"
        stage.train.mesh = MESH
        stage.train.rows_planner = stage.train.rows_reflector = 1
        stage.train.buckets = "512,1024,2048"
        stage.optimizer.learning_rate = 1e-4
        stage.optimizer.warmup_steps = 100
        stage.optimizer.grad_clip_norm = 1.0
    c.il.train.epochs = 5
    c.il.optimizer.schedule = "linear"
    c.il.data.max_tokens = 2048
    c.rl.train.iterations = 1            # one collection round (the released RL buffer)
    c.rl.train.epochs = 3
    c.rl.train.il_rows_planner = c.rl.train.il_rows_reflector = 1
    c.rl.collect.trials = 10             # K
    c.rl.collect.temperature = c.rl.collect.reflector_temperature = 1.0
    c.rl.collect.batch_size = 32         # tasks in flight in the sampler
    c.rl.collect.env_workers = 16
    c.rl.collect.score_rows = 8
    c.rl.replay.max_tokens = 2048
    c.rl.loss.epsilon, c.rl.loss.il_coef, c.rl.train.alpha = 0.3, 1.0, 1.0
    return c
