"""Text spans: the one representation of an agent's context, at inference and in training.

Every prompt the agent sends to a model, and every training sample made from a trajectory, is a
list of ``Span``s rendered by ``render`` (plain concatenation, nothing added). A span's role says
where its text came from:

  ``prompt``       instruction, memory of reflections, task text (role-specific preamble)
  ``generated``    exactly what the model sampled (including the stop string that ended it), with
                   the sampled token ids and behaviour log-probs when a language model made it
  ``observation``  everything else that is appended during the episode: environment observations
                   and the scaffold cues such as ``"\\nThought 2:"`` or ``"\\n>"``

Because the agent builds the next prompt by *appending* spans, the text a model saw at step t is
``render(spans[:i])`` for the span ``i`` it generated; the training sample is ``render(spans)``
with the same boundaries. Tokens: the whole text is tokenised at once, on both sides (the
tokenizer's ``encode_pieces`` for training, batching.py; ``encode(render(spans))`` in the LM policy,
which keeps its KV cache equal to that tokenisation by rolling back to the longest common prefix). No formatting function exists anywhere else (docs/paper.md §3.4 item 8: the
original trained on text that differed from its inference prompts; this design rules that out).

``join_cue(prev, cue)`` appends a canonical cue (``"\\nAction 1:"``) after a generated text that
may already end with part of it (a completion stopped by ``"\\n"`` ends with ``"\\n"``; one stopped
by ``"Observation"`` ends with it): only the missing remainder is appended, so the rendered text
is the canonical format whatever the stop token was.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

ROLES = ("prompt", "generated", "observation")


@dataclasses.dataclass
class Span:
    role: str
    text: str
    token_ids: list[int] | None = None   # generated spans: the sampled ids (None for scripted text)
    logprobs: list[float] | None = None  # behaviour log-probs of token_ids under the sampler

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"span role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"span text must be str, got {type(self.text).__name__}")
        if self.logprobs is not None and self.token_ids is not None \
                and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"span has {len(self.token_ids)} token ids but "
                             f"{len(self.logprobs)} log-probs")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "text": self.text}
        if self.token_ids is not None:
            out["token_ids"] = list(map(int, self.token_ids))
        if self.logprobs is not None:
            out["logprobs"] = [float(x) for x in self.logprobs]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Span":
        return cls(role=d["role"], text=d["text"], token_ids=d.get("token_ids"),
                   logprobs=d.get("logprobs"))


def render(spans: Iterable[Span]) -> str:
    """The text of a span list: plain concatenation."""
    return "".join(s.text for s in spans)


def overlap(tail: str, head: str) -> int:
    """Length of the longest suffix of ``tail`` that is a prefix of ``head``."""
    for n in range(min(len(tail), len(head)), 0, -1):
        if tail.endswith(head[:n]):
            return n
    return 0


def join_cue(prev: str, cue: str) -> str:
    """The part of ``cue`` still to append after ``prev`` so that ``prev`` reads as ending in ``cue``.

    Only used right after a *generated* span: the model may have produced the start of the cue
    itself (the stop string). ``join_cue(" go to desk 1\\n", "\\nOn the desk")`` is ``"On the desk"``.
    """
    return cue[overlap(prev, cue):]


def append_observation(spans: list[Span], text: str) -> None:
    """Append ``text`` as observation, trimming what a preceding generated span already wrote."""
    if spans and spans[-1].role == "generated":
        text = join_cue(spans[-1].text, text)
    if text:
        # never merged with a previous observation span: span boundaries are token boundaries,
        # and a span's tokens must not change once a KV cache holds them
        spans.append(Span("observation", text))


def spans_to_json(spans: Sequence[Span]) -> list[dict[str, Any]]:
    return [s.to_json() for s in spans]


def spans_from_json(rows: Sequence[dict[str, Any]]) -> list[Span]:
    return [Span.from_json(r) for r in rows]
