"""Per-layer recomputation that XLA:CPU cannot schedule early (``ModelConfig.remat = "layer"``).

``jax.checkpoint`` marks what the backward recomputes, but XLA:CPU is free to run that recomputation
as soon as its inputs exist, i.e. during the forward (its optimisation barriers are expanded away
before scheduling): the activations it was meant to drop are alive again and the compiled temp
barely shrinks (bench/README.md). Here a layer is a ``jax.custom_vjp`` whose forward keeps only the
layer's input ``x`` (weights, rope tables and mask are arguments alive anyway) and whose backward
recomputes the layer from ``x + 0 * dy[0]``: a true data dependency on the layer's cotangent, so the
recomputation cannot run before the backward reaches the layer (XLA does not fold ``0 * y`` for
floats; ``x + 0`` is ``x`` exactly, and a NaN / inf cotangent gives NaN gradients either way).
Live memory: the [B, T, D] input of every layer plus one layer's activations at a time
(SmolLM2, one 768-token row, default attention: 92 -> 8.5 MB of temp per layer).

The forward is the layer's own call and the backward is ``jax.vjp`` of that same call, so values
and gradients are the plain path's (up to XLA's fusion order). The layer's RNG state (LoRA dropout)
is an input: the recomputation draws the same masks, and the advanced state is returned to the
caller to write back into the layer.
"""
from __future__ import annotations

import functools

import jax
from flax import nnx


def _run(gd, impl, block, params, rest, x, cos, sin, mask, full):
    fresh = lambda st: jax.tree.map(lambda a: a, st)  # noqa: E731  (Variables of this trace)
    inner = nnx.merge(gd, fresh(params), fresh(rest))
    y = inner(x, cos, sin, mask, full, impl=impl, block=block)[0]
    return y, nnx.state(inner, nnx.RngState)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _layer(gd, impl, block, params, rest, x, cos, sin, mask, full):
    return _run(gd, impl, block, params, rest, x, cos, sin, mask, full)


def _layer_fwd(gd, impl, block, params, rest, x, cos, sin, mask, full):
    return _run(gd, impl, block, params, rest, x, cos, sin, mask, full), (params, rest, x, cos, sin,
                                                                          mask, full)


def _layer_bwd(gd, impl, block, res, ct):
    params, rest, x, cos, sin, mask, full = res
    dy = ct[0]
    x = x + (dy.reshape(-1)[0] * 0).astype(x.dtype)   # x + 0, but only once dy exists (see above)

    def f(p, x_):
        return _run(gd, impl, block, p, rest, x_, cos, sin, mask, full)[0]

    _, vjp = jax.vjp(f, params, x)
    dp, dx = vjp(dy)
    zeros = lambda t: jax.tree.map(_zero_ct, t)  # noqa: E731
    return dp, zeros(rest), dx, zeros(cos), zeros(sin), zeros(mask), zeros(full)


def _zero_ct(a):
    """A zero cotangent of ``a`` (float0 for integer / bool / key arrays); never materialised
    for the float ones: XLA drops the unused zeros of inputs nobody differentiates."""
    import jax.numpy as jnp
    import numpy as np
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


_layer.defvjp(_layer_fwd, _layer_bwd)


def layer_call(layer, x, cos, sin, mask, full, impl: str, block: int):
    """``layer(x, ...)[0]`` with the recomputing backward; the layer's RNG state is advanced."""
    gd, params, rest = nnx.split(layer, nnx.Param, ...)
    y, rng_state = _layer(gd, impl, block, params, rest, x, cos, sin, mask, full)
    nnx.update(layer, rng_state)
    return y
