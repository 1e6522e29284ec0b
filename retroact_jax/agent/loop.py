"""The planner + reflector trial loop, batched: every active episode advances in lock-step.

``TrialRunner.run(states)`` drives a set of tasks through up to ``trials`` trials each:

- a trial is one ReAct episode of the planner (protocols.py decides cues, stops and parsing);
- a solved task stops and keeps its score; a failed one (with a reflector and trials left) gets a
  reflection from the reflector, which joins the task's memory; the next trial's planner prompt
  shows the memory (HotpotQA all reflections, ALFWorld / InterCode the last 3);
- ``batch_size`` tasks are in flight at once (continuous batching: a finished task's slot takes the
  next task). Each round makes one planner ``generate`` call for every episode waiting for the same
  kind of query, steps the envs of all episodes that produced an action in parallel (threads), then
  one reflector call for every episode that failed this round.
- each finished trial is handed to ``on_trial(record)`` (after its reflection, if any), which the
  evaluation appends to the trajectory JSONL; a resumed run rebuilds ``TaskState``s from those
  records (``TaskState.from_records``) and continues with the next trial.

Sampling seeds are a pure function of (seed, task index, trial, call number, role), so a resumed run
samples what the uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Sequence

from envs.base import Task
from retroact_jax.agent import protocols as P
from retroact_jax.agent.policy import Policy, Request
from retroact_jax.agent.prompts import window
from retroact_jax.agent.spans import Span, append_observation, render, spans_to_json


@dataclasses.dataclass
class AgentConfig:
    trials: int = 10                 # K
    batch_size: int = 8              # tasks in flight
    temperature: float = 0.0         # test time: greedy (docs/paper.md §1.1)
    reflector_temperature: float = 0.0
    seed: int = 0
    env_workers: int = 8             # threads stepping envs
    max_steps: int | None = None     # None: the protocol's (HotpotQA 5, ALFWorld 50, InterCode 10)
    planner_max_tokens: int | None = None
    reflector_max_tokens: int | None = None
    memory_last: int | str | None = "default"   # "default": the protocol's; None: all; n: last n
    reflector_rows: int = 0          # failed trials per reflector call (0: all at once); fewer = a
                                     #   smaller reflector cache (16 rows x 4,096 slots of SmolLM2: 3 GB)


def _seed(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


@dataclasses.dataclass
class TaskState:
    task: Task
    memory: list[str] = dataclasses.field(default_factory=list)   # reflections, oldest first
    records: list[dict] = dataclasses.field(default_factory=list)  # finished trials
    solved: bool = False

    def finished(self, trials: int) -> bool:
        return self.solved or len(self.records) >= trials

    @classmethod
    def from_records(cls, task: Task, records: Sequence[dict]) -> "TaskState":
        st = cls(task)
        for r in sorted(records, key=lambda r: r["trial"]):
            if r["trial"] != len(st.records) + 1:
                raise ValueError(f"task {task.id}: trial records are not 1..n (got trial {r['trial']} "
                                 f"after {len(st.records)})")
            st.records.append(r)
            st.solved = bool(r["success"])
            if r.get("reflection"):
                st.memory.append(r["reflection"]["text"])
        return st


@dataclasses.dataclass
class Episode:
    state: TaskState
    trial: int
    slot: int
    task_text: str
    spans: list[Span]
    memory_seen: list[str]
    step_n: int = 1
    phase: str = "thought"
    tries: int = 0
    calls: list[dict] = dataclasses.field(default_factory=list)
    steps: list[dict] = dataclasses.field(default_factory=list)
    done: bool = False
    success: bool = False
    score: float = 0.0
    halted: str | None = None
    reflection: dict | None = None

    @property
    def key(self):
        return (self.state.task.index, self.trial, "planner")


class TrialRunner:
    def __init__(self, protocol: P.Protocol, make_slots: Callable[[int], Any], planner: Policy,
                 reflector: Policy | None, cfg: AgentConfig,
                 planner_examples: Any = None, reflector_examples: Any = None,
                 progress: Callable[[str, TaskState], None] | None = None):
        self.p = protocol
        self.make_slots = make_slots   # n -> ThreadSlots / PoolSlots (slots.py)
        self.planner, self.reflector, self.cfg = planner, reflector, cfg
        self.planner_examples, self.reflector_examples = planner_examples, reflector_examples
        self.progress = progress or (lambda event, st: None)
        if cfg.max_steps is not None:
            protocol.max_steps = int(cfg.max_steps)
        if cfg.planner_max_tokens is not None:
            protocol.planner_max_tokens = int(cfg.planner_max_tokens)
        if cfg.reflector_max_tokens is not None:
            protocol.reflector_max_tokens = int(cfg.reflector_max_tokens)
        if cfg.memory_last != "default":
            protocol.memory_last = None if cfg.memory_last is None else int(cfg.memory_last)
        if cfg.trials < 1:
            raise ValueError(f"trials must be >= 1, got {cfg.trials}")
        if cfg.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")

    # ------------------------------------------------------------------------------------------
    def run(self, states: Sequence[TaskState], on_trial: Callable[[dict], None]) -> None:
        queue = [s for s in states if not s.finished(self.cfg.trials)]
        if not queue:
            return
        slots = self.make_slots(min(self.cfg.batch_size, len(queue)))
        free = list(range(min(self.cfg.batch_size, len(queue))))
        live: list[Episode] = []
        try:
            while queue or live:
                while queue and free:            # fill free slots with waiting tasks
                    live.append(self._new_episode(queue.pop(0), free.pop(0)))
                self._reset_new(live, slots)
                self._planner_round(live)
                self._env_round(live, slots)
                ended = [e for e in live if e.done]
                self._reflect(ended)
                for ep in ended:
                    live.remove(ep)
                    rec = self._record(ep)
                    st = ep.state
                    st.records.append(rec)
                    st.solved = ep.success
                    if ep.reflection is not None:
                        st.memory.append(ep.reflection["text"])
                    on_trial(rec)
                    self.planner.release([ep.key])
                    if st.finished(self.cfg.trials):
                        self.progress("task", st)
                        free.append(ep.slot)
                    else:
                        self.progress("trial", st)
                        live.append(self._new_episode(st, ep.slot))
        finally:
            slots.close()

    # ------------------------------------------------------------------------------------------
    def _new_episode(self, st: TaskState, slot: int) -> Episode:
        ep = Episode(state=st, trial=len(st.records) + 1, slot=slot, task_text="", spans=[],
                     memory_seen=[])
        ep.phase = "reset"
        return ep

    def _reset_new(self, live: list[Episode], slots) -> None:
        new = [e for e in live if e.phase == "reset"]
        if not new:
            return
        obs = slots.reset({e.slot: e.state.task for e in new})
        for ep in new:
            ob = obs[ep.slot]
            mem = list(ep.state.memory)
            ep.task_text = ob
            ep.memory_seen = window(mem, self.p.memory_last)
            ep.spans = [Span("prompt", self.p.planner_prompt(ep.state.task, ob, mem,
                                                              self.planner_examples))]
            ep.phase = "thought"

    def _planner_round(self, live: list[Episode]) -> None:
        """Query the planner until every live episode has an action (or has halted)."""
        waiting = [e for e in live if not e.done]
        actions: dict[int, str] = {}
        while waiting:
            groups: dict[tuple, list[tuple[Episode, P.Query]]] = {}
            for ep in waiting:
                q = self.p.next_query(ep)
                if self.p.max_prompt_tokens is not None and self.planner.count_tokens(
                        render(ep.spans) + q.cue) > self.p.max_prompt_tokens:
                    ep.done, ep.halted = True, "prompt_tokens"
                    continue
                if q.cue:
                    append_observation(ep.spans, q.cue)
                groups.setdefault((q.stop, q.max_new_tokens, q.temperature_offset), []).append((ep, q))
            nxt = []
            for (stop, max_new, t_off), items in groups.items():
                reqs = [Request(ep.key, list(ep.spans),
                                _seed(self.cfg.seed, ep.state.task.index, ep.trial, len(ep.calls), "p"))
                        for ep, _ in items]
                temp = self.cfg.temperature + t_off
                comps = self.planner.generate(reqs, list(stop), max_new, temp)
                if len(comps) != len(reqs):
                    raise RuntimeError(f"planner returned {len(comps)} completions for {len(reqs)} requests")
                for (ep, q), c in zip(items, comps):
                    out = self.p.on_completion(ep, c.text)
                    ep.calls.append({"span": len(ep.spans), "stop": list(stop), "temperature": temp,
                                     "finish": c.finish, "text": c.text,
                                     "logprobs": c.logprobs, "discarded": out.discard})
                    if not out.discard:
                        if out.replace is not None:
                            ep.spans.append(Span("generated", out.replace))
                        else:
                            ep.spans.append(Span("generated", c.text, c.token_ids, c.logprobs))
                    if out.action is not None:
                        actions[id(ep)] = out.action
                    else:
                        nxt.append(ep)
            waiting = nxt
        self._pending_actions = actions

    def _env_round(self, live: list[Episode], slots) -> None:
        todo = [e for e in live if id(e) in self._pending_actions and not e.done]
        results = slots.step({e.slot: self._pending_actions[id(e)] for e in todo}) if todo else {}
        for ep in todo:
            obs, reward, done, info = results[ep.slot]
            action = self._pending_actions[id(ep)]
            append_observation(ep.spans, self.p.observation(ep, obs))
            ep.steps.append({"action": action, "observation": obs, "reward": float(reward),
                             "done": bool(done), "info": _jsonable(info)})
            ep.score = float(info.get("score", reward))
            ep.success = bool(info.get("success", False))
            ep.step_n += 1
            repeated = self.p.end_on_repeat and len(ep.steps) > 1 and ep.steps[-2]["action"] == action
            if repeated and not done:
                ep.done, ep.halted = True, "repeated_action"
            elif done:
                ep.done = True
                if info.get("truncated"):
                    ep.halted = "max_steps"
            elif ep.step_n > self.p.max_steps:   # env limit larger than the protocol's
                ep.done, ep.halted = True, "max_steps"
        self._pending_actions = {}

    def _reflect(self, ended: list[Episode]) -> None:
        if self.reflector is None:
            return
        need = [e for e in ended if not e.success and e.trial < self.cfg.trials]
        if not need:
            return
        reqs, prompts = [], []
        for ep in need:
            text = self.p.reflector_prompt(ep, ep.state.memory, self.reflector.count_tokens,
                                           self.reflector_examples)
            prompts.append(text)
            reqs.append(Request((ep.state.task.index, ep.trial, "reflector"), [Span("prompt", text)],
                                _seed(self.cfg.seed, ep.state.task.index, ep.trial, "r")))
        if int(self.cfg.reflector_rows) < 0:
            raise ValueError(f"reflector_rows must be >= 0, got {self.cfg.reflector_rows}")
        n = int(self.cfg.reflector_rows) or len(reqs)
        comps = []
        for i in range(0, len(reqs), n):            # a group's rows are released before the next
            comps += self.reflector.generate(reqs[i:i + n], list(self.p.reflector_stop),
                                             self.p.reflector_max_tokens, self.cfg.reflector_temperature)
            self.reflector.release([r.key for r in reqs[i:i + n]])
        for ep, text, c in zip(need, prompts, comps):
            spans = [Span("prompt", text), Span("generated", c.text, c.token_ids, c.logprobs)]
            ep.reflection = {"text": _reflection_text(c.text, self.p.reflector_stop),
                             "spans": spans_to_json(spans), "finish": c.finish}

    def _record(self, ep: Episode) -> dict:
        t = ep.state.task
        return {"env": t.env, "split": t.split, "task_index": t.index, "task_id": t.id,
                "trial": ep.trial, "memory": ep.memory_seen, "score": ep.score,
                "success": ep.success, "num_steps": len(ep.steps), "halted": ep.halted,
                "planner": {"spans": spans_to_json(ep.spans), "calls": ep.calls},
                "steps": ep.steps, "reflection": ep.reflection}


def _reflection_text(text: str, stop: Sequence[str]) -> str:
    """The reflection as memory: the completion without the stop string that ended it."""
    for s in stop:
        if s and text.endswith(s):
            return text[: -len(s)]
    return text


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    try:
        return float(x)
    except (TypeError, ValueError):
        return repr(x)
