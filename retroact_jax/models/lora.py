"""LoRA adapters on the decoder's ``Linear`` modules: add, train, merge, save, load.

    lcfg = LoRAConfig(rank=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj"))
    apply_lora(model, lcfg, nnx.Rngs(params=0, dropout=1))
    opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)                  # only adapters train
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
    merge_lora(model); write_hf_dir(out, cfg, to_hf_state_dict(model))  # plain HF export

Defaults are RetroAct's (PEFT, r = 8, alpha = 16, dropout 0.05, q_proj and v_proj; docs/paper.md).
``y = x W (+ b) + dropout(x) A B * alpha / rank``. ``A`` ([in, r]) starts uniform in
+-1/sqrt(in) (PEFT's kaiming_uniform(a=sqrt 5)) and ``B`` ([r, out]) at zero, so a fresh adapter is
the identity. Both are ``nnx.LoRAParam`` (a subclass of ``nnx.Param``: filter with ``nnx.LoRAParam``
to train adapters only, and with ``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`` for the frozen base).

Mechanics: each targeted ``decoder.Linear`` is replaced in its parent by a ``LoRALinear`` subclass that
keeps the same ``kernel`` / ``bias`` variables (so checkpoint paths do not change) and sets the
decoder's hook attributes ``lora_a``, ``lora_b``, ``lora_scale`` (see decoder.py's docstring): the
base class computes ``x W + b + (x A) B s``. Dropout on the adapter input only is added as a
correction ``((dropout(x) - x) A) B s`` from an ``nnx.Dropout`` whose key stream lives in the module
(``rngs.dropout``), active in ``model.train()`` and off after ``model.eval()`` (jitted callers that
split the model must carry the updated RNG state out of the step, as for any NNX state).

Adapters are saved alone in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``,
keys ``base_model.model.<hf module>.lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r]).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retroact_jax.models import safetensors_io as sio
from retroact_jax.models.decoder import Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KNOWN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "lm_head")


class LoRAError(ValueError):
    """A LoRA config or adapter file is inconsistent with the model; the message says how."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8                          # r
    alpha: float = 16.0                    # scale = alpha / rank
    dropout: float = 0.05                  # on the adapter input only; off in model.eval()
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")   # Linear attribute names
    param_dtype: str = "float32"           # adapter dtype (the base keeps its own)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise LoRAError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        bad = [t for t in self.target_modules if t not in _KNOWN_TARGETS]
        if bad or not self.target_modules:
            raise LoRAError(f"LoRAConfig.target_modules {list(self.target_modules)!r}: each must be "
                            f"one of {list(_KNOWN_TARGETS)}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


class LoRALinear(Linear):
    """A ``Linear`` carrying LoRA factors (built by ``apply_lora`` from an existing Linear)."""

    def __init__(self, base: Linear, lcfg: LoRAConfig, rngs: nnx.Rngs):
        # No Linear.__init__: reuse the base's variables so paths and values are unchanged.
        self.kernel = base.kernel
        self.bias = base.bias
        self.dtype = base.dtype
        d_in, d_out = base.kernel[...].shape
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(rngs.params(), (d_in, lcfg.rank), jnp.dtype(lcfg.param_dtype),
                               -bound, bound)
        self.lora_a = nnx.LoRAParam(a)
        self.lora_b = nnx.LoRAParam(jnp.zeros((lcfg.rank, d_out), jnp.dtype(lcfg.param_dtype)))
        self.lora_scale = lcfg.scale
        self.lora_dropout = (nnx.Dropout(lcfg.dropout, rngs=rngs) if lcfg.dropout > 0 else None)

    def __call__(self, x):
        y = super().__call__(x)           # x W + b + (x A) B s  (the decoder's hook)
        drop = self.lora_dropout
        if drop is None or drop.deterministic:
            return y
        xc = x.astype(self.dtype)
        dx = drop(xc) - xc
        delta = (dx @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
        return y + delta * jnp.asarray(self.lora_scale, self.dtype)


def _linears(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Module, str, Linear]]:
    """(path, parent, attribute name, Linear) for every Linear in the model."""
    for path, module in list(nnx.iter_modules(model)):
        if isinstance(module, Linear) and path:
            parent = model
            for p in path[:-1]:
                parent = parent[p] if isinstance(p, int) else getattr(parent, p)
            yield tuple(path), parent, str(path[-1]), module


def _hf_module_name(path: tuple) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts[0] == "lm_head" else "model." + ".".join(parts)


def apply_lora(model: nnx.Module, lcfg: LoRAConfig, rngs: nnx.Rngs) -> int:
    """Add fresh adapters (identity) to every targeted Linear, in place; returns how many."""
    n = 0
    for path, parent, name, lin in _linears(model):
        if name not in lcfg.target_modules:
            continue
        if isinstance(lin, LoRALinear):
            raise LoRAError(f"{_hf_module_name(path)} already has a LoRA adapter")
        setattr(parent, name, LoRALinear(lin, lcfg, rngs))
        n += 1
    if n == 0:
        raise LoRAError(f"no Linear named {list(lcfg.target_modules)} in the model "
                        "(lm_head does not exist with tied embeddings)")
    return n


def lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
    """{HF module name: LoRALinear}."""
    return {_hf_module_name(p): m for p, _, _, m in _linears(model) if isinstance(m, LoRALinear)}


def merge_lora(model: nnx.Module) -> int:
    """Fold every adapter into its base kernel (W += A B s) and restore plain Linears, in place.
    The merged model computes what the adapted model computes in eval mode. Returns how many."""
    n = 0
    for _, parent, name, lin in _linears(model):
        if not isinstance(lin, LoRALinear):
            continue
        w = lin.kernel[...]
        delta = (lin.lora_a[...].astype(jnp.float32) @ lin.lora_b[...].astype(jnp.float32)) \
            * lin.lora_scale
        plain = Linear(1, 1, use_bias=lin.bias is not None, rngs=nnx.Rngs(0))   # 1x1 placeholder
        plain.kernel = lin.kernel
        plain.kernel[...] = (w.astype(jnp.float32) + delta).astype(w.dtype)
        plain.bias = lin.bias
        plain.dtype = lin.dtype
        setattr(parent, name, plain)
        n += 1
    return n


# ------------------------------------------------------------------------------------- save / load
def save_lora(model: nnx.Module, directory: str | os.PathLike, lcfg: LoRAConfig) -> pathlib.Path:
    """Write the adapters alone (PEFT layout)."""
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("the model has no LoRA adapters to save")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in mods.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.asarray(jax.device_get(m.lora_a[...])).T
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.asarray(jax.device_get(m.lora_b[...])).T
    sio.write_safetensors(directory / ADAPTER_WEIGHTS, tensors)
    (directory / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank, "lora_alpha": lcfg.alpha,
        "lora_dropout": lcfg.dropout, "target_modules": list(lcfg.target_modules), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False}, indent=2))
    return directory


def read_lora_config(directory: str | os.PathLike) -> LoRAConfig:
    f = pathlib.Path(directory) / ADAPTER_CONFIG
    if not f.is_file():
        raise LoRAError(f"{directory}: {ADAPTER_CONFIG} is missing")
    c = json.loads(f.read_text())
    if c.get("peft_type", "LORA") != "LORA" or c.get("use_rslora") or c.get("use_dora"):
        raise LoRAError(f"{f}: only plain LoRA adapters are supported")
    targets = c.get("target_modules") or ()
    if isinstance(targets, str):
        raise LoRAError(f"{f}: target_modules given as a regex ({targets!r}) is not supported")
    return LoRAConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]),
                      dropout=float(c.get("lora_dropout", 0.0)), target_modules=tuple(targets))


def load_lora(model: nnx.Module, directory: str | os.PathLike,
              rngs: nnx.Rngs | None = None) -> LoRAConfig:
    """Add adapters described by ``directory`` to a model without adapters and fill them."""
    lcfg = read_lora_config(directory)
    if lora_modules(model):
        raise LoRAError("the model already has LoRA adapters; load into a model without them")
    apply_lora(model, lcfg, rngs or nnx.Rngs(params=0, dropout=0))
    weights = pathlib.Path(directory) / ADAPTER_WEIGHTS
    tensors = sio.LazyTensors([weights])
    mods = lora_modules(model)
    expected = {f"base_model.model.{n}.lora_{ab}.weight" for n in mods for ab in "AB"}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise LoRAError(f"{weights}: tensors {extra[:3]} match no targeted module of this model")
    for name, m in mods.items():
        for ab, var in (("A", m.lora_a), ("B", m.lora_b)):
            key = f"base_model.model.{name}.lora_{ab}.weight"
            if key not in tensors:
                raise LoRAError(f"{weights}: tensor {key!r} is missing")
            arr = np.asarray(tensors[key]).T
            if arr.shape != var[...].shape:
                raise LoRAError(f"{weights}: tensor {key!r} has shape {arr.T.shape}, the model "
                                f"needs {var[...].shape[::-1]}")
            var[...] = jnp.asarray(arr, var[...].dtype)
    return lcfg


def lora_param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def trainable_filter() -> type:
    """The NNX filter of the parameters LoRA training updates."""
    return nnx.LoRAParam


__all__: Sequence[str] = ("LoRAConfig", "LoRALinear", "LoRAError", "apply_lora", "merge_lora",
                          "save_lora", "load_lora", "read_lora_config", "lora_modules",
                          "lora_param_count", "trainable_filter")
