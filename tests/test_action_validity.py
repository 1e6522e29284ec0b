"""The valid-action rate of an evaluation: the fraction of the agent's actions the env parsed."""
import json

import numpy as np
import pytest

import envs
from envs.hotpotqa.env import parse_action
from retroact_jax import evaluation, sampling, testing
from retroact_jax.stages import setup
from retroact_jax.agent import loop, rollout
from retroact_jax.agent.lm_policy import LMPolicy
from retroact_jax.agent.policy import ScriptedPolicy

ACTIONS = [" Search[Radio City]\n", " I think the answer is 5\n", "\n", " Finish[nope]\n"]


def _scripted(call):
    if "Thought" in call.prompt.rsplit("\n", 1)[-1]:
        return " a thought\n"
    n = int(call.prompt.rsplit("Action ", 1)[-1].split(":")[0])
    return ACTIONS[n - 1]


def test_valid_action_rate_counts_parsed_actions(tmp_path):
    cfg = loop.AgentConfig(trials=2, batch_size=2, env_workers=1)
    s = rollout.evaluate("hotpotqa", "test", [0, 1], ScriptedPolicy(_scripted), None, cfg, tmp_path,
                         show_progress=False)
    # 2 tasks x 2 trials of: Search (valid), free text, empty (invalid), Finish (valid, wrong: ends)
    assert s["actions"] == {"actions": 16, "valid": 8, "valid_rate": pytest.approx(50.0)}
    recs = [json.loads(x) for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert evaluation.action_validity(recs) == s["actions"]
    assert evaluation.action_validity([{"steps": []}])["valid_rate"] is None


def test_valid_action_rate_of_a_tiny_random_model(tmp_path):
    models, tok, _ = setup.load_models(testing.TINY_RANDOM, roles=("planner",), seed=3)
    sampler = sampling.Sampler(models["planner"], pad_id=tok.pad_id, eos_ids=tok.eos_ids)
    cfg = loop.AgentConfig(trials=1, batch_size=2, env_workers=1, max_steps=2, planner_max_tokens=8)
    s = rollout.evaluate("hotpotqa", "test", [0, 1], LMPolicy(sampler, tok), None, cfg, tmp_path,
                         show_progress=False)
    recs = [json.loads(x) for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    steps = [st for r in recs for st in r["steps"]]
    assert s["actions"]["actions"] == len(steps) > 0
    # the env's verdict on each action the model wrote, re-derived from the parser
    valid = [parse_action(st["action"]) is not None and parse_action(st["action"])[0] in ("Search", "Finish")
             for st in steps]
    assert s["actions"]["valid"] == sum(valid)
    assert s["actions"]["valid_rate"] == pytest.approx(100.0 * np.mean(valid))
