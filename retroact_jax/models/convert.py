"""HF-named state dicts <-> the NNX ``Decoder`` (naming contract in ``config.py``).

``load_model(cfg, tensors)`` never builds a random model: the module's abstract shapes come from
``nnx.eval_shape``; each real tensor is converted (torch ``[out, in]`` -> kernel ``[in, out]``), cast to
``param_dtype`` and placed (``jax.device_put`` with its sharding when given) one at a time, so peak
host memory is about one tensor above the source. Missing, unexpected or mis-shaped tensors raise
``CheckpointError`` naming the tensor. ``to_hf_state_dict(model)`` is the inverse (numpy, HF names).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from retroact_jax.models.config import ModelConfig
from retroact_jax.models.decoder import Decoder

# Buffers some HF checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint does not match the model config; the message names the tensor."""


def nnx_path_to_hf(path: tuple) -> str:
    """``('layers', 3, 'self_attn', 'q_proj', 'kernel')`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = [str(p) for p in path]
    if parts[0] == "lm_head":
        return "lm_head." + {"kernel": "weight", "bias": "bias"}[parts[-1]]
    last = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
    return "model." + ".".join(parts[:-1] + [last])


def _is_kernel(path: tuple) -> bool:
    return str(path[-1]) == "kernel"


def to_numpy(t: Any) -> np.ndarray:
    """numpy / jax / torch (any dtype, incl. bfloat16) -> numpy, without importing torch."""
    if hasattr(t, "detach"):                       # torch.Tensor
        t = t.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def _flat_shardings(shardings: Any) -> Callable[[tuple], Any]:
    """Accept None, a callable(path) -> Sharding, a Mapping from '.'-joined NNX path, or a pytree
    (nnx.State / nested dict) of shardings matching the model state."""
    if shardings is None:
        return lambda path: None
    if callable(shardings) and not isinstance(shardings, (Mapping, nnx.State)):
        return shardings
    if isinstance(shardings, Mapping) and all(isinstance(k, str) and "." in k for k in shardings):
        return lambda path: shardings.get(".".join(map(str, path)))
    flat = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(
            shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]:
        keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in kp]
        keys = [k for k in keys if k != "value"]
        flat[".".join(map(str, keys))] = leaf
    return lambda path: flat.get(".".join(map(str, path)))


def load_model(cfg: ModelConfig, tensors: Mapping[str, Any], shardings: Any = None) -> Decoder:
    """A ``Decoder`` holding ``tensors`` (HF names; numpy, torch, jax or safetensors-lazy arrays)."""
    abstract = Decoder.abstract(cfg)
    graphdef, abs_state = nnx.split(abstract)
    sharding_of = _flat_shardings(shardings)
    keys = set(tensors.keys())
    used: set[str] = set()
    flat = []
    for path, var in nnx.to_flat_state(abs_state):
        name = nnx_path_to_hf(path)
        if name not in keys:
            raise CheckpointError(f"checkpoint lacks tensor {name!r} (model parameter "
                                  f"{'.'.join(map(str, path))}, shape {var.get_value().shape})")
        arr = to_numpy(tensors[name])
        if _is_kernel(path):
            if arr.ndim != 2:
                raise CheckpointError(f"tensor {name!r} has shape {arr.shape}, expected a matrix")
            arr = arr.T
        want = var.get_value()
        if tuple(arr.shape) != tuple(want.shape):
            exp = want.shape[::-1] if _is_kernel(path) else want.shape
            raise CheckpointError(f"tensor {name!r} has shape {tuple(to_numpy(tensors[name]).shape)}, "
                                  f"config expects {tuple(exp)}")
        arr = np.ascontiguousarray(arr.astype(want.dtype, copy=False))
        sh = sharding_of(path)
        value = jax.device_put(arr, sh) if sh is not None else jax.device_put(arr)
        flat.append((path, var.replace(value)))
        used.add(name)
        del arr
    extra = sorted(k for k in keys - used if not k.endswith(_IGNORED_SUFFIXES))
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        head = to_numpy(tensors["lm_head.weight"])
        emb = to_numpy(tensors["model.embed_tokens.weight"])
        if head.shape != emb.shape or not np.array_equal(head, emb):
            raise CheckpointError("config has tie_word_embeddings=True but the checkpoint's "
                                  "'lm_head.weight' differs from 'model.embed_tokens.weight'")
        extra.remove("lm_head.weight")
    if extra:
        raise CheckpointError(f"checkpoint has tensors the config does not use: {extra[:8]}"
                              + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""))
    state = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, state)


def to_hf_state_dict(model: Decoder) -> dict[str, np.ndarray]:
    """HF-named numpy arrays (torch layout ``[out, in]``); LoRA parameters are not included
    (merge adapters into the kernels first)."""
    return {name: np.asarray(t) for name, t in hf_tensors(model).items()}


class HFTensor:
    """One parameter in HF layout, converted when read (``np.asarray``): a writer that streams
    tensors one at a time holds one host copy, not the whole model's (0.54 GB for SmolLM2-135M)."""

    def __init__(self, value: Any, transpose: bool):
        self.value, self.transpose = value, transpose
        self.shape = tuple(reversed(value.shape)) if transpose else tuple(value.shape)
        self.dtype = np.dtype(value.dtype)

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(jax.device_get(self.value))
        arr = np.ascontiguousarray(arr.T) if self.transpose else arr
        return arr if dtype is None else arr.astype(dtype)


def hf_tensors(model: Decoder) -> dict[str, HFTensor]:
    """``to_hf_state_dict`` without the copies: {HF name: ``HFTensor``} (for ``write_hf_dir``)."""
    out: dict[str, HFTensor] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(var, nnx.LoRAParam):
            continue
        out[nnx_path_to_hf(path)] = HFTensor(var.get_value(), _is_kernel(path))
    return out
