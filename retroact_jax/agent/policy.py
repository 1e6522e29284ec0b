"""The policy interface the agent loop talks to, and a scripted policy for tests.

``Policy.generate(requests, stop, max_new_tokens, temperature) -> [Completion]`` answers a batch
of requests in one call. A request names its episode (``key``) and carries the episode's whole
context as spans (spans.py); a policy with a KV cache keeps one cache per key and extends it with
only what was appended since its last call (``LMPolicy`` in lm_policy.py). ``release(keys)`` drops
that state when an episode ends. A completion's text ends with the stop string that ended it (the
model emitted it; it is part of the context from then on) or ends where the token budget ran out.

``ScriptedPolicy`` answers from a function of the prompt text: no model, deterministic; used by
tests to drive the real environments through the loop.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Protocol, Sequence

from retroact_jax.agent.prompts import approx_token_count
from retroact_jax.agent.spans import Span, render


@dataclasses.dataclass(frozen=True)
class Request:
    key: Hashable                 # the episode this context belongs to (cache handle)
    spans: Sequence[Span]         # the whole context
    seed: int = 0                 # sampling seed for this call (deterministic per episode/call)


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    finish: str = "stop"          # "stop" (a stop string ended it), "eos" (the model's end-of-sequence
                                  #   token did; it is not part of text / token_ids) or "length"


class Policy(Protocol):
    def generate(self, requests: Sequence[Request], stop: Sequence[str], max_new_tokens: int,
                 temperature: float) -> list[Completion]: ...

    def release(self, keys: Sequence[Hashable]) -> None: ...

    def count_tokens(self, text: str) -> int: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to and including the earliest stop string; (text, whether one was found)."""
    best = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best is None or i + len(s) < best):
            best = i + len(s)
    return (text, False) if best is None else (text[:best], True)


@dataclasses.dataclass(frozen=True)
class ScriptCall:
    prompt: str                   # render(spans): the exact text a model would see
    key: Hashable
    stop: tuple[str, ...]
    temperature: float


class ScriptedPolicy:
    """Answers ``script(ScriptCall) -> str``; the text is cut after its first stop string.

    Token counts use ``approx_token_count`` (words and punctuation). ``calls`` counts generate()
    calls and ``requests`` the requests answered, for tests of batching.
    """

    def __init__(self, script: Callable[[ScriptCall], str]):
        self.script = script
        self.calls = 0
        self.requests = 0
        self.batch_sizes: list[int] = []
        self.released: list[Hashable] = []

    def generate(self, requests, stop, max_new_tokens, temperature):
        self.calls += 1
        self.requests += len(requests)
        self.batch_sizes.append(len(requests))
        out = []
        for r in requests:
            raw = self.script(ScriptCall(render(r.spans), r.key, tuple(stop), float(temperature)))
            if not isinstance(raw, str):
                raise TypeError(f"script returned {type(raw).__name__}, expected str")
            text, hit = cut_at_stop(raw, stop)
            out.append(Completion(text=text, finish="stop" if hit else "length"))
        return out

    def release(self, keys):
        self.released.extend(keys)

    def count_tokens(self, text):
        return approx_token_count(text)
