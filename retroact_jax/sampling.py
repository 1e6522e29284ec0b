"""Compiled sampler: batched prefill, incremental extend, a ``lax.while_loop`` decode, log-probs.

An episode's KV cache lives in a ``SamplerState`` between agent steps::

    sampler = Sampler(model)                        # or Sampler(graphdef=..., params=...)
    state = sampler.start(prompts)                  # prefill (left-padded, batch + length buckets)
    state, out = sampler.generate(state, key, max_new_tokens=64, stop_mask=mask)
    state = sampler.extend(state, observations)     # append tokens; no re-prefill of the history
    state, out = sampler.generate(state, key, ...)  # step k costs what it adds, not its history
    out = sampler.sample(prompts, key, ...)         # one-shot: prefill + decode in ONE jit

Shapes are bucketed so calls within a bucket never recompile (``TRACE_COUNTS`` counts traces):
batch -> ``batch_buckets`` (rows beyond the real ones are dummies: no tokens, budget 0), prompt /
extension chunk length -> ``chunk_buckets`` (left-padded; padding becomes invalid cache slots),
cache length -> ``length_buckets`` (the cache is grown by copying into the next bucket when a call
would overflow it; past the last bucket a ``SamplerError`` is raised), new tokens ->
``new_token_buckets``. The cache (``decoder.KVCache``: per layer ``[B, S, K, H]``) is donated: a
state passed to ``extend`` / ``generate`` / ``compact`` (or grown by them) must not be used again.
Growth and compaction copy one layer at a time and free each old layer (``decode_segments.layerwise``), so they
need one layer more than the cache, not a second cache.

Decoding: at each step every unfinished row samples one token from its current logits, the token is
written to the cache (finished rows write invalid slots) and the next logits are computed; a row
finishes on a token in ``stop_mask`` (tokens whose text contains a stop string, see
``stop_token_mask``), when its last generated tokens equal one of ``stop_seqs`` (the token
sequences of a stop string that spans several tokens, e.g. "Observation" = "Ob" "servation", see
``stop_token_sequences``), on an ``eos_ids`` token, or when it has produced its
``max_new_tokens``; the loop ends when every row has finished. The stop/eos token is included in the output and the cache.
``min_new_tokens`` (int or per row, vLLM's ``min_tokens``): in a row's first n tokens stop-mask and EOS
tokens are never drawn and stop sequences do not end it; log-probs stay the model's (not renormalised).
``temperature == 0`` is greedy; otherwise tokens are drawn from ``softmax(logits / temperature)``
restricted to the top-p nucleus when ``top_p < 1``. ``logp`` is the log-prob of each drawn token
under that sampling distribution (nucleus renormalised); for greedy decoding, where that
distribution is degenerate, it is the temperature-1 log-prob (what the scoring pass returns).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retroact_jax import sharding
from retroact_jax.models import attention as attn_lib
from retroact_jax.models.decoder import KVCache, positions_after
from retroact_jax.stops import (MAX_STOP_LEN, MAX_STOP_SEQS, StopError, seq_stopped,  # noqa: F401
                                stop_seq_array, stop_token_mask, stop_token_sequences)

TRACE_COUNTS: collections.Counter = collections.Counter()   # traced-function name -> traces

POW2 = tuple(2 ** i for i in range(0, 16))
MAX_EOS = 8


class SamplerError(ValueError):
    """Bad sampler input (empty prompt, token out of range) or a cache past its last bucket."""


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in (b for b in buckets if b >= n):
        return b
    raise SamplerError(f"{what} = {n} exceeds the largest bucket {max(buckets)}")


@flax.struct.dataclass
class SamplerState:
    """An episode batch: its KV cache and each row's logits for the next token."""
    cache: KVCache
    last_logits_BxV: jax.Array                              # float32
    num_rows: int = flax.struct.field(pytree_node=False)    # real rows; the rest are dummies


@dataclasses.dataclass
class Completion:
    """Host arrays for the real rows. ``tokens_BxN`` is padded with ``pad_id`` and ``logp_BxN``
    with 0 after ``lengths_B``; the stop / eos token, when hit, is the last counted token."""
    tokens_BxN: np.ndarray
    lengths_B: np.ndarray
    logp_BxN: np.ndarray


# --------------------------------------------------------------------------- pure traced functions
SCORES_BUDGET = 256 * 2 ** 20   # bytes of one layer's [B, heads, T, S] float32 scores in an extension


def sub_chunk(batch: int, heads: int, t: int, slots: int, budget: int | None = None) -> int:
    """Queries per pass of an extension of ``t`` tokens into ``slots`` cache slots: ``t`` halved
    (while it divides) until one layer's float32 scores fit ``budget`` (default ``SCORES_BUDGET``;
    at least 16 queries)."""
    budget = SCORES_BUDGET if budget is None else budget
    sub = t
    while sub % 2 == 0 and sub > 16 and batch * heads * sub * slots * 4 > budget:
        sub //= 2
    return sub


def _extend(graphdef, params, cache, last_logits_BxV, tokens_BxT, valid_BxT):
    """Write T (left-padded) tokens per row; rows with no new token keep their logits. A long
    extension runs as a scan over query sub-chunks (``sub_chunk``): each query sees the same slots
    and the same math, but the default attention's [B, heads, T, S] scores are a sub-chunk's (a
    1024-token prefill at batch 32 into 4096 slots: 4.8 GB per layer otherwise)."""
    TRACE_COUNTS["extend"] += 1
    b, t = tokens_BxT.shape
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    sub = sub_chunk(b, cfg.num_heads, t, attn_lib.scored_slots(cfg.attention, cache.length, cfg.attention_block))

    def run(cache, last_BxV, tok_BxC, val_BxC):
        logits, cache = nnx.merge(graphdef, params)(tok_BxC, positions_after(cache, val_BxC), val_BxC,
                                                    cache=cache, last_only=True)
        return cache, jnp.where(val_BxC[:, -1:], logits, last_BxV)

    if sub == t:
        return run(cache, last_logits_BxV, tokens_BxT, valid_BxT)
    split = lambda a: a.reshape(b, t // sub, sub).transpose(1, 0, 2)  # noqa: E731  [n, B, sub]
    (cache, logits), _ = jax.lax.scan(lambda c, xs: (run(*c, *xs), None), (cache, last_logits_BxV),
                                      (split(tokens_BxT), split(valid_BxT)))
    return cache, logits


def _nucleus(scaled_BxV, top_p):
    """Mask logits outside the smallest set whose probability reaches ``top_p`` (>= 1 token)."""
    probs = jax.nn.softmax(scaled_BxV, axis=-1)
    desc = -jnp.sort(-probs, axis=-1)
    before = jnp.cumsum(desc, axis=-1) - desc            # mass of strictly more likely tokens
    kept = (before < top_p).at[:, 0].set(True)
    cutoff = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs >= cutoff, scaled_BxV, -jnp.inf)


def _pick(logits_BxV, key, temperature, top_p, blocked_BxV):
    """(token_B, logp_B) for one step (log-prob: module docstring); ``blocked_BxV`` are never drawn."""
    masked_BxV = jnp.where(blocked_BxV, -jnp.inf, logits_BxV)

    def greedy(_):
        tok = jnp.argmax(masked_BxV, axis=-1).astype(jnp.int32)
        lp = jax.nn.log_softmax(logits_BxV, axis=-1)
        return tok, jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]

    def stochastic(_):
        scaled = jax.lax.cond(top_p < 1.0, _nucleus, lambda s, p: s, logits_BxV / temperature, top_p)
        lp = jax.nn.log_softmax(scaled, axis=-1)
        draw = jnp.where(blocked_BxV, -jnp.inf, scaled)      # a nucleus all blocked: the rest of the vocab
        draw = jnp.where(jnp.all(draw == -jnp.inf, axis=-1, keepdims=True), masked_BxV / temperature, draw)
        tok = jax.random.categorical(key, draw, axis=-1).astype(jnp.int32)
        return tok, jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]

    return jax.lax.cond(temperature > 0.0, stochastic, greedy, None)


def _decode(graphdef, params, cache, last_logits_BxV, key, max_new_B, min_new_B, stop_mask_V, stop_SxL,
            eos_E, temperature, top_p, recent_BxL=None, *, n_max: int, pad_id: int):
    """Up to ``n_max`` steps -> (cache, logits, tokens, logp, count, stopped_B (on a stop / eos, not
    the budget), recent_BxL (last tokens: continue stop sequences in a later call))."""
    TRACE_COUNTS["decode"] += 1
    model = nnx.merge(graphdef, params)
    b = max_new_B.shape[0]
    ends_V = stop_mask_V | jnp.any(jnp.arange(stop_mask_V.shape[0])[:, None] == eos_E[None, :], axis=-1)
    tokens0, logp0 = jnp.full((b, n_max), pad_id, jnp.int32), jnp.zeros((b, n_max), jnp.float32)

    def cond(c):
        i, done = c[0], c[5]
        return (i < n_max) & ~jnp.all(done)

    def body(c):
        i, cache, logits, tokens, logp, done, count, key, recent, halted = c
        key, sub = jax.random.split(key)
        early_B = i < min_new_B                                   # min_new_tokens not reached yet
        tok, lp = _pick(logits, sub, temperature, top_p, early_B[:, None] & ends_V[None, :])
        live = ~done
        tok = jnp.where(live, tok, pad_id)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        logp = jax.lax.dynamic_update_slice(logp, jnp.where(live, lp, 0.0)[:, None], (0, i))
        recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
        stopped = (stop_mask_V[tok] | jnp.any(tok[:, None] == eos_E[None, :], axis=-1)
                   | (seq_stopped(recent, stop_SxL) & ~early_B))
        new_logits, cache = model(tok[:, None], positions_after(cache, live[:, None]),
                                  live[:, None], cache=cache, last_only=True)
        logits = jnp.where(live[:, None], new_logits, logits)
        done = done | stopped | (i + 1 >= max_new_B)
        return (i + 1, cache, logits, tokens, logp, done, count + live.astype(jnp.int32), key,
                jnp.where(live[:, None], recent, c[8]), halted | (stopped & live))

    recent_BxL = jnp.full((b, stop_SxL.shape[1]), -2, jnp.int32) if recent_BxL is None else recent_BxL
    init = (jnp.zeros((), jnp.int32), cache, last_logits_BxV, tokens0, logp0, max_new_B <= 0,
            jnp.zeros((b,), jnp.int32), key, recent_BxL, jnp.zeros((b,), bool))
    _, cache, logits, tokens, logp, _, count, _, recent, halted = jax.lax.while_loop(cond, body, init)
    return cache, logits, tokens, logp, count, halted, recent


def _prefill_decode(graphdef, params, cache, last_logits_BxV, tokens_BxT, valid_BxT, key,
                    max_new_B, min_new_B, stop_mask_V, stop_SxL, eos_E, temperature, top_p, *, n_max, pad_id):
    TRACE_COUNTS["prefill_decode"] += 1
    cache, logits = _extend(graphdef, params, cache, last_logits_BxV, tokens_BxT, valid_BxT)
    return _decode(graphdef, params, cache, logits, key, max_new_B, min_new_B, stop_mask_V, stop_SxL,
                   eos_E, temperature, top_p, n_max=n_max, pad_id=pad_id)[:5]


_extend_jit = jax.jit(_extend, static_argnums=0, donate_argnums=(2, 3))
_decode_jit = jax.jit(_decode, static_argnums=0, static_argnames=("n_max", "pad_id"),
                      donate_argnums=(2, 3))
_prefill_decode_jit = jax.jit(_prefill_decode, static_argnums=0,
                              static_argnames=("n_max", "pad_id"), donate_argnums=(2, 3))

# ------------------------------------------------------------------------------------ host side
class Sampler:
    """Host-side driver: bucketing, padding, cache growth; the math is in the jitted functions."""

    def __init__(self, model=None, *, graphdef=None, params=None, pad_id: int = 0,
                 eos_ids: Sequence[int] | None = None,
                 batch_buckets: Sequence[int] = POW2,
                 chunk_buckets: Sequence[int] = tuple(b for b in POW2 if b >= 8),
                 length_buckets: Sequence[int] = tuple(b for b in POW2 if b >= 64),
                 new_token_buckets: Sequence[int] = tuple(b for b in POW2 if b >= 8)):
        if model is not None:
            graphdef, params = nnx.split(model)
        if graphdef is None or params is None:
            raise SamplerError("Sampler needs a model or graphdef= and params=")
        self.graphdef, self.params = graphdef, params
        self.cfg = nnx.merge(graphdef, params).cfg
        self.pad_id = int(pad_id)
        if eos_ids is None:
            e = self.cfg.eos_token_id
            eos_ids = () if e is None else (e,) if isinstance(e, int) else tuple(e)
        self.eos_ids = tuple(int(e) for e in eos_ids)
        if len(self.eos_ids) > MAX_EOS:
            raise SamplerError(f"at most {MAX_EOS} eos ids, got {self.eos_ids}")
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.chunk_buckets = tuple(sorted(chunk_buckets))
        self.length_buckets = tuple(sorted(length_buckets))
        self.new_token_buckets = tuple(sorted(new_token_buckets))

    def set_params(self, params) -> None:
        """New weights of the same shapes (e.g. after an RL update): no recompilation."""
        self.params = params

    # ------------------------------------------------------------------ helpers
    def _chunk(self, rows: Sequence[Sequence[int]], batch: int):
        v = self.cfg.vocab_size
        n = max([len(r) for r in rows] + [1])
        t = bucket(n, self.chunk_buckets, "token chunk length")
        tokens = np.full((batch, t), self.pad_id, np.int32)
        valid = np.zeros((batch, t), bool)
        for i, r in enumerate(rows):
            r = np.asarray(r, np.int64).reshape(-1)
            if r.size and (r.min() < 0 or r.max() >= v):
                raise SamplerError(f"row {i} has token ids outside [0, {v}): {r.min()}..{r.max()}")
            if r.size:
                tokens[i, t - r.size:] = r
                valid[i, t - r.size:] = True
        return tokens, valid

    def _fresh(self, batch: int, length: int, num_rows: int) -> SamplerState:
        # weights sharded over a mesh (the RL learner's placed copy): the cache is sharded too
        return SamplerState(cache=KVCache.init(self.cfg, batch, length, mesh=sharding.tree_mesh(self.params)),
                            last_logits_BxV=jnp.zeros((batch, self.cfg.vocab_size), jnp.float32),
                            num_rows=num_rows)

    def _fit(self, state: SamplerState, need: int) -> SamplerState:
        """Grow the cache into the bucket holding ``need`` slots (copy), if needed."""
        if need <= state.cache.length:
            return state
        length = bucket(need, self.length_buckets, "KV cache length (slots used + new)")
        from retroact_jax.decode_segments import grow
        return state.replace(cache=grow(state.cache, length))

    @staticmethod
    def _budgets(max_new_tokens, num_rows: int, batch: int, what: str = "max_new_tokens") -> np.ndarray:
        mx = np.zeros((batch,), np.int32)
        try:
            mx[:num_rows] = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (num_rows,))
        except ValueError:
            raise SamplerError(f"{what} must be an int or one per row ({num_rows}), got "
                               f"{max_new_tokens!r}") from None
        if mx.min() < 0:
            raise SamplerError(f"{what} must be >= 0, got {max_new_tokens}")
        return mx

    def _decode_args(self, key, mx, mn, stop_mask, stop_seqs, eos_ids, temperature, top_p):
        v = self.cfg.vocab_size
        stop = np.zeros((v,), bool) if stop_mask is None else np.asarray(stop_mask, bool)
        if stop.shape != (v,):
            raise SamplerError(f"stop_mask must have shape ({v},), got {stop.shape}")
        eos = self.eos_ids if eos_ids is None else tuple(int(e) for e in eos_ids)
        if len(eos) > MAX_EOS:
            raise SamplerError(f"at most {MAX_EOS} eos ids, got {eos}")
        eos_arr = np.full((MAX_EOS,), -1, np.int32)
        eos_arr[: len(eos)] = eos
        if not (temperature >= 0.0) or not (0.0 < top_p <= 1.0):
            raise SamplerError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if key is None:
            if temperature > 0.0:
                raise SamplerError("sampling with temperature > 0 needs a PRNG key")
            key = jax.random.key(0)                      # unused by greedy decoding
        try:
            seqs = stop_seq_array(stop_seqs)
        except StopError as e:
            raise SamplerError(str(e)) from None
        if seqs.max() >= v:
            raise SamplerError(f"stop_seqs hold token ids outside [0, {v}): {stop_seqs!r}")
        return (key, jnp.asarray(mx), jnp.asarray(mn), jnp.asarray(stop), jnp.asarray(seqs),
                jnp.asarray(eos_arr), jnp.float32(temperature), jnp.float32(top_p))

    def _completion(self, state, tokens, logp, lengths, mx) -> Completion:
        r = state.num_rows
        n = int(mx[:r].max(initial=0))
        return Completion(tokens_BxN=np.asarray(tokens)[:r, :n],
                          lengths_B=np.asarray(lengths)[:r],
                          logp_BxN=np.asarray(logp)[:r, :n])

    # ------------------------------------------------------------------ public
    def start(self, prompts: Sequence[Sequence[int]], reserve: int = 0) -> SamplerState:
        """Prefill ``prompts`` (token id lists, >= 1 token each) into a fresh cache with room for
        ``reserve`` more slots."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise SamplerError("start() needs at least one prompt and no empty prompt")
        b = bucket(len(prompts), self.batch_buckets, "batch size")
        tokens, valid = self._chunk(prompts, b)
        length = bucket(tokens.shape[1] + reserve, self.length_buckets, "KV cache length")
        state = self._fresh(b, length, len(prompts))
        cache, logits = _extend_jit(self.graphdef, self.params, state.cache, state.last_logits_BxV,
                                    tokens, valid)
        return state.replace(cache=cache, last_logits_BxV=logits)

    def extend(self, state: SamplerState, new_tokens: Sequence[Sequence[int]],
               grouped: bool = True) -> SamplerState:
        """Append ``new_tokens[i]`` (may be empty) to row i's cache without re-prefilling (a few long
        additions in a smaller batch first: ``decode_segments.extend_groups``)."""
        if len(new_tokens) != state.num_rows:
            raise SamplerError(f"extend() got {len(new_tokens)} rows, the state has "
                               f"{state.num_rows}")
        if all(len(r) == 0 for r in new_tokens):
            return state
        from retroact_jax.decode_segments import extend_groups     # long additions in a sub-batch
        return extend_groups(self, state, new_tokens, grouped)

    def compact(self, state: SamplerState, keep: Sequence[Sequence[int]], reserve: int = 0) -> SamplerState:
        """Drop the holes: row i keeps slots ``keep[i]`` (in order) at 0..len-1 (decode_segments)."""
        from retroact_jax.decode_segments import compact
        return compact(self, state, keep, reserve)

    def generate(self, state: SamplerState, key=None, max_new_tokens=32, *, temperature=0.0, top_p=1.0,
                 stop_mask=None, stop_seqs=None, eos_ids=None, min_new_tokens=0,
                 segment: int = 0, shrink: int = 4) -> tuple[SamplerState, Completion]:
        """Continue every row (``max_new_tokens`` / ``min_new_tokens``: int or one per row, 0 = leave
        the row alone). ``segment`` > 0: that many steps per call, in a shrinking batch (decode_segments)."""
        if segment:
            from retroact_jax.decode_segments import generate_segments
            kw = dict(temperature=temperature, top_p=top_p, stop_mask=stop_mask, stop_seqs=stop_seqs,
                      eos_ids=eos_ids, min_new_tokens=min_new_tokens, segment=segment, shrink=shrink)
            return generate_segments(self, state, key, max_new_tokens, **kw)
        mx = self._budgets(max_new_tokens, state.num_rows, state.cache.batch)
        mn = self._budgets(min_new_tokens, state.num_rows, state.cache.batch, "min_new_tokens")
        n_max = bucket(int(mx.max(initial=0)) or 1, self.new_token_buckets, "max_new_tokens")
        args = self._decode_args(key, mx, mn, stop_mask, stop_seqs, eos_ids, temperature, top_p)
        state = self._fit(state, int(state.cache.end) + int(mx.max(initial=0)))   # consumes the cache
        cache, logits, tokens, logp, lengths = _decode_jit(
            self.graphdef, self.params, state.cache, state.last_logits_BxV, *args,
            n_max=n_max, pad_id=self.pad_id)[:5]
        state = state.replace(cache=cache, last_logits_BxV=logits)
        return state, self._completion(state, tokens, logp, lengths, mx)

    def sample(self, prompts: Sequence[Sequence[int]], key=None, max_new_tokens=32, *,
               temperature=0.0, top_p=1.0, stop_mask=None, stop_seqs=None, eos_ids=None,
               reserve: int = 0, min_new_tokens=0) -> tuple[SamplerState, Completion]:
        """Prefill + decode in one compiled call; the returned state can be extended further."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise SamplerError("sample() needs at least one prompt and no empty prompt")
        b = bucket(len(prompts), self.batch_buckets, "batch size")
        tokens, valid = self._chunk(prompts, b)
        mx = self._budgets(max_new_tokens, len(prompts), b)
        mn = self._budgets(min_new_tokens, len(prompts), b, "min_new_tokens")
        n_max = bucket(int(mx.max(initial=0)) or 1, self.new_token_buckets, "max_new_tokens")
        length = bucket(tokens.shape[1] + int(mx.max(initial=0)) + reserve, self.length_buckets,
                        "KV cache length")
        state = self._fresh(b, length, len(prompts))
        args = self._decode_args(key, mx, mn, stop_mask, stop_seqs, eos_ids, temperature, top_p)
        cache, logits, out_tokens, logp, lengths = _prefill_decode_jit(
            self.graphdef, self.params, state.cache, state.last_logits_BxV, tokens, valid, *args,
            n_max=n_max, pad_id=self.pad_id)
        state = state.replace(cache=cache, last_logits_BxV=logits)
        return state, self._completion(state, out_tokens, logp, lengths, mx)
