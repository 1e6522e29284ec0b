"""InterCode's bash reward (``intercode/envs/bash/bash_env.py: BashEnv.get_reward``), re-derived.

reward = 0.01 + p1 + p2 + p3, each part rounded to 2 decimals as InterCode does:
- p1 (file-system diff) = 0.33 * (1 - erf(#missing + #extra)), where missing/extra are the
  (path, status) pairs of the gold's ``git status`` that the agent's lacks, and the converse.
- p2 (file contents) = 0.33 * (#same / #common) over the pairs both diffs share whose status is
  ``A``, ``??`` or ``C`` (not ``M``: InterCode's filter); 0.33 when there are none.
- p3 (output) = 0.33 * cosine similarity of TF-IDF vectors (scikit-learn ``TfidfVectorizer``
  defaults, fitted on just the two texts) of the agent's last observation and the gold's output;
  when the vocabulary is empty (e.g. both outputs are only one-character tokens) or the agent
  has no observation yet, 1 if the texts are equal, else 0.
Maximum 1.00; success is reward == 1. The sum is kept in hundredths, so == 1 is exact.

Hashing the common changes (mode ``"intercode"``, the default, reproduces what InterCode's
evaluation actually computed): InterCode runs ``md5sum P`` when P contains a ``.`` and
``md5deep -r P`` otherwise. Its image has no ``md5deep``, so both containers print the same
"executable file not found" error and every dot-less path counts as the same; ``md5sum`` of a
directory prints the same "Is a directory" error on both sides. So only files whose path
contains a dot are really compared (here: content md5 + kind; a symlink by its target text,
where md5sum would follow it). Mode ``"strict"`` compares what was meant: every common change
(also ``M``), files by content, folders by the digests of all files beneath them.
"""
from __future__ import annotations

import collections
import math
import re

from envs.intercode_bash import fs

_TOKEN = re.compile(r"(?u)\b\w\w+\b")
MODES = ("intercode", "strict")


def tfidf_similarity(a: str | None, b: str | None) -> float:
    """Cosine of scikit-learn-default TF-IDF vectors fitted on [a, b]; the except branch as InterCode."""
    if a is None or b is None:
        return 1.0 if a == b else 0.0
    docs = [collections.Counter(_TOKEN.findall(t.lower())) for t in (a, b)]
    vocab = set(docs[0]) | set(docs[1])
    if not vocab:                      # sklearn: "empty vocabulary" ValueError
        return 1.0 if a == b else 0.0
    idf = {t: math.log(3.0 / (1.0 + sum(t in d for d in docs))) + 1.0 for t in vocab}
    vecs = []
    for d in docs:
        v = {t: c * idf[t] for t, c in d.items()}
        n = math.sqrt(sum(x * x for x in v.values()))
        vecs.append({t: x / n for t, x in v.items()} if n > 0 else {})
    return sum(x * vecs[1].get(t, 0.0) for t, x in vecs[0].items())


def _hundredths(x: float) -> int:
    return int(round(round(0.33 * x, 2) * 100))


def bash_reward(agent_init: dict, agent_now: dict, gold_init: dict, gold_now: dict,
                agent_obs: str | None, gold_obs: str | None, mode: str = "intercode") -> tuple[float, dict]:
    """(reward, details) from the four snapshots and the two outputs."""
    if mode not in MODES:
        raise ValueError(f"unknown bash reward mode {mode!r}; known: {MODES}")
    diff_agent = fs.git_status(agent_init, agent_now)
    diff_gold = fs.git_status(gold_init, gold_now)
    miss, extra = diff_gold - diff_agent, diff_agent - diff_gold
    p1 = _hundredths(1.0 - math.erf(len(miss) + len(extra)))
    statuses = ("A", "??", "C") if mode == "intercode" else ("A", "??", "C", "M")
    common = sorted(x for x in diff_agent & diff_gold if x[1] in statuses)
    same = 0
    for path, _ in common:
        if mode == "intercode":
            p = path.rstrip("/")
            a, g = agent_now["files"].get(p), gold_now["files"].get(p)
            compared = "." in path and a is not None and g is not None
            same += int(a == g) if compared else 1
        else:
            same += int(fs.tree_digest(agent_now, path) == fs.tree_digest(gold_now, path))
    p2 = _hundredths(same / len(common)) if common else 33
    sim = tfidf_similarity(agent_obs, gold_obs)
    p3 = _hundredths(sim)
    total = 1 + p1 + p2 + p3
    details = {"file_diff": p1 / 100, "file_changes": p2 / 100, "answer_similarity": p3 / 100,
               "similarity": sim, "diff_miss": sorted(miss), "diff_extra": sorted(extra),
               "diff_same": {"files": common, "correct": same, "total": len(common)},
               "reward_hundredths": total}
    return total / 100.0, details
