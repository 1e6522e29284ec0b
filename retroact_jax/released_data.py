"""Loaders for RetroAct's released Alpaca-style training files (data/retroact, see its README).

Rows ``{instruction, input, output, type, [reward | last_reward, current_reward]}`` become
``batching.Sample``s whose spans say which characters the policy generated:

* **ALFWorld planner** (``alfworld_il``): ``input`` ends with ``>``; ``output`` is lines
  ``action / observation / > action / observation ...``. At inference the agent queries
  ``history + ">"`` and the model generates `` go to fridge 1`` and the ``\\n`` that stops it
  (docs/paper.md §1.3), so the ``>`` is a step prefix and ``" go to fridge 1\\n"`` is generated; the observation
  line (``OK.`` after every ``think:``, checked) is an observation.
* **InterCode planner** (``intercode_*``): ``Thought n: ... / Action n: ... / Observation n: ...``. The agent
  queries ``history + "Thought n:"`` and the model generates the thought, ``Action n: ...``, ``\\n`` and
  the stop word ``Observation`` that ends its turn (docs/paper.md §1.4; the agent's trajectories record it
  as generated): ``Thought n:`` is a step prefix, `` n: ...`` after the stop word an observation. With
  observations masked the stop word is still trained: without it the model never learns to stop and
  runs on with ``Action n+1: ...`` lines to its token budget (the SFT agent of 2026-12-08: 99 of 176
  thought calls).
* Step prefixes are observation spans by default (``step_prefix="observation"``: written by the agent loop,
  like the original inference); ``step_prefix="generated"`` trains them as model text (line-level split).
* **Trailing** ``\\n\\nSTATUS: OK|FAIL`` (+ ``\\nREWARD: r`` in the RL file): written by the data pipeline,
  never generated at inference. ``status_tail="observation"`` (default) keeps it as an observation span,
  so the text is byte-identical to the original and it is trained exactly when observations are (the
  original trains it, docs/paper.md §3.4 item 3); ``"drop"`` removes it from the text. A ``REWARD:`` line must
  equal the row's ``reward``.
* **Reflector**: ``input`` (ending ``New plan:``) is the prompt; ``output`` is stripped (README: a leading
  space in most rows, not all) and ``reflection_prefix`` (default ``" "``) is put back in front of it as
  generated text, so every row has the same boundary ``New plan: <reflection>``.
* **Empty reflections**: 29 of the 97 InterCode IL reflector rows have ``output == ""``. The original
  trained them as ``input + eos`` (teaching the reflector to stop at once). ``empty_reflections="keep"``
  (default, the original's data) loads them with an empty generated span (only an appended EOS is then
  trained; with no EOS the row has no trained token, which ``collate`` counts); ``"skip"`` lists them in
  ``Loaded.skipped``. An empty planner output is always a bad row.
* ``join``: how ``input`` and ``output`` meet. ``"inference"`` (default) = as the agent's inference
  prompt renders the same step (agent/prompts.py, protocols.py), so the training text tokenises like the
  inference prompt: InterCode planner rows get the ``\\n`` before ``Thought 1:`` (``...Question: X`` +
  ``\\nThought 1:``), ALFWorld planner rows the space the model writes after ``>`` (``\\n>`` +
  `` think: ...``, as every later action line). ``"original"`` = the original's ``input + output``
  bytes, no separator (docs/paper.md §3.4 item 8). Reflector rows are the same under both.
* ``ref_prob`` (RL rows, optional): the behaviour log-probs written by the original ``ref_prob.py``
  become ``Sample.behaviour_logp`` with ``behaviour_alignment="original"``: the original collator's
  ``ref_prob[:n_output_tokens]`` (an over-long list is cut and counted, ``batching.tokenize_sample``).

Bad rows raise ``DataRowError`` naming the file and row index, or with ``skip_bad=True`` are skipped and
listed in ``Loaded.skipped`` (never silently).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Sequence

from retroact_jax.batching import Sample

FILES = {  # name -> (data pack file, environment format, objective)
    "alfworld_il": ("retroact/alfworld_il.json", "alfworld", "il"),
    "intercode_il": ("retroact/intercode_il.json", "intercode", "il"),
    "intercode_rl": ("retroact/intercode_rl.json", "intercode", "rl"),
}
_TAIL = re.compile(r"\n\nSTATUS: (OK|FAIL)(?:\nREWARD: (\S+))?$")
_IC_LINE = re.compile(r"(Thought|Action|Observation) (\d+):")
_IC_ORDER = ("Thought", "Action", "Observation")
_OPTION_CHOICES = {"status_tail": ("observation", "drop"), "step_prefix": ("observation", "generated"),
                   "empty_reflections": ("keep", "skip"), "join": ("inference", "original")}


class DataRowError(ValueError):
    """A row of a released data file that does not have the documented format."""


class _Skip(Exception):
    """A well-formed row that the options ask to leave out (listed in Loaded.skipped)."""


@dataclasses.dataclass
class Loaded:
    name: str
    samples: list[Sample]
    skipped: list[tuple[int, str]]  # (row index, reason) of rows skipped under skip_bad=True

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def _alfworld_spans(output: str, prefix_kind: str) -> list[tuple[str, str]]:
    lines = output.split("\n")
    spans: list[tuple[str, str]] = []
    last_action, expect_obs = None, False
    for j, line in enumerate(lines):
        nl = "\n" if j + 1 < len(lines) else ""
        if j == 0 or line.startswith(">"):
            if expect_obs:
                raise ValueError(f"line {j}: action {line[:60]!r} follows an action without an observation")
            if j > 0:
                spans.append((prefix_kind, ">"))
                line = line[1:]
            if not line.strip():
                raise ValueError(f"line {j}: empty action")
            spans.append(("generated", line + nl))
            last_action, expect_obs = line.strip(), True
        else:
            if expect_obs and last_action.startswith("think:") and line != "OK.":
                raise ValueError(f"line {j}: the observation after a think: action is {line[:60]!r}, not 'OK.'")
            spans.append(("observation", line + nl))
            expect_obs = False
    if expect_obs:
        raise ValueError("the trajectory ends with an action that has no observation")
    return spans


def _intercode_spans(output: str, prefix_kind: str) -> list[tuple[str, str]]:
    lines = output.split("\n")
    spans: list[tuple[str, str]] = []
    step, want, cur = 1, 0, None  # next expected (step, index into _IC_ORDER); kind of the current line
    for j, line in enumerate(lines):
        nl = "\n" if j + 1 < len(lines) else ""
        m = _IC_LINE.match(line)
        if m is None:  # continuation of the previous line (multi-line thought/action/observation)
            if cur is None:
                raise ValueError(f"line 0 is not 'Thought 1: ...': {line[:60]!r}")
            spans.append((cur, line + nl))
            continue
        what, n = m.group(1), int(m.group(2))
        if (what, n) != (_IC_ORDER[want], step):
            raise ValueError(f"line {j}: expected '{_IC_ORDER[want]} {step}:', found '{what} {n}:'")
        if what == "Thought":
            spans += [(prefix_kind, m.group(0)), ("generated", line[m.end():] + nl)]
            cur = "generated"
        elif what == "Action":
            spans.append(("generated", line + nl))
        else:   # the model ends its turn by writing the stop word "Observation"; the loop writes the rest
            spans += [("generated", "Observation"), ("observation", line[len("Observation"):] + nl)]
            step, cur = step + 1, "observation"
        want = (want + 1) % 3
    if want != 0:
        raise ValueError(f"the trajectory ends inside step {step} (no '{_IC_ORDER[want]} {step}:' line)")
    return spans


def _number(row: dict, key: str) -> float:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"field {key!r} must be a finite number, got {v!r}")
    return float(v)


def row_to_sample(row: Any, env: str, objective: str, *, status_tail: str = "observation",
                  step_prefix: str = "observation", reflection_prefix: str = " ",
                  join: str = "inference", empty_reflections: str = "keep",
                  metadata: dict | None = None) -> Sample:
    """One row -> Sample; raises ValueError saying what is wrong with the row."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    if row.get("type") not in ("planner", "reflector"):
        raise ValueError(f"type must be 'planner' or 'reflector', got {row.get('type')!r}")
    allowed = {"instruction", "input", "output", "type"}
    if objective == "rl":
        allowed |= {"reward"} if row.get("type") == "planner" else {"last_reward", "current_reward"}
    optional = {"ref_prob"} if objective == "rl" else set()
    missing, extra = sorted(allowed - set(row)), sorted(set(row) - allowed - optional)
    if missing or extra:
        raise ValueError(f"fields missing {missing} / unexpected {extra} for a {objective} "
                         f"{row.get('type')!r} row")
    for key in ("instruction", "input", "output"):
        if not isinstance(row[key], str):
            raise ValueError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
    if row["instruction"]:
        raise ValueError("instruction is not empty (the original training ignores it; refusing to drop text)")
    inp, out = row["input"], row["output"]
    if not inp.strip():
        raise ValueError("empty input")
    if not out.strip() and row["type"] == "planner":
        raise ValueError("empty planner output")
    if not out.strip() and empty_reflections == "skip":
        raise _Skip("empty reflection (empty_reflections='skip')")
    meta = dict(metadata or {}, env=env)
    behaviour = {}
    if "ref_prob" in row:
        ref = row["ref_prob"]
        if not isinstance(ref, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                and math.isfinite(x) for x in ref):
            raise ValueError("field 'ref_prob' must be a list of finite numbers")
        behaviour = {"behaviour_logp": tuple(float(x) for x in ref), "behaviour_alignment": "original"}
    separator = "\n" if join == "inference" and env == "intercode" and row["type"] == "planner" else ""
    prompt = [("prompt", inp + separator)]
    if row["type"] == "reflector":
        if not inp.rstrip().endswith("New plan:"):
            raise ValueError("a reflector input must end with 'New plan:'")
        reflection = out.strip()
        meta["reflection"] = reflection
        if not reflection:  # kept (empty_reflections="keep"): only an appended EOS can be trained
            reflection_prefix = ""
        rewards = ({"last_reward": _number(row, "last_reward"), "current_reward": _number(row, "current_reward")}
                   if objective == "rl" else {})
        return Sample("reflector", tuple(prompt + [("generated", reflection_prefix + reflection)]),
                      objective=objective, metadata=meta, **rewards, **behaviour)
    tail = _TAIL.search(out)
    body, tail_text = (out[:tail.start()], tail.group(0)) if tail else (out, "")
    reward = _number(row, "reward") if objective == "rl" else None
    if tail and tail.group(2) is not None:
        try:
            tail_reward = float(tail.group(2))
        except ValueError:
            raise ValueError(f"unreadable REWARD line {tail.group(2)!r}") from None
        if reward is not None and tail_reward != reward:
            raise ValueError(f"the output's REWARD {tail_reward} differs from the row's reward {reward}")
    if env == "alfworld":
        if not inp.endswith(">"):
            raise ValueError("an ALFWorld planner input must end with '>'")
        steps = _alfworld_spans(body, step_prefix)
        if join == "inference" and not steps[0][1].startswith(" "):
            separator = " "                                 # "\n>" + " think: ..." as at inference
            steps[0] = ("generated", separator + steps[0][1])
    else:
        steps = _intercode_spans(body, step_prefix)
    if tail_text and status_tail == "observation":
        steps.append(("observation", tail_text))
    if tail:
        meta["status"] = tail.group(1)
    spans = prompt + steps
    expect = inp + separator + (out if status_tail == "observation" else body)
    if "".join(t for _, t in spans) != expect:  # invariant of the parsers above
        raise ValueError("internal: the spans do not reassemble the row's text")
    return Sample("planner", tuple(spans), objective=objective, reward=reward, metadata=meta, **behaviour)


def samples_from_rows(rows: Sequence[Any], env: str, objective: str, *, source: str = "<rows>",
                      skip_bad: bool = False, **options) -> Loaded:
    """Rows -> Samples. ``env`` "alfworld" | "intercode", ``objective`` "il" | "rl"; options as ``row_to_sample``."""
    if env not in ("alfworld", "intercode") or objective not in ("il", "rl"):
        raise ValueError(f"env must be alfworld|intercode and objective il|rl, got {env!r}, {objective!r}")
    for key, choices in _OPTION_CHOICES.items():
        if key in options and options[key] not in choices:
            raise ValueError(f"unknown {key} {options[key]!r}; valid: {', '.join(choices)}")
    if not isinstance(rows, list):
        raise DataRowError(f"{source}: expected a JSON list of rows, got {type(rows).__name__}")
    samples, skipped = [], []
    for i, row in enumerate(rows):
        try:
            samples.append(row_to_sample(row, env, objective, metadata={"source": source, "row": i}, **options))
        except _Skip as e:
            skipped.append((i, str(e)))
        except ValueError as e:
            if not skip_bad:
                raise DataRowError(f"{source}: row {i}: {e}") from e
            skipped.append((i, str(e)))
    return Loaded(source, samples, skipped)


def load_retroact(name: str, *, skip_bad: bool = False, **options) -> Loaded:
    """Load ``alfworld_il`` | ``intercode_il`` | ``intercode_rl`` from the data pack (sha256-checked)."""
    from envs import data

    if name not in FILES:
        raise ValueError(f"unknown RetroAct data file {name!r}; valid: {', '.join(FILES)}")
    pack_name, env, objective = FILES[name]
    p = data.path(pack_name)
    with open(p, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise DataRowError(f"{p}: not valid JSON: {e}") from e
    return samples_from_rows(rows, env, objective, source=str(p), skip_bad=skip_bad, **options)
