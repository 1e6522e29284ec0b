"""Moving cache rows and slots: growth and compaction one layer at a time (``layerwise``),
decoding in segments with a shrinking batch (the few rows still running stop paying for the rest), extensions in row groups (a few long additions no longer pad
every row to their length), and compaction (dropping the shared write cursor's holes).

``Sampler.generate`` runs one compiled loop until its *last* row stops, every step costing a
full-batch forward: at 32 rows, one completion that runs to its 250-token budget while the others
stopped after 20 tokens makes the call cost 250 batch-32 steps. ``generate_segments`` (same
arguments and result as ``Sampler.generate``) decodes ``segment`` steps at a time; once the running
rows fit a batch bucket at most a quarter of the current one, they are gathered into a smaller
state (``_take_rows``: their cache rows and logits) and decoding continues there; at the end every
smaller state is written back into its parent (``_put_rows``) in place.

``extend_groups`` (``Sampler.extend``): an extension costs batch x chunk tokens, the chunk being the
bucket of the longest addition. When a few rows add a lot (a new episode's prompt, a long
observation) and the rest a little, the long rows are extended first as a smaller batch
(``_take_rows`` / ``_extend`` / ``_put_rows``), then the rest in their own, shorter chunk:
``extend_plan`` peels the group of the largest chunk whenever that at least halves the tokens
computed. Per-row results are those of one call (rows do not interact); the long rows' slots are
holes in the others' rows.

Same tokens, stops and log-probs as one ``generate`` call for greedy decoding (a row's computation
does not depend on the other rows; stop sequences continue across segments through each row's
recent tokens). With temperature > 0 the draw differs from one call's (the PRNG key is split per
segment) but is as reproducible. The rows that were gathered away leave the parent's write cursor
behind: the parent's cursor becomes the child's, the skipped slots are invalid holes in the
finished rows (``LMPolicy`` compacts them away).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from retroact_jax import sampling
from retroact_jax.models.decoder import KVCache
from retroact_jax.stops import MAX_STOP_LEN


def _take_rows(cache: KVCache, logits_BxV, idx_R):
    sampling.TRACE_COUNTS["take_rows"] += 1
    take = lambda a: a[idx_R]
    return (KVCache(k=tuple(map(take, cache.k)), v=tuple(map(take, cache.v)),
                    valid_BxS=cache.valid_BxS[idx_R], end=cache.end), logits_BxV[idx_R])


def _put_rows(cache: KVCache, logits_BxV, small: KVCache, small_logits_RxV, idx_R):
    """Rows ``idx_R`` of the parent <- the child's rows (an index past the batch is dropped)."""
    sampling.TRACE_COUNTS["put_rows"] += 1
    put = lambda a, b: a.at[idx_R].set(b, mode="drop")
    return (KVCache(k=tuple(map(put, cache.k, small.k)), v=tuple(map(put, cache.v, small.v)),
                    valid_BxS=put(cache.valid_BxS, small.valid_BxS),
                    end=jnp.maximum(cache.end, small.end)), put(logits_BxV, small_logits_RxV))


def layerwise(cache: KVCache, fn, *args) -> tuple[tuple, tuple]:
    """(k, v): ``fn(layer, *args)`` applied to each layer's keys / values in turn, each input layer
    deleted as soon as its output exists. One jit over the whole cache holds the old and the new
    cache at once (a gather or a pad cannot write in place, and XLA on CPU does not reuse a donated
    layer's buffer for the next layer's output): 3 GB more at 16 rows x 4,096 slots of SmolLM2-135M.
    This holds one layer more. The input cache is consumed, as a donated one."""
    out = []
    for group in (cache.k, cache.v):
        new = []
        for a in group:
            b = fn(a, *args)
            b.block_until_ready()        # the old layer is freed before the next one is made
            if not a.is_deleted():
                a.delete()
            new.append(b)
        out.append(tuple(new))
    return out[0], out[1]


def _pad_slots(a_BxSxKxH, extra: int):
    sampling.TRACE_COUNTS["grow"] += 1
    return jnp.pad(a_BxSxKxH, ((0, 0), (0, extra), (0, 0), (0, 0)))


_pad_slots_jit = jax.jit(_pad_slots, static_argnums=1)


def grow(cache: KVCache, length: int) -> KVCache:
    """The cache in ``length`` slots (new slots invalid), layer by layer (``layerwise``)."""
    extra = length - cache.length
    valid = jnp.pad(cache.valid_BxS, ((0, 0), (0, extra)))
    k, v = layerwise(cache, _pad_slots_jit, extra)
    return KVCache(k=k, v=v, valid_BxS=valid, end=cache.end)


def _take_slots(a_BxSxKxH, idx_BxL):
    sampling.TRACE_COUNTS["compact"] += 1
    return jnp.take_along_axis(a_BxSxKxH, idx_BxL[:, :, None, None], axis=1)


_take_slots_jit = jax.jit(_take_slots)


def _compact(cache: KVCache, idx_BxL, n_B) -> KVCache:
    """Row b keeps the slots ``idx_BxL[b, :n_B[b]]`` (in order) at slots 0..n_B[b]-1; the rest
    are invalid, the write cursor is ``max(n_B)``. Keys carry their RoPE already and positions
    count valid slots, so the kept tokens attend and continue exactly as before. Layer by layer
    (``layerwise``): the input cache is consumed."""
    valid = jnp.arange(idx_BxL.shape[1], dtype=jnp.int32)[None, :] < n_B[:, None]
    k, v = layerwise(cache, _take_slots_jit, idx_BxL)
    return KVCache(k=k, v=v, valid_BxS=valid, end=jnp.max(n_B).astype(jnp.int32))


_take_rows_jit = jax.jit(_take_rows)
_put_rows_jit = jax.jit(_put_rows, donate_argnums=(0, 1))


def compact(sampler: "sampling.Sampler", state, keep, reserve: int = 0):
    """``Sampler.compact``: row i keeps its slots ``keep[i]`` at 0..len-1 (``_compact``)."""
    if len(keep) != state.num_rows:
        raise sampling.SamplerError(f"compact() got {len(keep)} rows, the state has {state.num_rows}")
    n = max([len(k) for k in keep] + [0])
    length = sampling.bucket(max(n + int(reserve), 1), sampler.length_buckets, "KV cache length (compacted)")
    idx = np.zeros((state.cache.batch, length), np.int32)
    counts = np.zeros((state.cache.batch,), np.int32)
    for i, k in enumerate(keep):
        k = np.asarray(k, np.int64).reshape(-1)
        if k.size and (k.min() < 0 or k.max() >= state.cache.length):
            raise sampling.SamplerError(f"compact(): row {i} keeps slots outside [0, {state.cache.length})")
        idx[i, :k.size], counts[i] = k, k.size
    return state.replace(cache=_compact(state.cache, jnp.asarray(idx), jnp.asarray(counts)))


def generate_segments(sampler: "sampling.Sampler", state, key=None, max_new_tokens=32, *,
                      temperature=0.0, top_p=1.0, stop_mask=None, stop_seqs=None, eos_ids=None,
                      min_new_tokens=0, segment: int = 32, shrink: int = 4):
    """``Sampler.generate`` in ``segment``-step calls, moving the running rows to a batch bucket
    ``shrink`` times smaller (or less) whenever they fit one (module docstring)."""
    if segment < 1 or shrink < 2:
        raise sampling.SamplerError(f"need segment >= 1 and shrink >= 2, got {segment}, {shrink}")
    b, rows = state.cache.batch, state.num_rows
    mx = sampler._budgets(max_new_tokens, rows, b)
    mn = sampler._budgets(min_new_tokens, rows, b, "min_new_tokens")
    total = int(mx.max(initial=0))
    if total <= segment:
        return sampler.generate(state, key, mx[:rows], temperature=temperature, top_p=top_p,
                                stop_mask=stop_mask, stop_seqs=stop_seqs, eos_ids=eos_ids,
                                min_new_tokens=mn[:rows])
    args = sampler._decode_args(key, mx, mn, stop_mask, stop_seqs, eos_ids, temperature, top_p)
    state = sampler._fit(state, int(state.cache.end) + total)     # no growth between segments
    key, fixed = args[0], args[3:]
    n_seg = sampling.bucket(segment, sampler.new_token_buckets, "segment")
    tokens = np.full((b, total), sampler.pad_id, np.int32)
    logp = np.zeros((b, total), np.float32)
    count = np.zeros((b,), np.int64)
    left, min_left = mx.astype(np.int64), mn.astype(np.int64)
    recent = np.full((b, MAX_STOP_LEN), -2, np.int32)
    stack = []                                   # (parent cache, parent logits, child rows in parent)
    cache, logits = state.cache, state.last_logits_BxV
    where = np.arange(b)                         # top-level row of each row here (-1: dummy)
    while True:
        running = np.flatnonzero((where >= 0) & (left[np.maximum(where, 0)] > 0))
        if running.size == 0:
            break
        small = sampling.bucket(running.size, sampler.batch_buckets, "batch size")
        if small * shrink <= cache.batch:
            idx = np.full((small,), running[0], np.int32)
            idx[:running.size] = running
            child, child_logits = _take_rows_jit(cache, logits, jnp.asarray(idx))
            back = np.full((small,), cache.batch, np.int32)        # dummies: dropped on the way back
            back[:running.size] = running
            stack.append((cache, logits, back))
            cache, logits = child, child_logits
            where = np.concatenate([where[running], np.full((small - running.size,), -1)])
        top = np.maximum(where, 0)
        budget = np.where(where >= 0, np.minimum(left[top], n_seg), 0).astype(np.int32)
        key, sub = jax.random.split(key)
        cache, logits, toks, lps, cnt, halted, rec = sampling._decode_jit(
            sampler.graphdef, sampler.params, cache, logits, sub, jnp.asarray(budget),
            jnp.asarray(np.where(where >= 0, np.maximum(min_left[top], 0), 0).astype(np.int32)),
            *fixed, jnp.asarray(recent[top]), n_max=n_seg, pad_id=sampler.pad_id)
        toks, lps, cnt, halted, rec = map(np.asarray, (toks, lps, cnt, halted, rec))
        for r in np.flatnonzero(where >= 0):
            g, c = where[r], int(cnt[r])
            tokens[g, count[g]:count[g] + c] = toks[r, :c]
            logp[g, count[g]:count[g] + c] = lps[r, :c]
            count[g] += c
            left[g] = 0 if halted[r] else left[g] - c
            min_left[g] -= c
            recent[g] = rec[r]
    while stack:
        parent, parent_logits, back = stack.pop()
        cache, logits = _put_rows_jit(parent, parent_logits, cache, logits, jnp.asarray(back))
    state = state.replace(cache=cache, last_logits_BxV=logits)
    return state, sampling.Completion(tokens_BxN=tokens[:rows], lengths_B=count[:rows].astype(np.int32),
                                      logp_BxN=logp[:rows])


MIN_SAVED_TOKENS = 2048   # a sub-batch must save this many token computations (~6 s on 2 cores):
                          # below it, its extra compiled shapes and row gathers cost more than it saves


def extend_plan(lengths, batch: int, batch_buckets, chunk_buckets,
                min_saved: int | None = None) -> list[tuple[list[int] | None, int]]:
    """Calls that extend rows with ``lengths`` new tokens: [(rows of a sub-batch, or None for the
    whole batch, chunk length)], longest first. The group needing the largest chunk goes into a
    sub-batch when that (plus the rest at its own chunk) computes at most half the tokens of one
    whole-batch call and saves at least ``min_saved`` (default ``MIN_SAVED_TOKENS``) of them;
    otherwise every remaining row goes into one whole-batch call."""
    min_saved = MIN_SAVED_TOKENS if min_saved is None else int(min_saved)
    lengths = np.asarray(lengths, np.int64)
    chunk = lambda n: sampling.bucket(int(n), chunk_buckets, "token chunk length")   # noqa: E731
    left = [i for i in np.argsort(-lengths, kind="stable") if lengths[i] > 0]
    plan = []
    while left:
        top = chunk(lengths[left[0]])
        group = [i for i in left if chunk(lengths[i]) == top]
        rest = left[len(group):]
        small = sampling.bucket(len(group), batch_buckets, "batch size")
        split = small * top + (batch * chunk(lengths[rest[0]]) if rest else 0)
        if small >= batch or 2 * split > batch * top or batch * top - split < min_saved:
            plan.append((None, top))
            break
        plan.append((sorted(int(i) for i in group), top))
        left = rest
    return plan


def extend_advance(sampler: "sampling.Sampler", batch: int, lengths, grouped: bool = True) -> int:
    """Slots the shared write cursor moves when ``Sampler.extend(..., grouped)`` adds ``lengths``
    tokens to a ``batch``-row cache: the sum of the plan's chunks, or the longest addition's chunk
    for one whole-batch call (what ``LMPolicy`` reserves before a call: a grouped extension can
    need more slots than one call, which matters near the largest cache bucket)."""
    if not any(lengths):
        return 0
    if not grouped:
        return sampling.bucket(max(lengths), sampler.chunk_buckets, "token chunk length")
    return sum(c for _, c in extend_plan(lengths, batch, sampler.batch_buckets, sampler.chunk_buckets))


def stage_sizes(longest: int, chunk_buckets) -> list[int]:
    """Chunk lengths that add ``longest`` tokens in pieces, each the largest chunk bucket that the
    rest fills (then the smallest): at most the smallest bucket's padding, where one call pads to
    the next bucket (2,314 tokens: 2,048 + 256 + 16 slots instead of 4,096), and an addition
    longer than the largest bucket can be made."""
    sizes, left = [], int(longest)
    while left > 0:
        fit = [b for b in chunk_buckets if b <= left]
        sizes.append(max(fit) if fit else min(chunk_buckets))
        left -= sizes[-1]
    return sizes


def _sharded(cache: KVCache) -> bool:
    return len(getattr(cache.k[0].sharding, "device_set", ())) > 1


def extend_groups(sampler: "sampling.Sampler", state, new_tokens, grouped: bool = True):
    """``Sampler.extend``: the calls of ``extend_plan`` (one whole-batch call on a sharded cache,
    when not ``grouped``, or when the plan's slots would not fit the largest cache bucket)."""
    b = state.cache.batch
    lens = [len(r) for r in new_tokens]
    plan = ([(None, 0)] if _sharded(state.cache) or not grouped else
            extend_plan(lens, b, sampler.batch_buckets, sampler.chunk_buckets))
    if int(state.cache.end) + sum(c for _, c in plan) > max(sampler.length_buckets):
        plan = [(None, 0)]        # the groups' extra slots would overflow the largest cache: one call
    done = set()
    for rows, _ in plan:
        if rows is None:
            rows_now = [r if i not in done else [] for i, r in enumerate(new_tokens)]
            tokens, valid = sampler._chunk(rows_now, b)
            state = sampler._fit(state, int(state.cache.end) + tokens.shape[1])
            cache, logits = sampling._extend_jit(sampler.graphdef, sampler.params, state.cache,
                                                 state.last_logits_BxV, tokens, valid)
            state = state.replace(cache=cache, last_logits_BxV=logits)
            break
        small = sampling.bucket(len(rows), sampler.batch_buckets, "batch size")
        tokens, valid = sampler._chunk([new_tokens[i] for i in rows] + [[]] * (small - len(rows)), small)
        state = sampler._fit(state, int(state.cache.end) + tokens.shape[1])
        take = np.full((small,), rows[0], np.int32)
        take[:len(rows)] = rows
        back = np.full((small,), b, np.int32)                   # dummies: dropped on the way back
        back[:len(rows)] = rows
        child, child_logits = _take_rows_jit(state.cache, state.last_logits_BxV, jnp.asarray(take))
        child, child_logits = sampling._extend_jit(sampler.graphdef, sampler.params, child, child_logits,
                                                   tokens, valid)
        cache, logits = _put_rows_jit(state.cache, state.last_logits_BxV, child, child_logits,
                                      jnp.asarray(back))
        state = state.replace(cache=cache, last_logits_BxV=logits)
        done.update(rows)
    return state
