"""Packing short training rows into one padded row: which rows share a row, epoch by epoch.

Most IL rows are far shorter than the length bucket they are padded to (the released InterCode and
ALFWorld rows and the HotpotQA gold rows: bench/README.md, "IL packing"), and every padded token costs
as much as a real one. ``pack_epoch`` plans one epoch of packed rows: a permutation from
``(seed, epoch)`` is cut into chunks of ``chunk`` rows; each chunk is packed first-fit decreasing into
rows of ``capacity`` tokens (a row longer than ``capacity`` gets a row of its own); the packed rows of
all chunks are then shuffled with the same generator. Every row index appears exactly once per epoch,
and the plan is a function of ``(lengths, capacity, seed, epoch, chunk)`` only, so a resumed run walks
the same packed rows.

``batching.collate`` turns a group of samples into one row: consecutive segments, positions restarting
at 0 in each, ``segments_BxT`` = 1, 2, ... (0 at padding); the decoder lets a token attend within its
own segment only (``models/attention.py``, every implementation) and a segment's first token is never
trained, so the ``tokens``-normalised IL loss of a packed row equals that of the same samples unpacked
(tests/test_packing.py). The ``positions`` normalisation divides by each *row's* positions and would
weight packed samples differently: the IL stage refuses packing with it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class PackingError(ValueError):
    pass


def pack_epoch(lengths: Sequence[int], capacity: int, seed: int, epoch: int,
               chunk: int = 64) -> list[np.ndarray]:
    """One epoch's packed rows: a list of row-index arrays (longest row first in each)."""
    lengths_N = np.asarray(lengths, np.int64)
    if capacity < 1 or chunk < 1:
        raise PackingError(f"capacity and chunk must be >= 1, got {capacity}, {chunk}")
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(len(lengths_N))
    packed: list[list[int]] = []
    for c0 in range(0, len(perm), chunk):
        part = perm[c0:c0 + chunk]
        part = part[np.argsort(-lengths_N[part], kind="stable")]
        rows, room = [], []
        for i in part:
            n = int(lengths_N[i])
            k = next((j for j, r in enumerate(room) if r >= n), None)
            if k is None:
                rows.append([int(i)])
                room.append(max(capacity - n, 0))
            else:
                rows[k].append(int(i))
                room[k] -= n
        packed += rows
    order = rng.permutation(len(packed))
    return [np.asarray(packed[k], np.int64) for k in order]


def steps_of(groups: Sequence[np.ndarray], rows: int) -> list[list[np.ndarray]]:
    """Consecutive packed rows, ``rows`` per step (the last step may hold fewer)."""
    if rows < 1:
        raise PackingError(f"rows per step must be >= 1, got {rows}")
    return [list(groups[k:k + rows]) for k in range(0, len(groups), rows)]
