"""Model configuration: one dataclass covers Llama-2, Llama-3 (rope scaling), SmolLM2 and Qwen2.

``ModelConfig.from_hf(config_json_dict)`` reads an HF ``config.json``; ``to_hf()`` writes one that
transformers loads. Unknown architectures and inconsistent shapes fail with the offending field named.

Parameter naming contract (the NNX module tree mirrors the HF names, so conversion is mechanical):
    embed_tokens.embedding                       [V, D]
    layers.{i}.input_layernorm.scale             [D]
    layers.{i}.self_attn.{q,k,v}_proj.kernel     [D, N*H]   (+ .bias [N*H] when attention_bias)
    layers.{i}.self_attn.o_proj.kernel           [Nq*H, D]
    layers.{i}.post_attention_layernorm.scale    [D]
    layers.{i}.mlp.{gate,up}_proj.kernel         [D, F]
    layers.{i}.mlp.down_proj.kernel              [F, D]
    norm.scale                                   [D]
    lm_head.kernel                               [D, V]     (only when not tie_word_embeddings)
HF key = "model." + path with ".kernel" -> ".weight" (transposed) and ".scale" -> ".weight";
"lm_head.weight" and "model.embed_tokens.weight" as in transformers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "llama"}


class ConfigError(ValueError):
    """A model config is malformed; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # None, or Llama-3 style: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}; "linear" {"factor"} is also accepted.
    rope_scaling: Mapping[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # Qwen2: bias on q, k, v projections
    max_position_embeddings: int = 4096
    arch: str = "llama"                   # "llama" | "qwen2" (for export)
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"                # compute dtype; RMSNorm and softmax always in float32
    # Memory options (static, not part of config.json): attention form (models/attention.py):
    # default (full float32 scores; fastest on CPU) | dot_product (jax.nn.dot_product_attention,
    # cuDNN flash on GPU in bf16/fp16) | blockwise (online softmax, never [T, S] scores)
    attention: str = "default"
    attention_block: int = 512            # blockwise: query / key block length
    remat: str = "none"                   # per-layer recompute: none | dots | full (jax.checkpoint) | layer (recompute.py)

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"ModelConfig.{f} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.arch not in ("llama", "qwen2"):
            raise ConfigError(f"ModelConfig.arch must be 'llama' or 'qwen2', got {self.arch!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ConfigError(f"ModelConfig.rope_scaling type {kind!r} is not supported "
                                  "(supported: llama3, linear)")
        for f in ("param_dtype", "dtype"):
            if getattr(self, f) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"ModelConfig.{f} must be float32/bfloat16/float16, got "
                                  f"{getattr(self, f)!r}")

        if self.attention not in ("default", "dot_product", "blockwise"):
            raise ConfigError(f"ModelConfig.attention must be default/dot_product/blockwise, got "
                              f"{self.attention!r}")
        if self.remat not in ("none", "dots", "full", "layer"):
            raise ConfigError(f"ModelConfig.remat must be none/dots/full/layer, got {self.remat!r}")
        if not isinstance(self.attention_block, int) or self.attention_block <= 0:
            raise ConfigError(f"ModelConfig.attention_block must be a positive int, got "
                              f"{self.attention_block!r}")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * per_layer + d + head

    @classmethod
    def from_hf(cls, c: Mapping[str, Any], **overrides) -> "ModelConfig":
        archs = c.get("architectures") or ["LlamaForCausalLM"]
        if archs[0] not in _ARCHS:
            raise ConfigError(f"config.json architectures={archs!r}: supported {sorted(_ARCHS)}")
        try:
            nh = int(c["num_attention_heads"])
            d = int(c["hidden_size"])
            kw = dict(
                vocab_size=int(c["vocab_size"]), hidden_size=d,
                intermediate_size=int(c["intermediate_size"]),
                num_layers=int(c["num_hidden_layers"]), num_heads=nh,
                num_kv_heads=int(c.get("num_key_value_heads") or nh),
                head_dim=int(c.get("head_dim") or d // nh),
                rope_theta=float(c.get("rope_theta", (c.get("rope_parameters") or {}).get(
                    "rope_theta", 10000.0))),
                rope_scaling=_rope_scaling(c),
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                attention_bias=bool(c.get("attention_bias", _ARCHS[archs[0]] == "qwen2")),
                max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
                arch=_ARCHS[archs[0]],
                bos_token_id=c.get("bos_token_id"),
                eos_token_id=tuple(c["eos_token_id"]) if isinstance(c.get("eos_token_id"), list)
                else c.get("eos_token_id"),
                pad_token_id=c.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a malformed field: {e}") from None
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json hidden_act={c['hidden_act']!r}: only 'silu' is supported")
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.arch]
        out: dict[str, Any] = {
            "architectures": [arch], "model_type": self.arch,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id, "torch_dtype": self.param_dtype,
        }
        if self.arch == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        return out


def _rope_scaling(c: Mapping[str, Any]) -> dict | None:
    rs = c.get("rope_scaling")
    if rs is None and isinstance(c.get("rope_parameters"), Mapping):   # transformers 5 layout
        rp = dict(c["rope_parameters"])
        rs = rp if rp.get("rope_type", "default") != "default" else None
    if rs is None:
        return None
    rs = dict(rs)
    rs.pop("rope_theta", None)
    if rs.get("rope_type", rs.get("type")) == "default":
        return None
    return rs


def tiny(arch: str = "llama", **kw) -> ModelConfig:
    """A tiny random-init config for tests (compiles in seconds)."""
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=arch == "llama", attention_bias=arch == "qwen2",
                max_position_embeddings=1024, arch=arch, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
    base.update(kw)
    return ModelConfig(**base)
