"""Scoring pass: per-token log-probs of given token sequences at temperature 1.

These are the behaviour log-probs of the RL stage (RetroAct's ``ref_prob.py``): the behaviour
parameters score exactly the trained token sequences. Layout (loss-mask friendly)::

    logp_BxT[:, t] = log p(tokens[:, t] | valid tokens[:, <t])

and 0 where the token is padding and at each row's first valid token (nothing predicts it). Rows
are left- or right-padded or holed: ``valid_BxT`` marks real tokens and positions follow from it.

``score_fn(graphdef, params, tokens_BxT, valid_BxT)`` is the pure function (jit it with shardings);
``Scorer`` buckets batch and length (power-of-two by default) so scoring never recompiles within a
bucket, and trims the result back to the caller's shape. The vocabulary head is applied in chunks
of ``chunk`` positions so a [B, T, V] logits array is never materialised at once.
"""
from __future__ import annotations

import collections
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retroact_jax import losses, sharding
from retroact_jax.models.decoder import positions_from_mask

TRACE_COUNTS: collections.Counter = collections.Counter()
POW2 = tuple(2 ** i for i in range(0, 17))


def token_logp(model, tokens_BxT, valid_BxT, chunk: int = 128, unroll: bool = False):
    """``logp_BxT`` (float32) for an NNX ``Decoder`` (see the module docstring)."""
    valid_BxT = valid_BxT.astype(bool)
    h, _ = model.hidden(tokens_BxT, positions_from_mask(valid_BxT), valid_BxT)
    b, t, _ = h.shape
    # hidden at t-1 predicts token t; with holes/left padding the predictor of a valid token is
    # the previous *valid* token: the cumulative index of the last valid position before t.
    idx_T = jnp.arange(t, dtype=jnp.int32)
    last_valid_BxT = jax.lax.cummax(jnp.where(valid_BxT, idx_T[None, :], -1), axis=1)
    prev_BxT = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), last_valid_BxT[:, :-1]], axis=1)
    has_prev = prev_BxT >= 0
    src = jnp.take_along_axis(h, jnp.maximum(prev_BxT, 0)[:, :, None], axis=1)
    # src[t] predicts token t: the training loss's chunked head (a loop: one [chunk, V] logits array
    # live, never [B, T, V]) on src[:, 1:] gives every t >= 1; t = 0 has no predictor (masked below)
    logp, _ = losses.head_logprobs_and_entropy(model.head, src[:, 1:], tokens_BxT, chunk, unroll)
    return jnp.where(valid_BxT & has_prev, logp, 0.0)


def score_fn(graphdef, params, tokens_BxT, valid_BxT, chunk: int = 128, unroll: bool = False):
    """Pure-function form: ``(graphdef, params, tokens, valid) -> logp_BxT``."""
    TRACE_COUNTS["score"] += 1
    return token_logp(nnx.merge(graphdef, params), tokens_BxT, valid_BxT, chunk, unroll)


_score_jit = jax.jit(score_fn, static_argnums=(0, 4, 5))


class ScoringError(ValueError):
    pass


class Scorer:
    """Bucketed, jitted scoring of host token arrays; ``__call__`` returns numpy ``logp_BxT``."""

    def __init__(self, model=None, *, graphdef=None, params=None,
                 batch_buckets: Sequence[int] = POW2,
                 length_buckets: Sequence[int] = tuple(b for b in POW2 if b >= 16),
                 chunk: int = 128):
        if model is not None:
            graphdef, params = nnx.split(model)
        if graphdef is None or params is None:
            raise ScoringError("Scorer needs a model or graphdef= and params=")
        self.graphdef, self.chunk = graphdef, int(chunk)
        self.set_params(params)
        self.batch_buckets, self.length_buckets = sorted(batch_buckets), sorted(length_buckets)
        self.vocab_size = nnx.merge(graphdef, params).cfg.vocab_size

    def set_params(self, params) -> None:
        self.params = params
        # the head's chunk loop (losses.head_logprobs_and_entropy) is unrolled where a loop may deadlock
        self.unroll = sharding.loops_deadlock(sharding.tree_mesh(params))

    @staticmethod
    def _bucket(n, buckets, what):
        for b in buckets:
            if b >= n:
                return b
        raise ScoringError(f"{what} = {n} exceeds the largest bucket {max(buckets)}")

    def __call__(self, tokens_BxT, valid_BxT, params=None) -> np.ndarray:
        tokens = np.asarray(tokens_BxT)
        valid = np.asarray(valid_BxT, bool)
        if tokens.ndim != 2 or tokens.shape != valid.shape:
            raise ScoringError(f"tokens {tokens.shape} and valid {valid.shape} must be equal [B, T]")
        if valid.any() and (tokens[valid].min() < 0 or tokens[valid].max() >= self.vocab_size):
            raise ScoringError(f"token ids outside [0, {self.vocab_size})")
        b, t = tokens.shape
        bb = self._bucket(b, self.batch_buckets, "batch size")
        tb = self._bucket(t, self.length_buckets, "sequence length")
        tok = np.zeros((bb, tb), np.int32)
        val = np.zeros((bb, tb), bool)
        tok[:b, :t] = np.where(valid, tokens, 0)   # right-pad: causal, so appended padding
        val[:b, :t] = valid                        # cannot change earlier log-probs
        out = _score_jit(self.graphdef, self.params if params is None else params, tok, val,
                         min(self.chunk, tb), self.unroll)
        return np.asarray(out)[:b, :t]
