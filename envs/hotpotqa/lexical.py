"""The default Search ranker: BM25 over the pack's paragraphs, title and text as two fields.

Deterministic and dependency-free. Tokens: Unicode case-fold, NFKD with combining marks dropped
(so "beschrankter" finds "beschränkter"), then runs of word characters (``\\w+``). Statistics
(document frequencies, average field lengths) come from the whole pack corpus (8,367 paragraphs)
in both env modes, so a paragraph scores the same whether it is ranked among its question's ten
paragraphs or among all of them.

score(q, p) = BM25(q, text_p) + TITLE_WEIGHT * BM25(q, title_p), unique query tokens,
k1 = 1.2, b = 0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5)).
Ranking key: (query equals the title after tokenisation, score, earlier position first). So
``Search[<a title>]`` returns that title's paragraph whenever the title is among the candidates;
ties fall to the candidate listed first (context order, or corpus order).
"""
from __future__ import annotations

import collections
import functools
import re
import unicodedata
from typing import Sequence

import numpy as np

from envs.hotpotqa.pack import Corpus

K1, B, TITLE_WEIGHT = 1.2, 0.75, 2.0
_WORD = re.compile(r"\w+")


@functools.lru_cache(maxsize=1 << 16)
def _fold(token: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKD", token) if not unicodedata.combining(ch))


def tokens(text: str) -> list[str]:
    """Case-folded, accent-stripped word tokens (only non-ASCII tokens need the slow path)."""
    return [t if t.isascii() else _fold(t) for t in _WORD.findall(unicodedata.normalize("NFC", text.casefold()))]


class _Field:
    """One BM25 field as CSR postings: per term, its documents and precomputed BM25 weights there."""

    def __init__(self, docs: Sequence[list[str]]):
        n = len(docs)
        lens_N = np.array([len(d) for d in docs], dtype=np.int64)
        avg = max(float(lens_N.mean()) if n else 0.0, 1e-9)
        self.term_id: dict[str, int] = {}
        term_T = np.fromiter((self.term_id.setdefault(t, len(self.term_id)) for d in docs for t in d),
                             dtype=np.int64, count=int(lens_N.sum()))
        doc_T = np.repeat(np.arange(n, dtype=np.int64), lens_N)
        pair, tf_P = np.unique(term_T * max(n, 1) + doc_T, return_counts=True)
        term_P, doc_P = pair // max(n, 1), pair % max(n, 1)       # sorted by term, then doc
        df_V = np.bincount(term_P, minlength=len(self.term_id))
        idf_V = np.log1p((n - df_V + 0.5) / (df_V + 0.5))
        norm_P = K1 * (1.0 - B + B * lens_N[doc_P] / avg)
        self.doc_P = doc_P
        self.weight_P = idf_V[term_P] * tf_P * (K1 + 1.0) / (tf_P + norm_P)
        self.start_V = np.concatenate([[0], np.cumsum(df_V)])

    def add_scores(self, terms: set[str], out_N: np.ndarray, weight: float) -> None:
        for term in terms:
            v = self.term_id.get(term)
            if v is not None:
                lo, hi = self.start_V[v], self.start_V[v + 1]
                out_N[self.doc_P[lo:hi]] += weight * self.weight_P[lo:hi]   # unique docs per term


class BM25Ranker:
    """``best(query, pids)`` -> the pid to show, or None when no candidate shares a token."""

    name = "lexical"

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        title_toks = [tokens(t) for t in corpus.titles]
        self.text = _Field([tokens(t) for t in corpus.texts])
        self.title = _Field(title_toks)
        self.pids_of_key: dict[str, list[int]] = collections.defaultdict(list)
        for pid, toks in enumerate(title_toks):
            if toks:
                self.pids_of_key[" ".join(toks)].append(pid)

    def scores(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """(score_N, exact_title_N) over the whole corpus."""
        q = tokens(query)
        score_N = np.zeros(len(self.corpus), np.float64)
        self.text.add_scores(set(q), score_N, 1.0)
        self.title.add_scores(set(q), score_N, TITLE_WEIGHT)
        exact_N = np.zeros(len(self.corpus), bool)
        exact_N[self.pids_of_key.get(" ".join(q), [])] = True
        return score_N, exact_N

    def best(self, query: str, pids: Sequence[int] | None = None) -> int | None:
        score_N, exact_N = self.scores(query)
        cand_C = np.arange(len(self.corpus)) if pids is None else np.asarray(pids, np.int64)
        if cand_C.size == 0:
            return None
        s_C, e_C = score_N[cand_C], exact_N[cand_C]
        # np.lexsort: last key is primary. Order: exact desc, score desc, position asc.
        first = int(np.lexsort((np.arange(cand_C.size), -s_C, ~e_C))[0])
        if not e_C[first] and s_C[first] <= 0.0:
            return None
        return int(cand_C[first])


@functools.lru_cache(maxsize=1)
def shared(corpus: Corpus) -> BM25Ranker:
    """One index per process (building it takes about a second)."""
    return BM25Ranker(corpus)
