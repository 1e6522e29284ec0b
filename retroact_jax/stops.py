"""Stop strings for the sampler: the tokens whose text contains one (``stop_mask``) and the token
sequences that spell one across several tokens (``stop_seqs``, checked inside the decode loop).

The decoded text must still be cut on the stop string: a spelling neither form catches runs to the
token budget (``agent/lm_policy.py`` does both).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

MAX_STOP_SEQS, MAX_STOP_LEN = 16, 8    # multi-token stop sequences: how many, how long


class StopError(ValueError):
    """Stop strings or sequences that the sampler cannot use."""


def stop_token_mask(decode: Callable[[int], str], vocab_size: int,
                    stop_strings: Sequence[str]) -> np.ndarray:
    """[V] bool: tokens whose decoded text contains any stop string (e.g. ``"\\n"``).

    ``decode(id) -> str`` decodes one token (e.g. ``lambda i: tok.decode([i])``). A stop string
    that only appears across a token boundary is not caught here: trim the decoded text as well.
    """
    if not stop_strings or any(not s for s in stop_strings):
        raise StopError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
    return np.asarray([any(s in decode(i) for s in stop_strings) for i in range(vocab_size)], bool)


def stop_token_sequences(encode: Callable[[str], Sequence[int]], decode: Callable[[Sequence[int]], str],
                         stop_strings: Sequence[str],
                         contexts: Sequence[str] = ("", " ", "\n", ":", ".", "]", "1")) -> list[tuple[int, ...]]:
    """Token sequences that complete a stop string spanning several tokens, for ``stop_seqs``.

    For each stop string s and context c, ``encode(c + s)`` minus the leading tokens whose text
    lies wholly in c; kept when it has >= 2 tokens (a one-token completion is ``stop_mask``'s job)
    and <= ``MAX_STOP_LEN``. Early stopping only: a stop string the model spells with another
    tokenisation still runs to the budget and must be cut on the decoded text as well.
    """
    out: list[tuple[int, ...]] = []
    for s in stop_strings:
        if not s:
            raise StopError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        for c in contexts:
            ids = list(encode(c + s))
            while ids and len(decode(ids[1:])) >= len(s) and s in decode(ids[1:]):
                ids = ids[1:]                           # drop context-only leading tokens
            if 2 <= len(ids) <= MAX_STOP_LEN and tuple(ids) not in out:
                out.append(tuple(ids))
    return out[:MAX_STOP_SEQS]


def stop_seq_array(stop_seqs) -> np.ndarray:
    """[MAX_STOP_SEQS, MAX_STOP_LEN] int32, right-aligned, -1 = unused position / unused row."""
    seqs = [] if stop_seqs is None else [tuple(int(t) for t in q) for q in stop_seqs]
    if len(seqs) > MAX_STOP_SEQS or any(not 1 <= len(q) <= MAX_STOP_LEN for q in seqs):
        raise StopError(f"stop_seqs: at most {MAX_STOP_SEQS} sequences of 1..{MAX_STOP_LEN} tokens, got {stop_seqs!r}")
    arr = np.full((MAX_STOP_SEQS, MAX_STOP_LEN), -1, np.int32)
    for i, q in enumerate(seqs):
        arr[i, MAX_STOP_LEN - len(q):] = q
    return arr


def seq_stopped(recent_BxL, stop_SxL):
    """Traced, in the decode loop: [B] bool, the row's last L tokens end with one of the sequences of
    ``stop_seq_array`` (right-aligned, -1 padded)."""
    used = stop_SxL >= 0
    hit = jnp.all(~used[None] | (recent_BxL[:, None, :] == stop_SxL[None]), axis=-1)   # [B, S]
    return jnp.any(hit & jnp.any(used, axis=-1)[None], axis=-1)
