"""InterCode's SQL reward, reimplemented: multiset IoU of result rows, scaled by Kendall's tau.

The rule (InterCode ``sql_env.get_reward``): both results must be lists of rows, else 0. Rows are
compared as ``str(row)``. With A the agent's rows and G the gold's as multisets:
``iou = |A & G| / |A | G|`` (1 if both are empty). If ``A & G`` is not empty, take the agent's rows that
are in the intersection in the agent's order, and the gold's in the gold's order (each row at most as
often as in the intersection), and compute Kendall's tau-b between these two equally long lists
(elementwise pairs, values compared as strings). If tau is defined (not NaN) the reward is
``round(tau * iou, 2)`` (numpy rounding, as on scipy's float64); otherwise the unrounded iou.
Tau can be negative, so the reward can be negative (the released RetroAct data has -0.47).

``kendall_tau_b`` is our own: dense ranks of any mutually comparable values (Python order, which is
numpy's order for strings and numbers), tie counts and an O(n log n) discordant-pair count, combined
with exactly scipy's float formula, so that it equals ``scipy.stats.kendalltau(x, y).statistic``
bit for bit on numeric data, without depending on how scipy treats string arrays.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np


def _dense_ranks(values: Sequence[Any]) -> list[int]:
    order = {v: r for r, v in enumerate(sorted(set(values)), start=1)}
    return [order[v] for v in values]


def _pairs_tied(ranks: Sequence[int]) -> int:
    return sum(c * (c - 1) // 2 for c in Counter(ranks).values())


def _count_inversions(seq: list[int]) -> int:
    """Number of pairs i < j with seq[i] > seq[j] (strict), by merge sort."""
    inv, width, a, n = 0, 1, list(seq), len(seq)
    while width < n:
        out = []
        for lo in range(0, n, 2 * width):
            left, right = a[lo:lo + width], a[lo + width:lo + 2 * width]
            i = j = 0
            while i < len(left) and j < len(right):
                if right[j] < left[i]:
                    inv += len(left) - i
                    out.append(right[j])
                    j += 1
                else:
                    out.append(left[i])
                    i += 1
            out.extend(left[i:])
            out.extend(right[j:])
        a, width = out, 2 * width
    return inv


def kendall_tau_b(x: Sequence[Any], y: Sequence[Any]) -> float:
    """Kendall's tau-b of paired sequences; NaN when undefined (empty, length 1, or all tied)."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: lengths differ ({len(x)} vs {len(y)})")
    n = len(x)
    if n == 0:
        return float("nan")
    rx, ry = _dense_ranks(x), _dense_ranks(y)
    tot = n * (n - 1) // 2
    xtie, ytie = _pairs_tied(rx), _pairs_tied(ry)
    if xtie == tot or ytie == tot:
        return float("nan")
    ntie = _pairs_tied(list(zip(rx, ry)))
    pairs = sorted(zip(rx, ry))                    # by x, then y: ties in x add no inversions
    dis = _count_inversions([p[1] for p in pairs])  # strict y-inversions = discordant pairs
    con_minus_dis = tot - xtie - ytie + ntie - 2 * dis
    tau = con_minus_dis / np.sqrt(tot - xtie) / np.sqrt(tot - ytie)
    return float(np.minimum(1.0, max(-1.0, tau)))


def _intersect_in_order(rows: list[str], inter: Counter) -> list[str]:
    left, out = Counter(inter), []
    for r in rows:
        if left[r] > 0:
            left[r] -= 1
            out.append(r)
    return out


def sql_reward(agent: Any, gold: Any) -> float:
    """InterCode's reward of the agent's last observation ``agent`` against the gold rows ``gold``.

    Either is a list of rows (tuples) or anything else (an error string, None) which gives 0.
    """
    if not (isinstance(agent, list) and isinstance(gold, list)):
        return 0.0
    rows_a, rows_g = [str(r) for r in agent], [str(r) for r in gold]
    dist_a, dist_g = Counter(rows_a), Counter(rows_g)
    inter = dist_a & dist_g
    union = dist_a | dist_g                        # max of the counts, as InterCode's groupby
    if not union:
        return 1.0
    reward = sum(inter.values()) * 1.0 / sum(union.values())
    if inter:
        tau = kendall_tau_b(_intersect_in_order(rows_a, inter), _intersect_in_order(rows_g, inter))
        if not math.isnan(tau):
            reward = float(round(np.float64(tau) * reward, 2))
    return reward
