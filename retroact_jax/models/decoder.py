"""Flax NNX decoder-only transformer (Llama-2/3, SmolLM2, Qwen2 by ``ModelConfig``) with a KV cache.

Module tree = the naming contract in ``config.py`` (``embed_tokens``, ``layers`` (``nnx.List``),
``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``norm``, ``lm_head``), so checkpoint
conversion (``convert.py``) is mechanical.

Numerics (matching transformers' PyTorch Llama/Qwen2): RMSNorm in float32, result cast to the compute
dtype before the scale; RoPE with ``rope_theta``, Llama-3 or linear scaling, HF ``rotate_half`` layout
(first half / second half of each head), cos/sin computed in float32; grouped-query attention without
repeating KV heads (queries are reshaped to ``[B, T, K, G, H]``, head ``n = k * G + g`` as HF's
``repeat_kv``); softmax in float32; SiLU-gated MLP; tied or untied head.

Calling convention (left-padded batches)::

    logits, cache = model(tokens_BxT, positions_BxT, valid_BxT, cache=None, last_only=False)

``positions_BxT`` come from the caller (``positions_from_mask`` for a fresh batch,
``positions_after(cache, valid_BxT)`` for an extension). Without a cache the T tokens attend to valid
keys at index <= their own. With a ``KVCache`` the T new tokens are written at slots
``[end, end + T)`` (invalid tokens are written as invalid slots: holes are fine), each query attends to
valid slots <= its own slot, and the cache comes back with ``end + T``. ``last_only`` returns the
logits of the last position only ([B, V]); left padding keeps every row's last token there.

LoRA hook (for ``models/lora.py``): ``Linear`` adds ``(x @ lora_a) @ lora_b * lora_scale`` when the
attributes ``lora_a`` ([in, r]) and ``lora_b`` ([r, out]), typically ``nnx.LoRAParam``, are set on it;
``lora_scale`` is a plain Python float attribute (static, default 1.0). Nothing else changes.
"""
from __future__ import annotations

import math

import flax.core
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from retroact_jax.models import attention as attn_lib
from retroact_jax.models import recompute
from retroact_jax.models.attention import Mask
from retroact_jax.models.config import ModelConfig
from retroact_jax.models.rope import apply_rope, rope_cos_sin, rope_inv_freq  # noqa: F401


def _dtype(name: str):
    return jnp.dtype(name)


def _bcast(vec, ndim: int):
    """[F] -> [1, ..., 1, F] (explicit ranks: tests run with jax_numpy_rank_promotion='raise')."""
    return vec.reshape((1,) * (ndim - 1) + vec.shape)


# ----------------------------------------------------------------------------------------- layers
@jax.custom_vjp
def matmul(x_NxI, w_IxO):
    """``x @ w`` (any leading dims) whose weight gradient is a plain GEMM: see ``_matmul_bwd``."""
    return x_NxI @ w_IxO


def _matmul_fwd(x_NxI, w_IxO):
    return x_NxI @ w_IxO, (x_NxI, w_IxO)


def _matmul_bwd(res, dy_NxO):
    """``dx = dy w^T``, ``dw = x^T dy`` over all tokens. Left to itself, XLA:CPU folds the transpose
    of ``x`` into the dot (contracting dim 0 of both operands) and runs it as a slower Eigen dot;
    the optimisation barrier keeps ``x^T`` a real [in, tokens] copy (a few MB), so the weight
    gradient is a plain [in, tokens] x [tokens, out] GEMM in XLA's faster (YNNPACK) dot."""
    x, w = res
    x_TxI = x.reshape(-1, x.shape[-1])
    dy_TxO = dy_NxO.reshape(-1, dy_NxO.shape[-1])
    x_IxT = jax.lax.optimization_barrier(x_TxI.T)
    return dy_NxO @ w.T, x_IxT @ dy_TxO


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias) (+ (x @ lora_a) @ lora_b * lora_scale)``; kernel is [in, out]."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 param_dtype="float32", dtype="float32", rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=1.0 / math.sqrt(in_features))
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), _dtype(param_dtype)))
        self.bias = (nnx.Param(jnp.zeros((out_features,), _dtype(param_dtype))) if use_bias
                     else None)
        self.dtype = _dtype(dtype)
        self.lora_a = nnx.data(None)   # set to nnx.LoRAParam [in, r] by models/lora.py
        self.lora_b = nnx.data(None)   # [r, out]
        self.lora_scale = 1.0

    def __call__(self, x):
        x = x.astype(self.dtype)
        y = matmul(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + _bcast(self.bias[...].astype(self.dtype), y.ndim)
        if self.lora_a is not None:
            delta = (x @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
            y = y + delta * jnp.asarray(self.lora_scale, self.dtype)
        return y


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, param_dtype="float32", dtype="float32",
                 rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=1.0 / math.sqrt(dim))   # tied logits ~ N(0, 1)
        self.embedding = nnx.Param(init(rngs.params(), (vocab, dim), _dtype(param_dtype)))
        self.dtype = _dtype(dtype)

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x):
        """Tied head: ``x @ embedding.T``."""
        return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype="float32", dtype="float32"):
        self.scale = nnx.Param(jnp.ones((dim,), _dtype(param_dtype)))
        self.eps = eps
        self.dtype = _dtype(dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * _bcast(self.scale[...].astype(self.dtype), y.ndim)


# ------------------------------------------------------------------------------------------ cache
@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values ``[B, S, K, H]`` (compute dtype), slot validity, next write slot.

    ``end`` is shared by all rows (lock-step writes); rows with fewer tokens leave invalid holes.
    """
    k: tuple          # L arrays [B, S, K, H]
    v: tuple          # L arrays [B, S, K, H]
    valid_BxS: jax.Array
    end: jax.Array    # int32 scalar

    @staticmethod
    def init(cfg: ModelConfig, batch: int, length: int, mesh=None) -> "KVCache":
        """Zeros; with a ``mesh`` (of more than one device) created sharded in place: rows over the
        batch axes (data, fsdp) and KV heads over ``tensor`` where they divide (``shardings``)."""
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        dt = _dtype(cfg.dtype)

        def zeros():
            return KVCache(k=tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
                           v=tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
                           valid_BxS=jnp.zeros((batch, length), bool),
                           end=jnp.zeros((), jnp.int32))
        if mesh is None or mesh.size == 1:
            return zeros()
        return jax.jit(zeros, out_shardings=KVCache.shardings(cfg, batch, mesh))()

    @staticmethod
    def shardings(cfg: ModelConfig, batch: int, mesh) -> "KVCache":
        P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
        rows = ("data", "fsdp")
        lead = rows if batch % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else None
        heads = "tensor" if cfg.num_kv_heads % mesh.shape["tensor"] == 0 else None
        kv = NS(mesh, P(lead, None, heads, None))
        return KVCache(k=(kv,) * cfg.num_layers, v=(kv,) * cfg.num_layers,
                       valid_BxS=NS(mesh, P(lead, None)), end=NS(mesh, P()))

    @property
    def batch(self) -> int:
        return self.valid_BxS.shape[0]

    @property
    def length(self) -> int:
        return self.valid_BxS.shape[1]

    def lengths(self):
        """Valid tokens per row [B] (= the position of the next token)."""
        return jnp.sum(self.valid_BxS, axis=1, dtype=jnp.int32)


def positions_from_mask(valid_BxT):
    """Positions of a left-padded (or holed) batch: number of valid tokens before each token."""
    return jnp.maximum(jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1) - 1, 0)


def positions_after(cache: KVCache, valid_BxT):
    """Positions of new tokens appended to ``cache``: they continue each row's count."""
    return cache.lengths()[:, None] + positions_from_mask(valid_BxT) * valid_BxT.astype(jnp.int32)


# ------------------------------------------------------------------------------------------ model
class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, nq, nk = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        kw = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
        self.q_proj = Linear(d, nq * h, use_bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(d, nk * h, use_bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(d, nk * h, use_bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(nq * h, d, use_bias=False, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = nq, nk, h

    def __call__(self, x_BxTxD, cos, sin, mask: Mask, full_BxTxS=None, kv=None, end=None, *,
                 impl: str = "default", block: int = 512):
        """``kv=(k_BxSxKxH, v_BxSxKxH)`` is a cache to write at ``end``; returns (y, new kv).
        ``impl`` / ``block``: the attention form (``attention.py``); ``full_BxTxS``: the boolean
        mask when the form uses one (computed once per forward)."""
        b, t, _ = x_BxTxD.shape
        nk, h = self.num_kv_heads, self.head_dim
        g = self.num_heads // nk
        q = apply_rope(self.q_proj(x_BxTxD).reshape(b, t, nk * g, h), cos, sin)
        k = apply_rope(self.k_proj(x_BxTxD).reshape(b, t, nk, h), cos, sin)
        v = self.v_proj(x_BxTxD).reshape(b, t, nk, h)
        if kv is not None:
            zero = jnp.zeros((), jnp.int32)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (zero, end, zero, zero))
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (zero, end, zero, zero))
        q = q.reshape(b, t, nk, g, h) * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
        if kv is None:
            o = attn_lib.attend(impl, q, k, v, mask, full_BxTxS, block)
        else:
            o = attn_lib.attend_cached(impl, q, k, v, mask, full_BxTxS, block)
        return self.o_proj(o), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, **kw)
        self.up_proj = Linear(d, f, **kw)
        self.down_proj = Linear(f, d, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **kw)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask: Mask, full_BxTxS=None, kv=None, end=None, *,
                 impl: str = "default", block: int = 512):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, full_BxTxS, kv, end,
                               impl=impl, block=block)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Decoder(nnx.Module):
    """The causal LM. See the module docstring for the calling convention."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.rope_scaling is not None:   # hashable, so the graphdef can be a jit static arg
            cfg = cfg.replace(rope_scaling=flax.core.FrozenDict(cfg.rope_scaling))
        self.cfg = cfg
        kw = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, rngs=rngs, **kw))

    @classmethod
    def abstract(cls, cfg: ModelConfig) -> "Decoder":
        """The module with ``ShapeDtypeStruct`` leaves: no weights allocated (``nnx.eval_shape``)."""
        return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))

    def hidden(self, tokens_BxT, positions_BxT=None, valid_BxT=None, cache: KVCache | None = None,
               segments_BxT=None):
        """Final-norm hidden states [B, T, D] and the updated cache (no head). ``segments_BxT``
        (packed training rows, no cache): tokens attend within their own segment only; the caller's
        positions restart at 0 in each segment (``batching.collate``)."""
        b, t = tokens_BxT.shape
        if segments_BxT is not None and cache is not None:
            raise ValueError("packed rows (segments_BxT) are for training: not with a KV cache")
        if valid_BxT is None:
            valid_BxT = jnp.ones((b, t), bool)
        valid_BxT = valid_BxT.astype(bool)
        if positions_BxT is None:
            positions_BxT = positions_from_mask(valid_BxT)
        dt = _dtype(self.cfg.dtype)
        cos, sin = rope_cos_sin(rope_inv_freq(self.cfg), positions_BxT, dt)
        x = _shard_batch(self.embed_tokens(tokens_BxT))
        impl, block = self.cfg.attention, self.cfg.attention_block
        if cache is None:
            mask = Mask(qslot_T=jnp.arange(t, dtype=jnp.int32), kvalid_BxS=valid_BxT,
                        segment_BxS=None if segments_BxT is None else segments_BxT.astype(jnp.int32))
            full = None if impl == "blockwise" else mask.full()
            policy = attn_lib.remat_policy(self.cfg.remat)
            for layer in self.layers:
                if self.cfg.remat == "none":
                    x, _ = layer(x, cos, sin, mask, full, impl=impl, block=block)
                elif self.cfg.remat == "layer":
                    x = recompute.layer_call(layer, x, cos, sin, mask, full, impl, block)
                else:
                    x = _remat_layer(layer, x, cos, sin, mask, full, impl, block, policy)
                x = _shard_batch(x)
            return self.norm(x), None
        end = cache.end
        valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, valid_BxT, (jnp.zeros((), jnp.int32), end))
        mask = Mask(qslot_T=end + jnp.arange(t, dtype=jnp.int32), kvalid_BxS=valid_BxS)
        full = mask.full() if impl == "dot_product" else None   # attend_cached
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, cos, sin, mask, full, (cache.k[i], cache.v[i]), end,
                              impl=impl, block=block)
            ks.append(k)
            vs.append(v)
        new = KVCache(k=tuple(ks), v=tuple(vs), valid_BxS=valid_BxS, end=end + t)
        return self.norm(x), new

    def head(self, h):
        """Logits (float32) from final hidden states."""
        if self.lm_head is None:
            out = self.embed_tokens.attend(h)
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)

    def __call__(self, tokens_BxT, positions_BxT=None, valid_BxT=None,
                 cache: KVCache | None = None, last_only: bool = False):
        h, cache = self.hidden(tokens_BxT, positions_BxT, valid_BxT, cache)
        if last_only:
            h = h[:, -1]
        return self.head(h), cache


def _shard_batch(x_BxTxD):
    """Under a mesh (``jax.set_mesh``), keep activations sharded over the batch axes (FSDP style: the
    partitioner then gathers weights instead of splitting the contraction over the hidden dim and
    replicating the rows). Uses the largest of (data, fsdp) / fsdp / data that divides the batch;
    none: left to the partitioner. No mesh: unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names):
        return x_BxTxD
    for axes in (("data", "fsdp"), ("fsdp",), ("data",)):
        n = math.prod(mesh.shape[a] for a in axes)
        if n > 1 and x_BxTxD.shape[0] % n == 0:
            spec = jax.sharding.PartitionSpec(axes, *([None] * (x_BxTxD.ndim - 1)))
            return jax.lax.with_sharding_constraint(x_BxTxD, spec)
    return x_BxTxD


def _remat_layer(layer, x, cos, sin, mask, full, impl, block, policy):
    """One decoder layer under ``jax.checkpoint`` with ``policy``: the backward recomputes what the
    policy does not save from the layer's inputs. The layer is split into a pure function (so this
    works inside plain ``jax.grad`` as well as NNX transforms); the RNG state it advances (LoRA
    dropout) is written back, and the recomputation replays the same keys."""
    gd, params, rest = nnx.split(layer, nnx.Param, ...)

    def run(params, rest, x, cos, sin, mask, full):
        inner = nnx.merge(gd, params, rest)
        y = inner(x, cos, sin, mask, full, impl=impl, block=block)[0]
        return y, nnx.state(inner, nnx.RngState)

    y, rng_state = jax.checkpoint(run, policy=policy)(params, rest, x, cos, sin, mask, full)
    nnx.update(layer, rng_state)
    return y


def set_memory_options(model: "Decoder", **options) -> "Decoder":
    """Change the static options ``attention`` / ``attention_block`` / ``remat`` of a built model
    (they live in ``model.cfg``, so jitted functions retrace with the new graphdef)."""
    unknown = set(options) - {"attention", "attention_block", "remat"}
    if unknown:
        raise ValueError(f"set_memory_options: unknown options {sorted(unknown)}")
    model.cfg = model.cfg.replace(**options)
    return model


def forward_fn(graphdef, state, tokens_BxT, positions_BxT, valid_BxT, cache=None,
               last_only=False):
    """Pure-function form for jitting: ``(graphdef, state, ...) -> (logits, cache)``."""
    model = nnx.merge(graphdef, state)
    return model(tokens_BxT, positions_BxT, valid_BxT, cache=cache, last_only=last_only)
