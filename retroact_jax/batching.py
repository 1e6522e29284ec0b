"""Training samples -> padded, length-bucketed token tensors with span kinds, masks, rewards.

A ``Sample`` is one training text cut into spans, each tagged ``prompt`` (conditioning only),
``generated`` (what the policy sampled) or ``observation`` (text written by the environment or the agent
loop: observations, step prefixes such as ``Thought 2:``, ``OK.``). ``tokenize_sample`` turns it into
token ids with one span kind per token; ``collate`` pads rows into a ``Batch``; ``iterate_batches`` walks
epochs of length-grouped batches from a seed and can resume at any ``(epoch, index)``.

**Why the text is tokenised once, not span by span.** Tokenisers are not homomorphic over string
concatenation: SentencePiece prepends a dummy-prefix ``▁`` to every ``encode`` call (a span starting
``Thought`` gets ``▁Thought``), many tokenisers add BOS per call, and BPE merges across the boundary
(``".\n"`` + ``"\n"`` -> one ``"\n\n"`` token, ``"Question: X"`` + ``"?"``). Concatenating per-span ids
therefore gives sequences the model never conditions on at inference time, where the prompt text is
tokenised as a whole; the trained log-probs would be those of other token strings. So this module
(1) uses the tokenizer's ``encode_pieces(pieces) -> (ids, piece_index_per_token)`` when it has one
(the project tokenizer defines there how pieces are tokenised consistently with the sampler), else
(2) tokenises the concatenated text once and maps each token's character offsets back to spans with the
same rule as ``retroact_jax.tokenizer.encode_pieces``: a token belongs to the span holding the LAST
character it covers (a token straddling a boundary goes to the later span; such tokens are counted in
``TokenizedSample.n_boundary_tokens``); zero-width tokens (BOS added by a post-processor, trimmed
whitespace) belong to the span at their start offset; empty spans own no tokens.

**Boundary rule (docs/paper.md §3.4 item 8).** The text trained is exactly ``"".join(span texts)``; the
inference prompt of the same step must be the concatenation of the spans before the generated span.
The released-data loaders (``released_data.py``) join ``input`` and ``output`` the way the agent's
inference prompts do by default (``join="inference"``); ``join="original"`` keeps the original bytes.

**BOS** is prepended (as a prompt token) exactly when the tokenizer's ``add_bos`` says so, the same
decision the LM policy applies to its prompt ids (``retroact_jax.tokenizer``): the sampled, scored and
trained sequences of one text are the same ids.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from retroact_jax import losses

SPAN_KINDS = ("prompt", "generated", "observation")
KIND_PAD, KIND_PROMPT, KIND_GENERATED, KIND_OBSERVATION = -1, 0, 1, 2
_KIND_ID = {"prompt": KIND_PROMPT, "generated": KIND_GENERATED, "observation": KIND_OBSERVATION}
ROLES = {r: i for i, r in enumerate(losses.ROLES)}      # role -> id (losses.ROLES)
OBJECTIVES = {"il": losses.OBJECTIVE_IL, "rl": losses.OBJECTIVE_RL}
OBSERVATION_MODES = ("trained", "masked")
PADDINGS = ("right", "left")
BEHAVIOUR_ALIGNMENTS = ("exact", "original")


class SampleError(ValueError):
    """A malformed sample, or one that does not fit its tokenisation (behaviour log-prob count...)."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training text.

    role: "planner" | "reflector"; objective: "il" (imitation / the RL stage's regulariser) | "rl".
    spans: ((kind, text), ...), kinds from SPAN_KINDS (``agent.spans.Span`` objects are accepted too).
    reward: the trajectory reward R_tau (RL planner rows).
    last_reward / current_reward: rewards of the trials before / after the reflection (RL reflector rows).
    behaviour_logp: per-token log-probs of the behaviour policy, one per non-prompt token (generated and
        observation, as the original ``ref_prob.py``) or one per generated token only; tokens of the
        sequence produced by ``tokenize_sample`` with the same tokenizer, in order.
    behaviour_alignment: "exact" (the count must match, else SampleError) | "original" (a released
        ``ref_prob`` list: the original collator's ``ref_prob[:n_output_tokens]``, a longer list is cut
        and the cut values counted in ``TokenizedSample.n_behaviour_cut``; a shorter one fails, as the
        original's ragged tensor does).
    metadata: free-form (source file, row, task id...); not compared, not used for training.
    """
    role: str
    spans: tuple[tuple[str, str], ...]
    objective: str = "il"
    reward: float | None = None
    last_reward: float | None = None
    current_reward: float | None = None
    behaviour_logp: tuple[float, ...] | None = None
    behaviour_alignment: str = "exact"
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.role not in ROLES:
            raise SampleError(f"unknown role {self.role!r}; valid: {', '.join(ROLES)}")
        if self.objective not in OBJECTIVES:
            raise SampleError(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        # (kind, text) pairs, or span objects with .role and .text (retroact_jax.agent.spans.Span)
        spans = tuple((s.role, s.text) if hasattr(s, "role") and hasattr(s, "text") else tuple(s)
                      for s in self.spans)
        for s in spans:
            if len(s) != 2 or s[0] not in _KIND_ID or not isinstance(s[1], str):
                raise SampleError(f"a span must be (kind, text) with kind in {SPAN_KINDS}; got {s!r:.120}")
        if not any(k != "prompt" for k, _ in spans):
            raise SampleError("a sample needs at least one generated or observation span")
        object.__setattr__(self, "spans", spans)
        if self.behaviour_logp is not None:
            object.__setattr__(self, "behaviour_logp", tuple(float(x) for x in self.behaviour_logp))
        if self.behaviour_alignment not in BEHAVIOUR_ALIGNMENTS:
            raise SampleError(f"unknown behaviour_alignment {self.behaviour_alignment!r}; "
                              f"valid: {', '.join(BEHAVIOUR_ALIGNMENTS)}")

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.spans)


@dataclasses.dataclass(frozen=True)
class TokenizedSample:
    sample: Sample
    ids: np.ndarray               # int32 [n]
    kinds: np.ndarray             # int8 [n], KIND_*
    behaviour_logp: np.ndarray    # float32 [n], 0 where absent
    behaviour_mask: np.ndarray    # bool [n]
    n_boundary_tokens: int = 0    # tokens straddling a span boundary (offset fallback only)
    n_behaviour_cut: int = 0      # behaviour log-probs dropped from an over-long released list

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if hasattr(tokenizer, "encode_with_offsets"):
        ids, offsets = tokenizer.encode_with_offsets(text)
        return list(ids), [tuple(o) for o in offsets]
    if hasattr(tokenizer, "encode"):
        enc = tokenizer.encode(text)
        if hasattr(enc, "ids") and hasattr(enc, "offsets"):  # a `tokenizers.Tokenizer`
            return list(enc.ids), [tuple(o) for o in enc.offsets]
    raise TypeError(
        f"{type(tokenizer).__name__} has neither encode_pieces(pieces) -> (ids, piece_index_per_token) nor "
        "character offsets (encode_with_offsets(text) -> (ids, offsets), or encode(text) returning an object "
        "with .ids and .offsets); span kinds cannot be mapped to tokens, and tokenising span by span is not "
        "used (it differs from how the whole text tokenises at inference; see retroact_jax.batching)")


def _kinds_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[str, str]],
                        n_chars: int) -> tuple[np.ndarray, int]:
    ends = np.cumsum([len(t) for _, t in spans])
    span_kind = np.asarray([_KIND_ID[k] for k, _ in spans], np.int8)

    def span_at(char: int) -> int:  # the span holding character `char` (empty spans hold none)
        return min(int(np.searchsorted(ends, char, side="right")), len(spans) - 1)

    kinds, boundary = [], 0
    for s, e in offsets:
        if not (0 <= s <= e <= n_chars):
            raise SampleError(f"tokenizer offset ({s}, {e}) lies outside the text of {n_chars} characters")
        last = span_kind[span_at(e - 1 if e > s else s)]
        boundary += int(e > s and span_kind[span_at(s)] != last)
        kinds.append(last)
    return np.asarray(kinds, np.int8), boundary


def tokenize_sample(sample: Sample, tokenizer: Any, *, eos_id: int | None = None) -> TokenizedSample:
    """Token ids and one span kind per token (see the module docstring for the method and why).

    BOS (``tokenizer.bos_id``) is prepended as a prompt token when ``tokenizer.add_bos`` is true.
    ``eos_id``: appended with the kind of the last span (the original trains ``input + output + eos``).
    """
    pieces = [t for _, t in sample.spans]
    boundary = 0
    if hasattr(tokenizer, "encode_pieces"):
        ids, piece_idx = tokenizer.encode_pieces(pieces)
        piece_idx = np.asarray(piece_idx, np.int64)
        if len(ids) != len(piece_idx) or np.any(piece_idx >= len(pieces)) or np.any(piece_idx < -1):
            raise SampleError("encode_pieces returned piece indices that do not match its ids or the pieces")
        span_kind = np.asarray([_KIND_ID[k] for k, _ in sample.spans] + [KIND_PROMPT], np.int8)
        kinds = span_kind[piece_idx]  # -1 (special tokens) -> the appended prompt entry
        ids = list(ids)
    else:
        text = sample.text
        ids, offsets = _encode_with_offsets(tokenizer, text)
        kinds, boundary = _kinds_from_offsets(offsets, sample.spans, len(text))
    if getattr(tokenizer, "add_bos", False):
        ids = [int(tokenizer.bos_id)] + list(ids)
        kinds = np.concatenate([np.asarray([KIND_PROMPT], np.int8), kinds])
    if eos_id is not None:
        ids = ids + [int(eos_id)]
        kinds = np.concatenate([kinds, np.asarray([_KIND_ID[sample.spans[-1][0]]], np.int8)])
    ids_arr = np.asarray(ids, np.int32)
    beh = np.zeros(len(ids_arr), np.float32)
    beh_mask = np.zeros(len(ids_arr), bool)
    n_cut = 0
    if sample.behaviour_logp is not None:
        nonprompt = kinds != KIND_PROMPT
        generated = kinds == KIND_GENERATED
        values = sample.behaviour_logp
        n, n_out = len(values), int(nonprompt.sum())
        if sample.behaviour_alignment == "original" and n >= n_out:
            values, n_cut, beh_mask = values[:n_out], n - n_out, nonprompt
        elif sample.behaviour_alignment == "original":
            raise SampleError(f"behaviour_logp (ref_prob) has {n} values for {n_out} output tokens; the "
                              f"original collator needs at least one per output token ({sample.metadata or 'no metadata'})")
        elif n == n_out:
            beh_mask = nonprompt
        elif n == int(generated.sum()):
            beh_mask = generated
        else:
            raise SampleError(
                f"behaviour_logp has {n} values but the tokenised sample has {n_out} non-prompt "
                f"and {int(generated.sum())} generated tokens ({sample.metadata or 'no metadata'})")
        beh[beh_mask] = np.asarray(values, np.float32)
    return TokenizedSample(sample, ids_arr, kinds, beh, beh_mask, boundary, n_cut)


def trained_mask(kinds, observations: str = "trained"):
    """Which tokens are trained: generated, plus observation tokens when ``observations == "trained"``
    (the original's IL and RL code trains the whole output, docs/paper.md §2.2, §3.4 item 3)."""
    if observations not in OBSERVATION_MODES:
        raise SampleError(f"unknown observations mode {observations!r}; valid: {', '.join(OBSERVATION_MODES)}")
    m = kinds == KIND_GENERATED
    return (m | (kinds == KIND_OBSERVATION)) if observations == "trained" else m


@dataclasses.dataclass
class Batch:
    """numpy tensors of one batch; ``arrays()`` gives the dict that ``losses.joint_loss`` takes."""
    tokens_BxT: np.ndarray          # int32, pad_id at padding
    positions_BxT: np.ndarray       # int32, 0.. per row over its valid tokens (0 at padding)
    valid_BxT: np.ndarray           # bool
    kinds_BxT: np.ndarray           # int8, KIND_* (KIND_PAD at padding)
    loss_mask_BxT: np.ndarray       # bool, trained tokens (never a row's first token)
    reward_BxT: np.ndarray          # float32, the row's reward on every non-prompt token (original)
    behaviour_logp_BxT: np.ndarray  # float32, 0 where absent
    behaviour_mask_BxT: np.ndarray  # bool
    role_B: np.ndarray              # int32, losses.ROLE_*
    objective_B: np.ndarray         # int32, losses.OBJECTIVE_*
    reward_B: np.ndarray            # float32, planner R_tau / shaped reflector reward / 0 for IL rows
    lengths_B: np.ndarray           # int32, valid tokens per row (after truncation)
    segments_BxT: np.ndarray        # int32, the row's sample 1, 2, .. (packed rows), 0 at padding
    n_rows: int                     # real rows (the rest are empty filler rows)
    n_truncated: int                # rows cut at max_len
    n_rows_untrained: int           # real rows left with no trained token (e.g. all cut by truncation)
    n_behaviour_cut: int = 0        # behaviour log-probs cut from over-long released lists (original rule)
    n_samples: int = 0              # samples in the real rows (> n_rows when rows are packed)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.endswith(("_BxT", "_B"))}


def _row_reward(s: Sample, reflector_reward: str, alpha: float) -> float:
    if s.objective == "il":
        return 0.0
    if s.role == "planner":
        if s.reward is None:
            raise SampleError(f"an RL planner sample needs `reward` ({s.metadata or 'no metadata'})")
        return float(s.reward)
    if s.last_reward is None or s.current_reward is None:
        raise SampleError(f"an RL reflector sample needs last_reward and current_reward ({s.metadata or 'no metadata'})")
    return float(losses.reflector_reward(float(s.last_reward), float(s.current_reward), reflector_reward, alpha))


def collate(samples: Sequence[TokenizedSample | Sequence[TokenizedSample]], buckets: Sequence[int],
            pad_id: int, *, max_len: int | None = None, padding: str = "right", observations: str = "trained",
            reflector_reward: str = "delta_scaled", alpha: float = 1.0, batch_size: int | None = None) -> Batch:
    """Pad ``samples`` to the smallest bucket that fits the longest row.

    An entry of ``samples`` is one sample, or a sequence of IL samples of one role packed into one row
    (``packing.py``): consecutive segments, positions restarting at 0 in each, ``segments_BxT`` 1, 2, ..;
    each segment's first token is untrained, as a row's. Truncation: rows longer than ``max_len``
    (default ``max(buckets)``) keep their first ``max_len`` tokens, as the original (``cutoff_len=2048``,
    ``truncation=True`` on the right); counted in ``n_truncated``; a packed row must fit ``max_len``.
    ``padding="right"`` is the training default (causal attention never looks right, so right pads
    change nothing before them and positions stay 0..n-1); ``"left"`` is offered for code that appends
    after the last token. ``batch_size``: fill up with empty rows (all-invalid) to a fixed number of
    rows so that a jitted step sees one shape. Rewards: ``reflector_reward`` / ``alpha`` as in
    ``losses.reflector_reward``; the row's scalar is broadcast over all its non-prompt tokens, as the
    original collator does.
    """
    if padding not in PADDINGS:
        raise SampleError(f"unknown padding {padding!r}; valid: {', '.join(PADDINGS)}")
    buckets = sorted(int(b) for b in buckets)
    if not buckets or buckets[0] < 2:
        raise SampleError(f"buckets must be a non-empty list of lengths >= 2, got {buckets}")
    max_len = buckets[-1] if max_len is None else int(max_len)
    if max_len > buckets[-1]:
        raise SampleError(f"max_len {max_len} exceeds the largest bucket {buckets[-1]}")
    rows = [tuple(x) if isinstance(x, (list, tuple)) else (x,) for x in samples]
    n = len(rows)
    B = n if batch_size is None else int(batch_size)
    if n == 0 or n > B or not all(rows):
        raise SampleError(f"collate needs 1..batch_size non-empty rows, got {n} for batch_size {B}")
    seg_lens = [[min(len(s), max_len) for s in row] for row in rows]
    for row, ls in zip(rows, seg_lens):
        if len(row) > 1 and (sum(ls) > max_len or any(s.sample.objective != "il" or s.sample.role !=
                                                      row[0].sample.role for s in row)):
            raise SampleError(f"a packed row needs IL samples of one role within max_len {max_len} "
                              f"tokens; got {[(s.sample.role, s.sample.objective) for s in row]}, "
                              f"{sum(ls)} tokens")
    lens = [sum(ls) for ls in seg_lens]
    T = next(b for b in buckets if b >= max(lens))
    out = dict(tokens=np.full((B, T), pad_id, np.int32), positions=np.zeros((B, T), np.int32),
               valid=np.zeros((B, T), bool), kinds=np.full((B, T), KIND_PAD, np.int8),
               beh=np.zeros((B, T), np.float32), beh_mask=np.zeros((B, T), bool),
               segments=np.zeros((B, T), np.int32))
    role = np.zeros(B, np.int32)
    objective = np.full(B, losses.OBJECTIVE_IL, np.int32)
    reward = np.zeros(B, np.float32)
    for i, (row, ls, L) in enumerate(zip(rows, seg_lens, lens)):
        at = 0 if padding == "right" else T - L
        for j, (ts, n_j) in enumerate(zip(row, ls)):
            sl = slice(at, at + n_j)
            out["tokens"][i, sl] = ts.ids[:n_j]
            out["positions"][i, sl] = np.arange(n_j)
            out["valid"][i, sl] = True
            out["kinds"][i, sl] = ts.kinds[:n_j]
            out["beh"][i, sl] = ts.behaviour_logp[:n_j]
            out["beh_mask"][i, sl] = ts.behaviour_mask[:n_j]
            out["segments"][i, sl] = j + 1
            at += n_j
        role[i] = ROLES[row[0].sample.role]
        objective[i] = OBJECTIVES[row[0].sample.objective]
        reward[i] = _row_reward(row[0].sample, reflector_reward, alpha)
    kinds = out["kinds"]
    first_valid = out["valid"] & (out["positions"] == 0)      # every segment's first token
    loss_mask = trained_mask(kinds, observations) & out["valid"] & ~first_valid
    nonprompt = (kinds == KIND_GENERATED) | (kinds == KIND_OBSERVATION)
    reward_BxT = np.where(nonprompt, reward[:, None], 0.0).astype(np.float32)
    flat = [s for row in rows for s in row]
    return Batch(
        tokens_BxT=out["tokens"], positions_BxT=out["positions"], valid_BxT=out["valid"], kinds_BxT=kinds,
        loss_mask_BxT=loss_mask, reward_BxT=reward_BxT, behaviour_logp_BxT=out["beh"],
        behaviour_mask_BxT=out["beh_mask"], role_B=role, objective_B=objective, reward_B=reward,
        lengths_B=np.asarray(lens + [0] * (B - n), np.int32), segments_BxT=out["segments"], n_rows=n,
        n_truncated=sum(len(s) > max_len for s in flat),
        n_rows_untrained=int(np.sum(~loss_mask[:n].any(axis=1))),
        n_behaviour_cut=sum(s.n_behaviour_cut for s in flat), n_samples=len(flat))


# ----------------------------------------------------------------------------------------------------
# epochs: length-grouped, seeded, resumable


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                           mega_batch_mult: int = 50) -> list[np.ndarray]:
    """One epoch's batches of row indices, grouped by length (HF ``group_by_length``, used by the original).

    A permutation from ``(seed, epoch)`` is cut into mega-batches of ``mega_batch_mult * batch_size`` rows,
    each sorted by length (longest first) and cut into batches; the batch order is then shuffled with the
    same generator. Lengths are token counts (the original's sampler saw the prompt's character length).
    Deterministic in ``(lengths, batch_size, seed, epoch)``.
    """
    if batch_size < 1:
        raise SampleError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(len(lengths))
    mega = batch_size * max(1, int(mega_batch_mult))
    batches = []
    for m0 in range(0, len(perm), mega):
        chunk = perm[m0:m0 + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def iterate_batches(samples: Sequence[TokenizedSample], batch_size: int, seed: int, *,
                    start: tuple[int, int] = (0, 0), num_epochs: int | None = None,
                    group_by_length: bool = True, **collate_kwargs) -> Iterator[tuple[tuple[int, int], Batch]]:
    """Yield ``((epoch, index), batch)`` from ``start`` on, for ``num_epochs`` epochs (None: forever).

    Every batch has ``batch_size`` rows (the last of an epoch is filled with empty rows). To resume after
    the batch at ``(epoch, index)``, pass ``start=(epoch, index + 1)`` (an index past the epoch's end starts
    the next epoch). ``collate_kwargs`` go to ``collate`` (``buckets`` and ``pad_id`` are required).
    """
    if not samples:
        raise SampleError("iterate_batches needs at least one sample")
    lengths = [len(s) for s in samples]
    epoch, index = int(start[0]), int(start[1])
    if epoch < 0 or index < 0:
        raise SampleError(f"start must be non-negative (epoch, index), got {start}")
    while num_epochs is None or epoch < num_epochs:
        if group_by_length:
            order = length_grouped_batches(lengths, batch_size, seed, epoch)
        else:
            perm = np.random.default_rng([int(seed), epoch]).permutation(len(samples))
            order = [perm[b:b + batch_size] for b in range(0, len(perm), batch_size)]
        for i in range(index, len(order)):
            yield (epoch, i), collate([samples[j] for j in order[i]], batch_size=batch_size, **collate_kwargs)
        epoch, index = epoch + 1, 0
