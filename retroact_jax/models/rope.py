"""Rotary position embeddings as transformers computes them: inverse frequencies in float32 with
``rope_theta`` and Llama-3 or linear scaling, the HF ``rotate_half`` layout (first half / second half of
each head), cos/sin from float32 angles cast to the compute dtype."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from retroact_jax.models.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] in float32, with Llama-3 or linear scaling (as transformers)."""
    h = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, h, 2, dtype=np.float32) / np.float32(h))))
    inv = inv.astype(np.float32)
    rs = cfg.rope_scaling
    kind = None if rs is None else rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        inv = inv / np.float32(rs["factor"])
    elif kind == "llama3":
        factor = float(rs["factor"])
        lo, hi = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = np.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        inv = np.where(medium, smoothed, out).astype(np.float32)
    return inv


def apply_rope(x_BxTxNxH, cos_BxTxH, sin_BxTxH):
    half = x_BxTxNxH.shape[-1] // 2
    rot = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
    return x_BxTxNxH * cos_BxTxH[:, :, None, :] + rot * sin_BxTxH[:, :, None, :]


def rope_cos_sin(inv_freq: np.ndarray, positions_BxT, dtype):
    freqs = positions_BxT.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)
