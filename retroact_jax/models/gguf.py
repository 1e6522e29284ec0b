"""GGUF import (llama and qwen2 architectures): ModelConfig + HF-named float32 tensors, cached.

``read_gguf(path)`` parses the metadata into a ModelConfig and dequantises every tensor with
``gguf.quants.dequantize`` into torch layout: a GGUF tensor of shape ``(in, out)`` (ggml order) holds
data of numpy shape ``(out, in)``. llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k``
for llama-arch models so its GPT-J style RoPE works; we undo it per head,
``w.reshape(n, d // n // 2, 2, in).swapaxes(1, 2).reshape(d, in)``, after which HF's
``rotate_half`` RoPE applies (qwen2 GGUFs are not permuted). No ``output.weight`` means tied
embeddings.

``load_gguf(path)`` caches the dequantised fp32 copy as an HF safetensors directory under
``envs.data.cache_dir("models", <stem>-<key>)`` (key: path, size, mtime, CACHE_VERSION), written to a
temporary folder and renamed, so concurrent first loads are safe and the second load is a lazy
safetensors read (<1 s instead of ~10 s). ``gguf_tokenizer_dir(path)`` builds ``tokenizer.json``
(via transformers, once, ~6 s) plus ``tokenizer_config.json`` (chat template, special tokens) in the
same cache folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from retroact_jax.models import safetensors_io as sio
from retroact_jax.models.config import ModelConfig

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


# Part of the cache key: bump when the conversion changes so stale caches are not reused.
CACHE_VERSION = 2


class GGUFError(ValueError):
    """A GGUF file is unreadable or describes a model this project cannot run; names the file."""


def hf_name(gguf_name: str) -> str | None:
    """HF tensor name of a GGUF tensor name (None for tensors without a counterpart)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_qk(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of a Q or K projection (torch (out, in) layout)."""
    out, inp = w_OxI.shape
    return w_OxI.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _open(path: pathlib.Path):
    import gguf
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct.error/... on garbage
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader, path: pathlib.Path) -> dict[str, Any]:
    """Scalar and string metadata (large arrays such as the vocabulary are left out)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[1] in (
                "tokens", "scores", "token_type", "merges"):
            out[key] = len(field.data)
            continue
        try:
            out[key] = field.contents()
        except Exception as e:
            raise GGUFError(f"{path}: metadata field {key!r} is unreadable ({e})") from None
    return out


def config_from_metadata(meta: dict[str, Any], n_vocab: int, has_output: bool,
                         path: pathlib.Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (llama, qwen2)")

    def get(key: str, default: Any = KeyError):
        v = meta.get(f"{arch}.{key}", default)
        if v is KeyError:
            raise GGUFError(f"{path}: metadata {arch}.{key} is missing")
        return v

    n_heads = int(get("attention.head_count"))
    d = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", d // n_heads))
    rope_scaling = None
    kind = get("rope.scaling.type", None)
    if kind not in (None, "none"):
        if kind != "linear":
            raise GGUFError(f"{path}: rope scaling {kind!r} is not supported (linear only)")
        rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}

    def tok(key: str):
        v = meta.get(f"tokenizer.ggml.{key}")
        return None if v is None else int(v)

    return ModelConfig(
        vocab_size=int(get("vocab_size", n_vocab)), hidden_size=d,
        intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
        num_heads=n_heads, num_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim, rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(str(np.float32(get("attention.layer_norm_rms_epsilon")))),  # 1e-05, not 9.99e-06
        tie_word_embeddings=not has_output, attention_bias=arch == "qwen2",
        max_position_embeddings=int(get("context_length", 4096)), arch=arch,
        bos_token_id=tok("bos_token_id"), eos_token_id=tok("eos_token_id"),
        pad_token_id=tok("padding_token_id"))


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Parse and dequantise a GGUF: (config, {HF name: float32 array in torch layout})."""
    import gguf
    path = pathlib.Path(path)
    reader = _open(path)
    meta = metadata(reader, path)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFError(f"{path}: has rope_freqs (Llama-3.1 rope scaling baked into the GGUF); "
                        "load the HF safetensors directory instead")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    cfg = config_from_metadata(meta, int(emb.shape[-1]), "output.weight" in names, path)
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise GGUFError(f"{path}: tensor {t.name!r} has no HF counterpart in a "
                            f"{cfg.arch} model")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{path}: tensor {t.name!r} uses quantisation {t.tensor_type.name}, "
                            "which gguf.quants cannot dequantise") from None
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
        if cfg.arch == "llama" and t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, cfg.num_heads)
        elif cfg.arch == "llama" and t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, cfg.num_kv_heads)
        tensors[name] = np.ascontiguousarray(w)
    try:
        sio.check_tensors(cfg, tensors, where=str(path))
    except sio.CheckpointError as e:
        raise GGUFError(str(e)) from None
    return cfg, tensors


# ------------------------------------------------------------------------------------------ caching
def cache_dir_for(path: str | os.PathLike) -> pathlib.Path:
    """The cache folder of one GGUF file (changes when the file's size or mtime changes)."""
    from envs import data
    path = pathlib.Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|v{CACHE_VERSION}".encode())
    key = key.hexdigest()[:16]
    return data.cache_dir("models") / f"{path.stem}-{key}"


def _publish(tmp: pathlib.Path, final: pathlib.Path, marker: str) -> None:
    """Rename a finished temporary folder into place; a concurrent winner (``marker`` present) is
    kept and ours discarded."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / marker).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf(path: str | os.PathLike, cache: bool = True
              ) -> tuple[ModelConfig, Any, pathlib.Path | None]:
    """(config, HF-named tensors, cache folder). With ``cache`` the tensors are a lazy view of the
    cached fp32 safetensors copy, written on the first load."""
    path = pathlib.Path(path)
    if not cache:
        cfg, tensors = read_gguf(path)
        return cfg, tensors, None
    final = cache_dir_for(path)
    weights = final / "weights"
    if not (weights / "config.json").is_file():
        cfg, tensors = read_gguf(path)
        final.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".weights-", dir=final))
        sio.write_hf_dir(tmp, cfg, tensors)
        (tmp / "source.json").write_text(json.dumps(
            {"gguf": str(path.resolve()), "created": time.time()}))
        _publish(tmp, weights, "config.json")
    cfg, tensors = sio.read_hf_dir(weights)
    return cfg, tensors, final


def gguf_tokenizer_dir(path: str | os.PathLike) -> pathlib.Path:
    """A folder with tokenizer.json + tokenizer_config.json built from the GGUF's vocabulary (cached).

    transformers builds the fast tokenizer from the GGUF (~6 s, once); later loads read the
    tokenizer.json with the ``tokenizers`` library (~0.1 s). tokenizer_config.json records the chat
    template and bos/eos/pad ids from the GGUF metadata, as HF directories do.
    """
    path = pathlib.Path(path).resolve()
    final = cache_dir_for(path) / "tokenizer"
    if (final / "tokenizer_config.json").is_file():
        return final
    from transformers import AutoTokenizer
    reader = _open(path)
    meta = metadata(reader, path)
    del reader
    try:
        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise GGUFError(f"{path}: transformers could not build a tokenizer from its vocabulary "
                        f"({type(e).__name__}: {e})") from None
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=final.parent))
    hf_tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))

    def tok_id(key: str):
        v = meta.get(f"tokenizer.ggml.{key}")
        return None if v is None else int(v)

    ids = {k: tok_id(f"{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    config = {
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"],
        "unk_token_id": ids["unknown"],
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
        "source_gguf": str(path),
    }
    for k, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"),
                   ("unk_token", "unknown")):
        if ids[key] is not None:
            config[k] = hf_tok.convert_ids_to_tokens(ids[key])
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    _publish(tmp, final, "tokenizer_config.json")
    return final

