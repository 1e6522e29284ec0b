"""Memory plan of the paper's setting, checked by the compiler without the hardware.

    python -m bench.memory_plan                       # 7B and 13B, 1 / 4 / 8 fake CPU devices
    python -m bench.memory_plan --models=llama2-7b --devices=4 --full_depth

For each model shape and device count it lowers and compiles (``jax.jit(...).lower(...).compile()``
on ``jax.ShapeDtypeStruct`` inputs: no weight is allocated) the programs of an RL iteration, with the
paper config's options (bf16 base, float32 LoRA r 8 on q/v + AdamW state, attention / remat as
``experiments/configs/paper_7b.py``) and its mesh (1 device: none; 4: fsdp=4; 8: fsdp=4, tensor=2):

* ``train_joint``: the joint step of two distinct roles (planner, reflector), each with one RL row
  and one IL row of 2048 tokens (the original's batch 1 for each loss) = 4 rows;
* ``train_single``: one role's step (its RL + IL row), the SFT+RL / single-GPU case;
* ``score``: the behaviour scoring pass, 8 rows x 2048 tokens (``collect.score_rows``);
* ``decode``: one sampler decode step, batch 32, KV cache 4,096 slots (cache donated, as the sampler).

It prints one JSON object: per program and per device, ``memory_analysis()``'s argument / output /
alias / temp bytes and peak = argument + output - alias + temp, next to a hand count (weights,
LoRA, optimizer state, activations, KV cache, logits). By default each program is compiled at 1
and 2 layers and scaled per layer (``x(L) = x(1) + (L - 1) * (x(2) - x(1))``); ``--full_depth``
compiles every layer (slow on this CPU). See ``NOTES`` for where a GPU's figure can differ.
"""
from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jax._src.ad_checkpoint import saved_residuals  # noqa: E402

from retroact_jax import losses, scoring, sharding, train  # noqa: E402
from retroact_jax.models.config import ModelConfig  # noqa: E402
from retroact_jax.models.decoder import Decoder, KVCache  # noqa: E402
from retroact_jax.models.lora import LoRAConfig, apply_lora  # noqa: E402

SHAPES = {   # the HF config.json shapes of Llama-2-{7b,13b}-chat-hf
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, head_dim=128),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                       num_heads=40, num_kv_heads=40, head_dim=128),
}
MESHES = {1: {}, 4: {"fsdp": 4}, 8: {"fsdp": 4, "tensor": 2}}
GB = 1e9
HBM = 80e9
NOTES = [
    "Figures are per device, from XLA:CPU's buffer assignment of the SPMD-partitioned program.",
    "XLA:CPU has no native bf16 GEMM: it converts each bf16 weight and activation operand to a "
    "float32 copy (about 0.8 GB per 7B layer of weights) and its schedule runs the recomputation "
    "of jax.checkpoint early, so its temp shows no remat saving (tiny model: JAX residuals 1255 -> "
    "82 MB with remat=full, XLA:CPU temp 1163 -> 1046 MB). compiled_peak_GB is therefore an upper "
    "bound for a GPU/TPU. accelerator_estimate_GB = compiled arguments + outputs - aliases (exact "
    "shapes and shardings) + the residuals JAX saves for the backward after the remat policy "
    "(saved_residuals, rows divided over the batch shards) + one layer's working set + the logits "
    "(hand counts).",
    "On GPU, XLA's buffer assignment differs: other fusions (fewer/larger temporaries), cuDNN/cuBLAS "
    "workspaces (tens to hundreds of MB) and NCCL buffers are added, and the blockwise attention "
    "used here stands in for cuDNN's flash kernel (attention='dot_product' on GPU), which keeps "
    "O(T) statistics like it. The CUDA allocator (BFC) adds fragmentation; XLA_PYTHON_CLIENT_"
    "MEM_FRACTION (default 0.75) caps what JAX takes of the 80 GB unless raised.",
    "Scaled per layer unless full_depth: XLA:CPU reuses temp buffers across layers, so temp at "
    "1-2 layers scales nearly but not exactly linearly.",
    "decode: the KV cache is sharded as sampling.Sampler creates it next to mesh-sharded weights "
    "(KVCache.shardings: rows over data x fsdp, KV heads over tensor).",
]


def model_cfg(name: str, layers: int, attention: str, remat: str) -> ModelConfig:
    return ModelConfig(**{**SHAPES[name], "num_layers": layers}, param_dtype="bfloat16",
                       dtype="bfloat16", attention=attention, attention_block=512, remat=remat,
                       max_position_embeddings=4096)


def abstract_model(cfg: ModelConfig, lora: LoRAConfig, seed: int):
    def build():
        m = Decoder(cfg, rngs=nnx.Rngs(seed))
        apply_lora(m, lora, nnx.Rngs(params=seed + 1, dropout=seed + 2))
        return m
    return nnx.eval_shape(build)


def _mesh(n: int):
    return sharding.make_mesh(MESHES[n] or {"fsdp": 1}, jax.devices()[:n])


def _batch_spec(mesh, rows: int, rank: int) -> NamedSharding:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    lead = sharding.BATCH_AXES if rows % shards == 0 else None     # replicated if not divisible
    return NamedSharding(mesh, P(lead, *([None] * (rank - 1))))


def _mem(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _per_device_bytes(tree, mesh, rules=sharding.DECODER_RULES) -> int:
    """Hand count: bytes of one device's shard of every leaf under the partition rules."""
    total = 0
    shs = sharding.tree_shardings(tree, mesh, rules)
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shs)):
        if hasattr(leaf, "shape"):
            key = jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)   # LoRA dropout keys
            total += math.prod(sh.shard_shape(leaf.shape)) * (8 if key else jnp.dtype(leaf.dtype).itemsize)
    return total


# ------------------------------------------------------------------------------------- programs
def train_program(cfg, lora, mesh, roles: tuple[str, ...], tokens: int):
    models = {r: abstract_model(cfg, lora, 10 * i) for i, r in enumerate(roles)}
    rows = {r: 2 for r in roles}                       # one RL row + one IL row per role
    opt = {"name": "adamw", "learning_rate": 1e-4, "schedule": "linear", "warmup_steps": 100,
           "total_steps": 1000, "grad_clip_norm": 1.0, "kwargs": {"weight_decay": 0.0}}
    learner = train.Learner(models, optimizer=opt, rows=rows, mesh=mesh)
    B = sum(rows.values())
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=_batch_spec(mesh, B, len(shape)))  # noqa: E731
    batch = {"tokens_BxT": sds((B, tokens), jnp.int32), "positions_BxT": sds((B, tokens), jnp.int32),
             "valid_BxT": sds((B, tokens), jnp.bool_), "loss_mask_BxT": sds((B, tokens), jnp.bool_),
             "reward_BxT": sds((B, tokens), jnp.float32),
             "behaviour_logp_BxT": sds((B, tokens), jnp.float32),
             "behaviour_mask_BxT": sds((B, tokens), jnp.bool_), "role_B": sds((B,), jnp.int32),
             "objective_B": sds((B,), jnp.int32)}
    compiled = learner.lower(batch).compile()
    state = learner.state
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    hand = {"residuals": residual_bytes(learner, batch) // (shards if B % shards == 0 else 1),"weights": sum(_per_device_bytes(learner._frozen[n], mesh) for n in learner.names),
            "lora": _per_device_bytes(state["params"], mesh),
            "optimizer": _per_device_bytes(state["opt"], mesh)}
    return compiled, hand, B


def residual_bytes(learner, batch) -> int:
    """Bytes JAX keeps from the forward for the backward (``saved_residuals``: after the remat
    policy, before any backend), arguments excluded; global, i.e. all rows."""
    st = learner.state

    def loss(params, rngs, frozen, batch):
        logp, ent, _ = learner._logp(params, rngs, frozen, batch)
        return losses.joint_loss(logp, ent, batch, learner.loss_cfg)[0]

    total = 0
    for aval, why in saved_residuals(loss, st["params"], st["rngs"], learner._frozen, batch):
        if "from the argument" not in why and hasattr(aval, "shape"):
            total += math.prod(aval.shape) * aval.dtype.itemsize
    return total


def score_program(cfg, lora, mesh, rows: int, tokens: int):
    model = abstract_model(cfg, lora, 0)
    model.eval()
    gd, params = nnx.split(model)
    p_sh = sharding.tree_shardings(params, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, p_sh)
    bs = _batch_spec(mesh, rows, 2)
    tok = jax.ShapeDtypeStruct((rows, tokens), jnp.int32, sharding=bs)
    val = jax.ShapeDtypeStruct((rows, tokens), jnp.bool_, sharding=bs)
    fn = jax.jit(scoring.score_fn, static_argnums=(0, 4))
    with jax.set_mesh(mesh):
        compiled = fn.lower(gd, params, tok, val, 128).compile()
    return compiled, {"weights": _per_device_bytes(params, mesh)}


def decode_program(cfg, lora, mesh, batch: int, length: int):
    model = abstract_model(cfg, lora, 0)
    model.eval()
    gd, params = nnx.split(model)
    p_sh = sharding.tree_shardings(params, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, p_sh)
    cache = jax.eval_shape(lambda: KVCache.init(cfg, batch, length))
    cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache,
                         KVCache.shardings(cfg, batch, mesh))
    kv_sh = cache.k[0].sharding
    bs = cache.valid_BxS.sharding
    tok = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=bs)
    val = jax.ShapeDtypeStruct((batch, 1), jnp.bool_, sharding=bs)

    def step(params, cache, tokens_Bx1, valid_Bx1):
        m = nnx.merge(gd, params)
        positions = cache.lengths()[:, None]
        return m(tokens_Bx1, positions, valid_Bx1, cache=cache, last_only=True)

    fn = jax.jit(step, donate_argnums=(1,))
    with jax.set_mesh(mesh):
        compiled = fn.lower(params, cache, tok, val).compile()
    kv_bytes = sum(math.prod(kv_sh.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in cache.k + cache.v)
    return compiled, {"weights": _per_device_bytes(params, mesh), "kv_cache": kv_bytes}


# --------------------------------------------------------------------------------------- driver
def hand_activations(cfg: ModelConfig, mesh, rows: int, tokens: int) -> dict:
    """Hand count of one device's transient training memory beyond the saved residuals: the
    backward of one layer recomputes its whole working set (~ T * (6 D + 3 F) bf16 per row: norms,
    q/k/v/o, gate/up/activation), and the head's float32 logits and their gradient ([T, V] x 2)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    r = rows // shards if rows % shards == 0 else rows
    tp = mesh.shape["tensor"]
    return {"layer_working_set": r * tokens * (6 * d + 3 * f // tp) * 2,
            "logits": 2 * r * tokens * (v // tp) * 4}


def run_one(name: str, n: int, layers: int, attention: str, remat: str, lora: LoRAConfig) -> dict:
    cfg = model_cfg(name, layers, attention, remat)
    mesh = _mesh(n)
    out = {}
    t0 = time.time()
    c, hand, b = train_program(cfg, lora, mesh, ("planner", "reflector"), 2048)
    out["train_joint"] = {"compiled": _mem(c), "hand": {**hand, **hand_activations(cfg, mesh, b, 2048)}}
    c, hand, b = train_program(cfg, lora, mesh, ("planner",), 2048)
    out["train_single"] = {"compiled": _mem(c), "hand": {**hand, **hand_activations(cfg, mesh, b, 2048)}}
    c, hand = score_program(cfg, lora, mesh, 8, 2048)
    out["score"] = {"compiled": _mem(c), "hand": hand}
    c, hand = decode_program(cfg, lora, mesh, 32, 4096)
    out["decode"] = {"compiled": _mem(c), "hand": hand}
    out["compile_s"] = round(time.time() - t0, 1)
    return out


def _scale(one: dict, two: dict, layers: int):
    """x(L) = x(1) + (L - 1) * (x(2) - x(1)), leaf by leaf."""
    if isinstance(one, dict):
        return {k: _scale(one[k], two[k], layers) for k in one}
    return int(one + (layers - 1) * (two - one)) if isinstance(one, int) else one


FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(SHAPES), "model shapes")
flags.DEFINE_list("devices", ["1", "4", "8"], "device counts (fake CPU devices)")
flags.DEFINE_string("attention", "blockwise", "attention form (stands in for cuDNN flash on CPU)")
flags.DEFINE_string("remat", "full", "per-layer remat policy")
flags.DEFINE_bool("full_depth", False, "compile every layer instead of scaling from 1 and 2")


def main(argv):
    del argv
    lora = LoRAConfig(rank=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj"))
    result = {"bench": "memory_plan", "backend": jax.default_backend(), "jax": jax.__version__,
              "attention": FLAGS.attention, "remat": FLAGS.remat, "dtype": "bfloat16 base, float32 LoRA + AdamW",
              "tokens_per_row": 2048, "rows": {"train_joint": "2 roles x (1 RL + 1 IL)", "train_single":
                                               "1 RL + 1 IL", "score": 8, "decode": "32, cache 4096"},
              "meshes": {str(k): v or {"single device": 1} for k, v in MESHES.items()},
              "depth": "full" if FLAGS.full_depth else "1 and 2 layers compiled, scaled per layer",
              "notes": NOTES, "plans": {}}
    for name in FLAGS.models:
        full_layers = SHAPES[name]["num_layers"]
        for n in (int(x) for x in FLAGS.devices):
            if FLAGS.full_depth:
                plan = run_one(name, n, full_layers, FLAGS.attention, FLAGS.remat, lora)
            else:
                one = run_one(name, n, 1, FLAGS.attention, FLAGS.remat, lora)
                two = run_one(name, n, 2, FLAGS.attention, FLAGS.remat, lora)
                plan = _scale(one, two, full_layers)
                plan["compile_s"] = one["compile_s"] + two["compile_s"]
            for prog in ("train_joint", "train_single", "score", "decode"):
                p = plan[prog]
                p["compiled_peak_GB"] = round(p["compiled"]["peak"] / GB, 2)
                p["hand_total_GB"] = round(sum(p["hand"].values()) / GB, 2)
                p["compiled_fits_80GB"] = p["compiled"]["peak"] <= HBM
                if "residuals" in p["hand"]:   # train: what a remat-honouring bf16 backend needs
                    c = p["compiled"]
                    est = (c["argument"] + c["output"] - c["alias"] + p["hand"]["residuals"]
                           + p["hand"]["layer_working_set"] + p["hand"]["logits"])
                    p["accelerator_estimate_GB"] = round(est / GB, 2)
                    p["estimate_fits_80GB"] = est <= HBM
            # one RL process holds the learner's state and the sampler's cache at once; the base
            # weights are one copy (the Learner hands its placed weights to the sampler)
            dec = plan["decode"]["hand"]
            plan["rl_process_estimate_GB"] = round(
                (plan["train_joint"]["accelerator_estimate_GB"] * GB + dec["kv_cache"]
                 + plan["decode"]["compiled"]["temp"]) / GB, 2)
            result["plans"][f"{name}/{n}dev"] = plan
            print(f"{name} {n} devices: " + ", ".join(
                f"{p} {plan[p]['compiled_peak_GB']} GB" for p in ("train_joint", "train_single",
                                                                  "score", "decode")),
                file=__import__("sys").stderr, flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
