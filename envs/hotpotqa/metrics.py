"""HotpotQA answer metrics, with the official evaluation script's rules (``hotpot_evaluate_v1.py``).

``normalize_answer``: lower case, drop ASCII punctuation (``string.punctuation``), drop the
articles a/an/the as whole words, collapse whitespace (in that order, as the official script).
``f1``: SQuAD-style token F1 on normalised answers; if either side normalises to ``yes``, ``no``
or ``noanswer`` and the two differ, F1 is 0. ``exact_match``: normalised strings equal.

EM vs the RetroAct agent's ``is_correct`` (``F1 == 1.0``): they agree except in two cases.
F1 is 1 when the normalised token *multisets* are equal, so a reordering ("york new" vs
"new york") has F1 1 and EM 0. An answer that normalises to "" (e.g. "The") has EM 1 against an
empty-normalised gold but F1 0, because no tokens are shared. Neither case occurs for a gold answer
of this pack answered with itself (tests check all 100 test questions).
"""
from __future__ import annotations

import collections
import re
import string

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SPECIAL = ("yes", "no", "noanswer")


def normalize_answer(s: str) -> str:
    """Official HotpotQA normalisation: lower, remove punctuation, remove articles, fix spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def f1_precision_recall(prediction: str, gold: str) -> tuple[float, float, float]:
    """(F1, precision, recall) of ``prediction`` against ``gold`` as the official script."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in _SPECIAL or ref in _SPECIAL) and pred != ref:
        return 0.0, 0.0, 0.0
    pred_toks, ref_toks = pred.split(), ref.split()
    same = sum((collections.Counter(pred_toks) & collections.Counter(ref_toks)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    precision = same / len(pred_toks)
    recall = same / len(ref_toks)
    return 2 * precision * recall / (precision + recall), precision, recall


def f1(prediction: str, gold: str) -> float:
    return f1_precision_recall(prediction, gold)[0]


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)
