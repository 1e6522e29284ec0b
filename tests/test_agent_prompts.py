"""Prompt formats: the zero-shot builders reproduce the released imitation data character for
character; memory windows; HotpotQA scratchpad truncation; span joining."""
import json
import re

import pytest

from envs import data
from retroact_jax.agent import prompts, protocols
from retroact_jax.agent.spans import Span, append_observation, join_cue, overlap, render


def _rows(name):
    return json.loads(data.path(f"retroact/{name}.json").read_text())


def _split_memory(head):
    """'Your memory for the task below:\\nTrial 0:\\nm0\\nTrial 1:\\nm1\\n' -> [m0, m1]."""
    if not head:
        return []
    body = head[len("Your memory for the task below:"):]
    return [m.rstrip("\n") for m in re.split(r"\nTrial \d+:\n", body)[1:]]


def test_alfworld_planner_prompt_matches_every_il_row():
    rows = [r for r in _rows("alfworld_il") if r["type"] == "planner"]
    assert len(rows) == 693
    for r in rows:
        x = r["input"]
        pre, ob = x[len("Interact with a household to solve a task.\n"):].split("Here is the task:\n")
        assert ob.endswith("\n>")
        built = prompts.alfworld_planner(ob[:-2], _split_memory(pre)) + "\n>"
        assert built == x


def test_intercode_planner_prompt_matches_every_il_row():
    rows = [r for r in _rows("intercode_il") if r["type"] == "planner"]
    assert len(rows) == 866
    head = prompts.intercode_instruction("sql") + "\n"
    for r in rows:
        x = r["input"]
        assert x.startswith(head)
        pre, q = x[len(head):].split("Here is the task:\nQuestion: ")
        assert prompts.intercode_planner("sql", q, _split_memory(pre)) == x


@pytest.mark.parametrize("name,kind", [("alfworld_il", "task"), ("intercode_il", "programming task")])
def test_reflector_prompt_matches_il_rows(name, kind):
    rows = [r for r in _rows(name) if r["type"] == "reflector"]
    instr = prompts.reflexion_instruction(kind)
    matched = 0
    # one ALFWorld row carries a piece of the original's trial-log footer ("#####", "SUCCESS: 637")
    # after STATUS: FAIL, an artifact of how its log was split; it is not a prompt format
    artifacts = [r for r in rows if "\n#####\n" in r["input"]]
    assert len(artifacts) <= 1
    rows = [r for r in rows if r not in artifacts]
    for r in rows:
        x = r["input"]
        assert x.startswith(instr) and x.endswith("\n\nNew plan:")
        log, rest = x[len(instr):].rsplit("\n\nSTATUS: FAIL", 1)
        plans = re.findall(r"Trial #\d+: (.*)\n", rest)
        assert prompts.reflexion_reflector(kind, log, plans) == x
        matched += 1
    assert matched == len(rows) > 90


def test_memory_windows_per_env():
    mem = [f"r{i}" for i in range(5)]
    hp, alf = protocols.protocol_for("hotpotqa"), protocols.protocol_for("alfworld")
    assert prompts.window(mem, hp.memory_last) == mem
    assert prompts.window(mem, alf.memory_last) == ["r2", "r3", "r4"]
    assert protocols.protocol_for("intercode_sql").memory_last == 3
    p = prompts.hotpot_planner("Q?", mem)
    assert p.endswith("Reflections:\n- r0\n- r1\n- r2\n- r3\n- r4\nQuestion: Q?")
    assert prompts.hotpot_planner("Q?", []) == prompts.HOTPOT_INSTRUCTION + "\nQuestion: Q?"
    a = prompts.alfworld_planner("ob", prompts.window(mem, 3))
    assert "Trial 0:\nr2\nTrial 1:\nr3\nTrial 2:\nr4\nHere is the task:\nob" in a
    assert "r1" not in a


def test_truncate_scratchpad_replaces_longest_observations_first():
    count = prompts.approx_token_count
    pad = ("\nThought 1: a\nAction 1: Search[x]\nObservation 1: " + "w " * 30
           + "\nThought 2: b\nAction 2: Search[y]\nObservation 2: " + "w " * 50
           + "\nThought 3: c\nAction 3: Search[z]\nObservation 3: " + "w " * 10)
    full = count(pad)
    # a budget that needs only the longest observation (2) cut
    out = prompts.truncate_scratchpad(pad, count, n_tokens=full - 40)
    lines = out.split("\n")
    assert lines[6] == "Observation 2: [truncated wikipedia excerpt]"
    assert lines[3].startswith("Observation 1: w w")
    # a budget needing two: 2 then 1; 3 (the shortest) stays
    out = prompts.truncate_scratchpad(pad, count, n_tokens=full - 60)
    assert out.count("[truncated wikipedia excerpt]") == 2
    assert "Observation 3: w w" in out
    # under budget: unchanged; impossible budget: every observation cut, then stops
    assert prompts.truncate_scratchpad(pad, count, n_tokens=full) == pad
    assert prompts.truncate_scratchpad(pad, count, n_tokens=1).count("[truncated") == 3


def test_join_cue_and_append_observation():
    assert overlap(" go to desk 1\n", "\nOn the desk") == 1
    assert join_cue(" go\n", "\nAction 1:") == "Action 1:"
    assert join_cue(" x]\nObservation", "\nObservation 1: r") == " 1: r"
    assert join_cue(" no newline", "\nAction 1:") == "\nAction 1:"
    spans = [Span("prompt", "P"), Span("generated", " a\n")]
    append_observation(spans, "\nThought 2:")
    append_observation(spans, "\nmore")      # after an observation: appended whole, not merged
    assert [s.text for s in spans] == ["P", " a\n", "Thought 2:", "\nmore"]
    assert render(spans) == "P a\nThought 2:\nmore"
    with pytest.raises(ValueError):
        Span("model", "x")
