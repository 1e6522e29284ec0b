"""Replay buffer rules: the original's admission filters, age and FIFO capacity eviction, seeded
length-grouped epochs, exact JSON round trip."""
import json

import numpy as np
import pytest

from retroact_jax.batching import Sample
from retroact_jax.stages import replay


def _pl(reward, out="Thought 1: x\nAction 1: Finish[y]", n_beh=3, task=0, trial=1):
    return Sample("planner", (("prompt", "Question: q?"), ("generated", out)), objective="rl",
                  reward=reward, behaviour_logp=None if n_beh is None else tuple(-0.5 * (i + 1) for i in range(n_beh)),
                  metadata={"task_index": task, "trial": trial})


def _rf(last, cur, out=" I should search better.\n"):
    return Sample("reflector", (("prompt", "Previous trial: ...\nReflection:"), ("generated", out)),
                  objective="rl", last_reward=last, current_reward=cur, behaviour_logp=(-1.0, -2.0))


def test_admission_filters_as_the_original():
    cfg = replay.ReplayConfig(max_chars=60, max_tokens=50)
    samples = [_pl(0.0), _pl(0.4), _pl(1.0, out="x" * 80), _pl(1.0, out="   "),
               _rf(0.0, 0.0), _rf(0.5, 0.5), _rf(0.0, 1.0), _rf(1.0, 0.2), _rf(0.0, 1.0, out="\n"), _pl(1.0)]
    n_tok = [10] * 9 + [51]
    kept, counts = replay.admit(samples, cfg, n_tok, stop=("\n",))
    assert kept == [1, 6, 7]          # a reward decrease (1.0 -> 0.2) is kept: negative feedback
    assert counts == {"planner_zero_reward": 1, "planner_over_max_chars": 1, "planner_empty_output": 1,
                      "reflector_zero_reward": 1, "reflector_no_reward_change": 1,
                      "reflector_empty_output": 1, "planner_over_max_tokens": 1}
    kept, counts = replay.admit(samples[:2], replay.ReplayConfig(drop_zero_reward=False))
    assert kept == [0, 1] and counts == {}


def test_capacity_is_fifo_and_age_evicts_old_iterations():
    buf = replay.ReplayBuffer(replay.ReplayConfig(capacity=3))
    buf.add([_pl(0.1 * i, task=i) for i in range(1, 5)], iteration=1, n_tokens=[5] * 4)
    assert [e.sample.metadata["task_index"] for e in buf.entries["planner"]] == [2, 3, 4]
    buf.add([_rf(0.0, 1.0)], iteration=1, n_tokens=[7])
    assert buf.size("reflector") == 1 and buf.evicted["capacity"] == 1     # capacity is per role
    buf.add([_pl(1.0, task=9)], iteration=2, n_tokens=[5])
    assert [e.sample.metadata["task_index"] for e in buf.entries["planner"]] == [3, 4, 9]

    aged = replay.ReplayBuffer(replay.ReplayConfig(max_age=2))
    for it in (1, 2, 3):
        aged.add([_pl(1.0, task=it)], iteration=it, n_tokens=[5])
    assert [e.iteration for e in aged.entries["planner"]] == [2, 3]
    aged.evict(5)
    assert aged.size("planner") == 0 and aged.evicted["age"] == 3


def test_rl_samples_need_behaviour_logprobs():
    buf = replay.ReplayBuffer()
    with pytest.raises(replay.ReplayError, match="behaviour"):
        buf.add([_pl(1.0, n_beh=None)], 1, [5])
    with pytest.raises(replay.ReplayError, match="unknown replay config keys"):
        replay.ReplayConfig.from_mapping({"capacty": 3})


def test_epoch_batches_are_seeded_and_cover_every_entry_once():
    buf = replay.ReplayBuffer()
    buf.add([_pl(1.0, task=i) for i in range(10)], 1, n_tokens=list(range(10, 20)))
    a = buf.epoch_batches("planner", 3, seed=5, epoch=0)
    b = buf.epoch_batches("planner", 3, seed=5, epoch=0)
    assert [[e.uid for e in x] for x in a] == [[e.uid for e in x] for x in b]
    assert sorted(e.uid for x in a for e in x) == list(range(10))
    assert all(len(x) <= 3 for x in a)
    other = [[e.uid for e in x] for x in buf.epoch_batches("planner", 3, seed=5, epoch=1)]
    assert other != [[e.uid for e in x] for x in a]
    assert buf.epoch_batches("reflector", 3, seed=5, epoch=0) == []


def test_json_round_trip_is_exact():
    buf = replay.ReplayBuffer(replay.ReplayConfig(capacity=5, max_age=3))
    lp = tuple(float(np.float32(x)) for x in np.random.default_rng(0).normal(size=3))
    s = Sample("planner", (("prompt", "Q é?"), ("generated", "A\n")), objective="rl", reward=0.25,
               behaviour_logp=lp, metadata={"task_index": 1, "trial": 2})
    buf.add([s, _rf(0.0, 1.0)], 1, [4, 9])
    buf.add([_pl(1.0)], 2, [6])
    text = json.dumps(buf.to_json())
    back = replay.ReplayBuffer.from_json(json.loads(text), buf.cfg)
    assert back.to_json() == buf.to_json()
    assert back.entries["planner"][0].sample == s
    assert back.entries["planner"][0].sample.behaviour_logp == lp
    assert back.next_uid == buf.next_uid
    with pytest.raises(replay.ReplayError, match="made with"):
        replay.ReplayBuffer.from_json(json.loads(text), replay.ReplayConfig())
    with pytest.raises(replay.ReplayError, match="format"):
        replay.ReplayBuffer.from_json({"entries": []})
