"""Per-environment agent step protocols: which cue precedes each model call, where it stops,
how the completion becomes an action, how observations and reflector inputs are rendered.

One protocol object per benchmark, stateless; the per-episode state (step number, phase, retry
count) lives on the ``Episode`` (loop.py). The original's rules (docs/paper.md §1.2-1.4):

HotpotQA   two calls per step (the original ``ReactAgent.step``): cue ``\\nThought n:`` stop ``\\n``,
           then cue ``\\nAction n:`` stop ``\\n``; the action is the completion stripped with its
           newlines removed (``format_step``); observation ``\\nObservation n: {obs}`` with the
           observation's newlines removed. 5 steps; a trial also halts when the prompt exceeds
           3896 tokens. Reflector input: the scratchpad truncated to 1600 tokens.
ALFWorld   one call per step: cue ``\\n>`` stop ``\\n``; an output shorter than 5 characters is
           re-sampled at temperature +0.2 up to 6 tries (``llm()``); the env canonicalises the
           command, answers ``think:`` with ``OK.`` and ends on a repeated action. 50 steps.
InterCode  one call per step: cue ``\\nThought n:`` stop ``Observation``; the completion (up to the
           stop, newlines removed) is split on ``Action n: ``; when that fails the first line is kept
           as the thought and the action is queried with cue ``\\nAction n:`` stop ``\\n`` (the
           original's intent; its code then discarded that answer). 10 steps; the env truncates
           observations and ends on a repeated action.

The rendered history shows what the model wrote, not the env's canonical rewrite of it (the
ALFWorld env rewrites "go to the desk 1" to "go to desk 1"): the history must be the exact token
sequence the KV cache holds and that training sees. The canonical command is kept in the log.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from retroact_jax.agent import prompts
from retroact_jax.agent.spans import render


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the loop does with a completion."""
    action: str | None = None       # run this action in the env; None: query again
    discard: bool = False           # drop the completion (re-sample it: ALFWorld short outputs)
    replace: str | None = None      # keep this text instead of the completion (InterCode fallback)


@dataclasses.dataclass(frozen=True)
class Query:
    cue: str                 # observation text appended before the call ("" for a retry)
    stop: tuple[str, ...]
    max_new_tokens: int
    temperature_offset: float = 0.0   # added to the configured temperature (ALFWorld retries)


class Protocol:
    name = ""
    max_steps = 10
    memory_last: int | None = 3        # reflections the planner sees: None = all
    planner_max_tokens = 100
    reflector_max_tokens = 100
    reflector_stop: tuple[str, ...] = ("\n",)
    max_prompt_tokens: int | None = None
    task_kind = "task"
    end_on_repeat = False     # the loop ends a trial whose action equals the previous one

    # -- planner ------------------------------------------------------------------------------
    def planner_prompt(self, task, ob: str, memory: Sequence[str], examples=None) -> str:
        raise NotImplementedError

    def next_query(self, ep) -> Query:
        raise NotImplementedError

    def on_completion(self, ep, text: str) -> Outcome:
        """Parse a completion; may advance ``ep.phase`` / ``ep.tries``."""
        raise NotImplementedError

    def observation(self, ep, obs: str) -> str:
        raise NotImplementedError

    # -- reflector ----------------------------------------------------------------------------
    def trial_log(self, ep) -> str:
        """The trial as the reflector reads it (the text after "Here is the task:")."""
        return ep.task_text + render(ep.spans[1:])

    def reflector_prompt(self, ep, memory: Sequence[str], count_tokens, examples=None) -> str:
        return prompts.reflexion_reflector(self.task_kind, self.trial_log(ep),
                                           prompts.window(memory, self.memory_last),
                                           status="OK" if ep.success else "FAIL", examples=examples)


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0]


class HotpotQAProtocol(Protocol):
    name = "hotpotqa"
    max_steps = 5
    memory_last = None
    planner_max_tokens = 250
    reflector_max_tokens = 250
    max_prompt_tokens = 3896
    reflect_scratchpad_tokens = 1600

    def planner_prompt(self, task, ob, memory, examples=None):
        return prompts.hotpot_planner(ob, prompts.window(memory, self.memory_last), examples)

    def next_query(self, ep):
        word = "Thought" if ep.phase == "thought" else "Action"
        return Query(f"\n{word} {ep.step_n}:", ("\n",), self.planner_max_tokens)

    def on_completion(self, ep, text):
        if ep.phase == "thought":
            ep.phase = "action"
            return Outcome()
        ep.phase = "thought"
        return Outcome(action=text.strip("\n").strip().replace("\n", ""))

    def observation(self, ep, obs):
        return f"\nObservation {ep.step_n}: " + obs.strip("\n").strip().replace("\n", "")

    def trial_log(self, ep):
        return render(ep.spans[1:])

    def reflector_prompt(self, ep, memory, count_tokens, examples=None):
        pad = prompts.truncate_scratchpad(self.trial_log(ep), count_tokens,
                                          self.reflect_scratchpad_tokens)
        return prompts.hotpot_reflector(ep.task_text, pad, examples)


class ALFWorldProtocol(Protocol):
    name = "alfworld"
    max_steps = 50
    min_action_chars = 5
    max_tries = 6
    retry_temperature_step = 0.2

    def planner_prompt(self, task, ob, memory, examples=None):
        if isinstance(examples, dict):       # few-shot exemplars per task type (fewshot.py)
            examples = examples[task.data["task_type"]]
        return prompts.alfworld_planner(ob, prompts.window(memory, self.memory_last), examples)

    def next_query(self, ep):
        cue = "" if ep.tries else "\n>"
        return Query(cue, ("\n",), self.planner_max_tokens,
                     temperature_offset=self.retry_temperature_step * ep.tries)

    def on_completion(self, ep, text):
        action = _first_line(text).strip()
        if len(action) < self.min_action_chars and ep.tries + 1 < self.max_tries:
            ep.tries += 1
            return Outcome(discard=True)
        ep.tries = 0
        return Outcome(action=action)

    def observation(self, ep, obs):
        return "\n" + obs


class InterCodeProtocol(Protocol):
    """``end_on_repeat`` is off: the original's check compares history entries
    ``"Action {n}: {action}"`` that include the step number, so it never fires (docs/paper.md §1.4 reads
    the rule, the code never applies it). Set it to apply the rule as described."""
    max_steps = 10
    task_kind = "programming task"

    def __init__(self, language: str):
        self.language = language
        self.name = f"intercode_{language}"

    def planner_prompt(self, task, ob, memory, examples=None):
        return prompts.intercode_planner(self.language, ob, prompts.window(memory, self.memory_last),
                                         examples)

    def next_query(self, ep):
        if ep.phase == "action":
            return Query(f"\nAction {ep.step_n}:", ("\n",), self.planner_max_tokens)
        return Query(f"\nThought {ep.step_n}:", ("Observation",), self.planner_max_tokens)

    def on_completion(self, ep, text):
        if ep.phase == "action":
            ep.phase = "thought"
            return Outcome(action=text.split("Observation")[0].replace("\n", "").strip())
        body = text.strip().split("Observation")[0].replace("\n", "")
        parts = body.strip().split(f"Action {ep.step_n}: ")
        if len(parts) == 2:
            return Outcome(action=parts[1].strip())
        # no "Action n: " in the completion: keep its first line as the thought, ask for the action
        ep.phase = "action"
        return Outcome(replace=" " + _first_line(text.strip()))

    def observation(self, ep, obs):
        return f"\nObservation {ep.step_n}: {obs}"

    def trial_log(self, ep):
        return f"Question: {ep.task_text}" + render(ep.spans[1:])


PROTOCOLS = {"hotpotqa": HotpotQAProtocol, "alfworld": ALFWorldProtocol,
             "intercode_sql": lambda: InterCodeProtocol("sql"),
             "intercode_bash": lambda: InterCodeProtocol("bash")}


def protocol_for(env_name: str) -> Protocol:
    if env_name not in PROTOCOLS:
        raise ValueError(f"no agent protocol for env {env_name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[env_name]()
