"""``LMPolicy``: the policy interface over the compiled sampler, one KV-cache row per episode.

Each episode (request ``key``) owns a row of one ``SamplerState``. At every call the episode's whole
context is tokenised at once (``tok.encode(render(spans), add_bos=tok.add_bos)``: exactly how training
and scoring tokenise the same text, batching.tokenize_sample) and compared with the ids its row holds:

- the longest common prefix stays in the cache; the row's slots past it are invalidated (a
  rollback: the cache's per-slot validity mask, decoder.KVCache) and only the remainder is
  ``extend``-ed. Normally the remainder is just the new observation / cue text, so a step costs what
  it adds, not its history. A rollback happens when text was discarded (ALFWorld re-samples a short
  output), replaced (InterCode's action fallback), or when the sampled ids are not the canonical
  tokenisation of their text or merge with the next span's text ("\\n" + "\\n" -> "\\n\\n").
  At least the last token is always re-fed so the row's next-token logits are fresh.
- rows are reused when episodes end (``release``): a new episode takes the free row sharing the
  longest prefix with its context and keeps that prefix (the instructions and few-shot exemplars
  every episode's prompt starts with are computed once per row, not once per episode). All rows
  write at one shared cursor, so every
  call leaves holes (chunk padding, rows that stopped decoding early, rollbacks, finished
  episodes); before a call that would grow the cache, or whose live rows fit a smaller length
  bucket, the holes are dropped by a gather (``Sampler.compact``): the cache stays near the
  longest live row, which is what every decode step reads. When the longest kept row plus the
  longest addition would overflow the largest bucket (every addition is written after the longest
  kept row), every row's cache is dropped and re-prefilled whole (``stats["evictions"]``); when one
  chunk's padding still overflows it, the additions are made in pieces (``stats["staged"]``,
  ``decode_segments.stage_sizes``).

``hold_cache=False`` frees the cache when its last row is released: for a policy whose rows are all
released after each call (the reflector: one call per failed trial), a cache kept between calls
would hold its largest call's rows x length (16 x 4,096 slots of SmolLM2-135M: 3 GB) while the
planner runs, to save re-computing a few hundred tokens of shared instructions per call.
``incremental=False`` re-prefills every context at every call (the baseline for bench/rollout.py).
New weights (``Sampler.set_params``) drop every row: no cached key / value outlives the weights.
Stop strings become the sampler's vocabulary mask (tokens whose text contains one) and, for a stop
string that spans several tokens ("Observation"), token sequences the decode loop stops on
(``sampling.stop_token_sequences``); the decoded text is checked as well (another tokenisation of
the stop string): the completion and the row are cut right after it. A completion that ends on the model's EOS token
returns the text before it (``finish="eos"``), as a model API does: the EOS is never action text. Temperature 0 is greedy. Sampling keys derive from the requests'
seeds, so a batch's draw is reproducible given its composition. ``min_new_tokens`` (vLLM's
``min_tokens``): no stop / EOS token among a completion's first n tokens (``sampling`` module).
``segment``: the decode runs that many steps per compiled call and moves the rows still running
into a smaller batch (``decode_segments.py``): one long completion no longer costs every row's
compute until it stops.
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from retroact_jax import metrics, sampling
from retroact_jax.agent.policy import Completion, Request, cut_at_stop
from retroact_jax.agent.spans import render
from retroact_jax.decode_segments import extend_advance, stage_sizes


@dataclasses.dataclass
class _Row:
    key: Hashable | None = None
    ids: list = dataclasses.field(default_factory=list)     # token ids held, in order
    slots: list = dataclasses.field(default_factory=list)   # cache slot of each id


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LMPolicy:
    def __init__(self, sampler: sampling.Sampler, tokenizer, *, incremental: bool = True,
                 top_p: float = 1.0, min_new_tokens: int = 0, segment: int = 32,
                 hold_cache: bool = True):
        self.sampler, self.tok = sampler, tokenizer
        self.hold_cache = bool(hold_cache)   # False: the cache is freed when its last row is released
        if int(min_new_tokens) < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
        self.min_new_tokens = int(min_new_tokens)
        self.incremental = incremental
        self.segment = int(segment)      # decode steps per compiled call (0: one call per generate)
        self.top_p = float(top_p)
        self.state: sampling.SamplerState | None = None
        self.rows: list[_Row] = []
        self._params = getattr(sampler, "params", None)   # the weights the cache rows were computed with
        self._stop_masks: dict[tuple[str, ...], tuple[np.ndarray, list]] = {}
        self.stats = {"calls": 0, "prefill_tokens": 0, "reused_tokens": 0, "rolled_back": 0,
                      "compactions": 0, "new_tokens": 0, "evictions": 0, "staged": 0}
        self.memory = metrics.PeakWatch()   # .peak: the call phase ("sync" | "decode") of the peak RSS

    # ------------------------------------------------------------------------------ interface
    def count_tokens(self, text: str) -> int:
        return len(self.tok.encode(text))

    def release(self, keys: Sequence[Hashable]) -> None:
        ks = set(keys)
        for r in self.rows:
            if r.key in ks:
                r.key = None   # slots are invalidated when the row is reused
        if not self.hold_cache and all(r.key is None for r in self.rows):
            self.state, self.rows = None, []     # the next call starts a cache sized to its rows

    def generate(self, requests: Sequence[Request], stop: Sequence[str], max_new_tokens: int,
                 temperature: float) -> list[Completion]:
        if not requests:
            return []
        metrics.bound_compiled()              # a safe point: no trace in progress
        self.stats["calls"] += 1
        add_bos = bool(getattr(self.tok, "add_bos", False))    # the tokenizer's one BOS decision
        ids = [self.tok.encode(render(r.spans), add_bos=True) if add_bos else self.tok.encode(render(r.spans))
               for r in requests]
        for r, x in zip(requests, ids):
            if not x:
                raise ValueError(f"request {r.key!r} has an empty context")
        key = jax.random.key(int(np.bitwise_xor.reduce(np.asarray([r.seed for r in requests],
                                                                   np.int64))) & 0x7FFFFFFF)
        mask, seqs = self._stop_mask(tuple(stop))
        if not self.incremental:
            state, out = self.sampler.sample(ids, key, max_new_tokens, temperature=temperature,
                                             top_p=self.top_p, stop_mask=mask, stop_seqs=seqs,
                                             min_new_tokens=self.min_new_tokens)
            self.stats["prefill_tokens"] += sum(map(len, ids))
            return [self._completion(out, i, stop) for i in range(len(requests))]
        params = getattr(self.sampler, "params", None)
        if params is not self._params:            # new weights (set_params): no row is valid
            self.state, self.rows, self._params = None, [], params
        with self.memory.phase("sync", self._shape):          # rows, rollbacks, extensions, cache moves
            rows = self._assign([r.key for r in requests], ids)
            self._sync(rows, ids, int(max_new_tokens))
        budgets = np.zeros((self.state.num_rows,), np.int64)
        budgets[rows] = max_new_tokens
        before = np.asarray(self.state.cache.valid_BxS)
        with self.memory.phase("decode", self._shape):
            self.state, out = self.sampler.generate(self.state, key, budgets, temperature=temperature,
                                                    top_p=self.top_p, stop_mask=mask, stop_seqs=seqs,
                                                    min_new_tokens=self.min_new_tokens,
                                                    segment=self.segment)
        new_slots = self._new_slots(before)
        comps = []
        for i, row in enumerate(rows):
            n = int(out.lengths_B[row])
            toks = [int(t) for t in out.tokens_BxN[row, :n]]
            self.rows[row].ids.extend(toks)
            self.rows[row].slots.extend(new_slots[row][:n])
            comps.append(self._completion(out, row, stop))
            self.stats["new_tokens"] += n
        return comps

    # ------------------------------------------------------------------------------ helpers
    def _shape(self) -> dict:
        """This policy's cache now: rows x slots and GB (``memory.peak``'s context)."""
        if self.state is None:
            return {"rows": 0, "slots": 0, "cache_gb": 0.0}
        c = self.state.cache
        gb = sum(a.nbytes for a in (*c.k, *c.v)) / 1e9
        return {"rows": c.batch, "slots": c.length, "cache_gb": round(gb, 3)}

    def _stop_mask(self, stop: tuple[str, ...]) -> tuple[np.ndarray, list]:
        if stop not in self._stop_masks:
            texts = self.tok.token_texts()
            v = self.sampler.cfg.vocab_size
            mask = np.zeros((v,), bool)
            for i, t in enumerate(texts[:v]):
                mask[i] = any(s in t for s in stop)
            seqs = sampling.stop_token_sequences(self.tok.encode, self.tok.decode, stop) if stop else []
            self._stop_masks[stop] = (mask, seqs)
        return self._stop_masks[stop]

    def _completion(self, out, row: int, stop) -> Completion:
        n = int(out.lengths_B[row])
        toks = [int(t) for t in out.tokens_BxN[row, :n]]
        logp = [float(x) for x in out.logp_BxN[row, :n]]
        if toks and toks[-1] in self.sampler.eos_ids:
            # ended on EOS: like a model API's completion, the text (and the ids the text
            # re-tokenises to) stops before it; "Finish[no]<|im_end|>" would be an invalid action.
            # The row's cache still holds the EOS; the next call's prefix check rolls it back.
            toks, logp = toks[:-1], logp[:-1]
            text = self.tok.decode(toks)
            return Completion(text=text, token_ids=toks, logprobs=logp, finish="eos")
        text = self.tok.decode(toks)
        cut, hit = cut_at_stop(text, stop)
        if hit and len(cut) < len(text):
            # a multi-token stop string: keep the tokens up to the one completing it
            k = next(j for j in range(1, n + 1) if cut_at_stop(self.tok.decode(toks[:j]), stop)[1])
            toks, logp, text = toks[:k], logp[:k], self.tok.decode(toks[:k])
        return Completion(text=text, token_ids=toks, logprobs=logp, finish="stop" if hit else "length")

    def _assign(self, keys: Sequence[Hashable], ids: Sequence[Sequence[int]]) -> list[int]:
        """Each request's row: its own, else the free row whose held ids share the longest prefix
        with the request's (a released episode's few-shot prompt serves the next one: ``_sync``
        keeps that prefix and extends the rest), else a new row."""
        where = {r.key: i for i, r in enumerate(self.rows) if r.key is not None}
        free = [i for i, r in enumerate(self.rows) if r.key is None]
        out = []
        for k, x in zip(keys, ids):
            if k in where:
                out.append(where[k])
                continue
            if not free:
                self._rebuild(extra=max(1, len(keys) - len(out)))
                free = [i for i, r in enumerate(self.rows) if r.key is None]
            i = max(free, key=lambda j: _lcp(self.rows[j].ids, x))     # first of the longest
            free.remove(i)
            self.rows[i].key = k
            where[k] = i
            out.append(i)
        return out

    def _new_slots(self, before: np.ndarray) -> list[list[int]]:
        after = np.asarray(self.state.cache.valid_BxS)
        if after.shape[1] > before.shape[1]:     # the cache grew (copied into a bigger bucket)
            before = np.pad(before, ((0, 0), (0, after.shape[1] - before.shape[1])))
        return [list(np.flatnonzero(after[i] & ~before[i])) for i in range(after.shape[0])]

    def _sync(self, rows: list[int], ids: list[list[int]], max_new: int) -> None:
        """Make each row hold exactly ``ids`` (prefix kept, rest rolled back and extended); drop
        the cache's holes first (``Sampler.compact``) when that shrinks it or saves a growth."""
        todo, dropped = {}, []
        for row, x in zip(rows, ids):
            r = self.rows[row]
            keep = min(_lcp(r.ids, x), len(x) - 1)
            dropped += [(row, s) for s in r.slots[keep:]]
            self.stats["rolled_back"] += len(r.slots) - keep
            del r.ids[keep:], r.slots[keep:]
            todo[row] = x[keep:]
            self.stats["reused_tokens"] += keep
        live = [r.slots if r.key is not None else [] for r in self.rows]
        most = max(map(len, live))
        lengths = [len(todo.get(i, [])) for i in range(self.state.num_rows)]
        top = max(self.sampler.length_buckets) - max_new
        grouped, chunk, stages = self._plan(lengths, most, top)
        if most + chunk > top and most:
            # every addition is written after the longest kept row (one shared cursor): a long kept
            # prefix plus another row's long addition can overflow the largest bucket although each
            # context fits it alone (the Table 2 Reflexion eval: 2,002 kept + 2,750 added + 250).
            # Drop every row's cache: the rows re-prefill whole, in longest-context + max_new slots.
            for i, r in enumerate(self.rows):
                dropped += [(i, s) for s in r.slots]
                if i in todo:
                    self.stats["reused_tokens"] -= len(r.ids)
                    todo[i] = r.ids + todo[i]
                r.ids, r.slots = [], []
            live, most = [[] for _ in self.rows], 0
            lengths = [len(todo.get(i, [])) for i in range(self.state.num_rows)]
            grouped, chunk, stages = self._plan(lengths, most, top)
            self.stats["evictions"] += 1
        end, length = int(self.state.cache.end), self.state.cache.length
        room = most + chunk + max_new
        shrinks = sampling.bucket(max(room, 1), self.sampler.length_buckets, "KV cache length") < length
        if end > most and (end + chunk + max_new > length or shrinks):
            self.state = self.sampler.compact(self.state, live, reserve=chunk + max_new)
            for r, kept in zip(self.rows, live):
                if r.key is None:
                    r.ids, r.slots = [], []
                else:
                    r.slots = list(range(len(kept)))
            self.stats["compactions"] += 1
        elif dropped:
            valid = np.array(self.state.cache.valid_BxS)
            valid[tuple(zip(*dropped))] = False
            self.state = self.state.replace(cache=self.state.cache.replace(valid_BxS=jnp.asarray(valid)))
        new = [todo.get(i, []) for i in range(self.state.num_rows)]
        if any(new):
            before = np.asarray(self.state.cache.valid_BxS)
            if stages is None:
                self.state = self.sampler.extend(self.state, new, grouped=grouped)
            else:
                at = 0
                for size in stages:
                    self.state = self.sampler.extend(self.state, [x[at:at + size] for x in new], grouped=False)
                    at += size
                self.stats["staged"] += 1
            slots = self._new_slots(before)
            for i, x in enumerate(new):
                if x:
                    self.rows[i].ids.extend(x)
                    self.rows[i].slots.extend(slots[i][-len(x):])
                    self.stats["prefill_tokens"] += len(x)

    def _plan(self, lengths: list[int], most: int, top: int) -> tuple[bool, int, list[int] | None]:
        """(grouped, slots the cursor advances, piece sizes or None) of extending rows by ``lengths``
        after ``most`` kept slots, fitting ``top`` if it can: long additions in a sub-batch first
        (``extend_plan``), else one whole-batch call, else pieces that pad at most to the smallest
        chunk bucket (a 2,314-token prompt pads to the 4,096 chunk in one call; an addition longer
        than the largest chunk bucket needs pieces)."""
        if max(lengths, default=0) <= max(self.sampler.chunk_buckets):
            for grouped in (True, False):
                chunk = extend_advance(self.sampler, self.state.cache.batch, lengths, grouped=grouped)
                if most + chunk <= top:
                    return grouped, chunk, None
        stages = stage_sizes(max(lengths, default=0), self.sampler.chunk_buckets)
        return False, sum(stages), stages

    def _rebuild(self, extra: int, pending: dict | None = None) -> None:
        """A fresh state: one prefill of every row's ids (+ ``pending`` additions), ``extra`` new rows."""
        pending = pending or {}
        n = len(self.rows) + extra
        contents = []
        for i in range(n):
            r = self.rows[i] if i < len(self.rows) else _Row()
            x = (r.ids + list(pending.get(i, []))) if r.key is not None else []
            contents.append(x)
        prompts = [x if x else [self.sampler.pad_id] for x in contents]
        self.state = self.sampler.start(prompts)
        self.stats["compactions"] += 1
        valid = np.asarray(self.state.cache.valid_BxS)
        rows = []
        for i, x in enumerate(contents):
            old = self.rows[i] if i < len(self.rows) else _Row()
            slots = list(np.flatnonzero(valid[i]))
            rows.append(_Row(key=old.key, ids=list(x) if x else [self.sampler.pad_id],
                             slots=slots))
            self.stats["prefill_tokens"] += len(prompts[i])
        self.rows = rows
