"""Trial records -> planner / reflector samples: span kinds kept, rewards, reflector pairing
(reflection after trial k, rewards of k and k+1), selections, and real records of the loop."""
import json

import pytest

from retroact_jax import batching
from retroact_jax.stages import samples as S


def _rec(task, trial, score, success, reflection=None, env="hotpotqa"):
    spans = [{"role": "prompt", "text": f"Question: q{task}"},
             {"role": "observation", "text": "\nThought 1:"},
             {"role": "generated", "text": " think\n", "token_ids": [5, 6], "logprobs": [-0.1, -0.2]},
             {"role": "observation", "text": f"\nObservation 1: obs{trial}"}]
    rec = {"env": env, "split": "train", "task_index": task, "task_id": f"id{task}", "trial": trial,
           "score": score, "success": success, "planner": {"spans": spans, "calls": []},
           "reflection": None}
    if reflection is not None:
        rec["reflection"] = {"text": reflection, "finish": "stop",
                             "spans": [{"role": "prompt", "text": f"Reflect on {task}/{trial}:"},
                                       {"role": "generated", "text": reflection + "\n"}]}
    return rec


RECS = [
    _rec(0, 1, 0.0, False, "plan A"), _rec(1, 1, 1.0, True),
    _rec(0, 2, 0.4, False, "plan B"), _rec(0, 3, 1.0, True),
    _rec(2, 1, 0.5, False, "plan C"),          # a reflection with no next trial: no sample
]


def test_planner_samples_keep_spans_and_rewards():
    pl = S.planner_samples(RECS, "rl")
    assert len(pl) == 5
    s = pl[0]
    assert s.role == "planner" and s.objective == "rl" and s.reward == 0.0
    assert [k for k, _ in s.spans] == ["prompt", "observation", "generated", "observation"]
    assert s.text == "Question: q0\nThought 1: think\n\nObservation 1: obs1"
    assert s.behaviour_logp is None           # filled by the scoring pass, never the sampler's
    assert s.metadata["task_id"] == "id0" and s.metadata["trial"] == 1
    il = S.planner_samples(RECS, "il", keep=S.il_keep_planner)
    assert [(x.metadata["task_index"], x.metadata["trial"]) for x in il] == [(1, 1), (0, 3)]
    assert all(x.reward is None for x in il)
    assert len(S.planner_samples(RECS, "rl", keep=S.rl_keep_planner)) == 4


def test_reflector_pairing_and_rewards():
    rf = S.reflector_samples(RECS, "rl")
    assert [(x.metadata["task_index"], x.metadata["trial"]) for x in rf] == [(0, 1), (0, 2)]
    assert (rf[0].last_reward, rf[0].current_reward) == (0.0, 0.4)
    assert (rf[1].last_reward, rf[1].current_reward) == (0.4, 1.0)
    assert rf[0].spans == (("prompt", "Reflect on 0/1:"), ("generated", "plan A\n"))
    # IL: only the reflection that preceded the successful trial
    il = S.reflector_samples(RECS, "il", keep=S.il_keep_reflector)
    assert len(il) == 1 and il[0].text.endswith("plan B\n") and il[0].last_reward is None
    # pairing does not depend on record order
    assert [x.text for x in S.reflector_samples(list(reversed(RECS)), "rl")] == \
        [x.text for x in reversed(rf)]
    # the RL selection: a change and a non-zero side
    same = [_rec(5, 1, 0.0, False, "x"), _rec(5, 2, 0.0, False)]
    assert S.reflector_samples(same, "rl", keep=S.rl_keep_reflector) == []


def test_reflector_rewards_reach_the_batch():
    rf = S.reflector_samples(RECS, "rl")

    class Tok:
        def encode_pieces(self, pieces):
            ids, idx = [], []
            for i, p in enumerate(pieces):
                ids += [3 + ord(c) % 200 for c in p]
                idx += [i] * len(p)
            return ids, idx
    ts = [batching.tokenize_sample(s, Tok()) for s in rf]
    b = batching.collate(ts, (64,), 0, reflector_reward="delta_scaled", alpha=1.0)
    assert b.reward_B.tolist() == pytest.approx([(0.4 - 0.0) * 1.0, (1.0 - 0.4) * 1.4])


def test_bad_records_are_named():
    bad = _rec(7, 1, 1.0, True)
    del bad["planner"]
    with pytest.raises(S.RecordError, match="task 7"):
        S.planner_samples([bad])
    dup = [_rec(0, 1, 0.0, False, "a"), _rec(0, 1, 0.0, False, "a")]
    with pytest.raises(S.RecordError, match="twice"):
        S.reflector_samples(dup)
    nos = _rec(8, 1, 1.0, True)
    nos["score"] = None
    with pytest.raises(S.RecordError, match="score"):
        S.planner_samples([nos], "rl")


def test_json_round_trip():
    for s in S.planner_samples(RECS, "rl") + S.reflector_samples(RECS, "rl"):
        back = S.sample_from_json(json.loads(json.dumps(S.sample_to_json(s))))
        assert back == s and back.metadata == s.metadata


def test_real_loop_records_hotpotqa():
    """Records written by the trial loop on the real HotpotQA env with the gold script."""
    import envs
    from retroact_jax.agent import gold, loop, protocols
    from retroact_jax.agent.slots import ThreadSlots
    probe = envs.make("hotpotqa", "test")
    tasks = {i: probe.task_at(i) for i in (0, 2)}
    probe.close()
    pol = gold.gold_policy(tasks, fail_trials=1)
    recs = []
    runner = loop.TrialRunner(protocols.protocol_for("hotpotqa"),
                              lambda n: ThreadSlots(lambda: envs.make("hotpotqa", "test"), n, 1),
                              pol, pol, loop.AgentConfig(trials=3, batch_size=2))
    runner.run([loop.TaskState(t) for t in tasks.values()], recs.append)
    recs = json.loads(json.dumps(recs))       # as read back from trajectories.jsonl
    pl = S.planner_samples(recs, "il", keep=S.il_keep_planner)
    rf = S.reflector_samples(recs, "il", keep=S.il_keep_reflector)
    assert len(pl) == 2 and len(rf) == 2
    for p, r in zip(sorted(pl, key=lambda s: s.metadata["task_index"]),
                    sorted(rf, key=lambda s: s.metadata["task_index"])):
        assert p.metadata["trial"] == 2 and r.metadata["trial"] == 1
        refl = r.spans[-1][1].strip()
        assert refl in p.spans[0][1]            # the planner's prompt shows the reflection
        assert p.text.endswith("Answer is CORRECT")
        assert {k for k, _ in p.spans} == {"prompt", "generated", "observation"}
