"""The HotpotQA distractor pack as tasks and as one paragraph store.

``rows()`` parses ``data/hotpotqa/hotpotqa_distractor.jsonl.gz`` (sha256-checked by
``envs.data.path``) once per process and validates every row, so a damaged pack fails here with
the row and field named, not later inside an episode. ``tasks(split)`` gives the split's questions
in pack order (``test`` = the 100 Reflexion questions in Reflexion order). ``corpus()`` holds every
paragraph of the pack once (deduplicated by title; the pack README states each title has exactly
one sentence list), with each question's own paragraphs as indices into it.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import json
from typing import Any, Sequence

from envs import data as pack_data
from envs.base import Task

PACK_FILE = "hotpotqa/hotpotqa_distractor.jsonl.gz"
SPLITS = ("test", "train")
_FIELDS = {"id": str, "question": str, "answer": str, "type": str, "level": str,
           "supporting_facts": list, "context": list, "split": str}


class PackError(RuntimeError):
    """A row of the HotpotQA pack does not have the documented schema."""


def _check_row(i: int, row: Any) -> dict:
    if not isinstance(row, dict):
        raise PackError(f"{PACK_FILE} line {i + 1}: expected a JSON object, got {type(row).__name__}")
    for key, typ in _FIELDS.items():
        if not isinstance(row.get(key), typ):
            raise PackError(f"{PACK_FILE} line {i + 1} (id {row.get('id')!r}): field {key!r} "
                            f"missing or not a {typ.__name__}")
    if row["split"] not in SPLITS:
        raise PackError(f"{PACK_FILE} line {i + 1}: split {row['split']!r} not in {SPLITS}")
    for par in row["context"]:
        if not (isinstance(par, list) and len(par) == 2 and isinstance(par[0], str)
                and isinstance(par[1], list) and all(isinstance(s, str) for s in par[1])):
            raise PackError(f"{PACK_FILE} line {i + 1} (id {row['id']}): a context entry is not "
                            f"[title, [sentence, ...]]")
    return row


@functools.lru_cache(maxsize=1)
def rows() -> tuple[dict, ...]:
    """Every pack row, validated, in pack order."""
    out = []
    with gzip.open(pack_data.path(PACK_FILE), "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PackError(f"{PACK_FILE} line {i + 1}: not JSON ({e})") from None
                out.append(_check_row(i, row))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def tasks(split: str) -> tuple[Task, ...]:
    """The split's questions as ``Task``s; ``index`` is the position within the split."""
    if split not in SPLITS:
        raise ValueError(f"hotpotqa: unknown split {split!r}; known: {SPLITS}")
    chosen = [r for r in rows() if r["split"] == split]
    return tuple(
        Task(env="hotpotqa", split=split, index=i, id=r["id"], instruction=r["question"],
             data={"answer": r["answer"], "type": r["type"], "level": r["level"],
                   "supporting_facts": r["supporting_facts"], "context": r["context"], "id": r["id"]})
        for i, r in enumerate(chosen))


@dataclasses.dataclass(frozen=True, eq=False)   # hashed by identity (one per process)
class Corpus:
    """All distinct paragraphs of the pack. ``pid`` indexes ``titles``/``sentences``/``texts``."""
    titles: tuple[str, ...]
    sentences: tuple[tuple[str, ...], ...]
    texts: tuple[str, ...]                   # "".join(sentences).strip(): sentences keep their spaces
    pid_of_title: dict[str, int]

    def __len__(self) -> int:
        return len(self.titles)

    def pids_of(self, context: Sequence) -> tuple[int, ...]:
        """The pids of a question's ``context`` paragraphs, in context order."""
        return tuple(self.pid_of_title[title] for title, _ in context)

    def passage(self, pid: int) -> str:
        """What a Search shows: ``"<title>: <text>"`` with newlines removed (as ``format_step``)."""
        return f"{self.titles[pid]}: {self.texts[pid]}".replace("\n", "")


@functools.lru_cache(maxsize=1)
def corpus() -> Corpus:
    titles, sentences, pid_of_title = [], [], {}
    for r in rows():
        for title, sents in r["context"]:
            if title not in pid_of_title:
                pid_of_title[title] = len(titles)
                titles.append(title)
                sentences.append(tuple(sents))
    texts = tuple("".join(s).strip() for s in sentences)
    return Corpus(tuple(titles), tuple(sentences), texts, pid_of_title)
