"""The few-shot LLM expert of HotpotQA (stages/model_expert.py): few-shot prompts at collection, the
zero-shot text in the samples (equal to what the zero-shot agent loop builds: replayed through it),
the EM filter, reflections from the same model, resume; the wiring of ``expert=`` in the IL stage."""
import json

import envs
import pytest
from retroact_jax.agent import gold, loop, prompts, rollout
from retroact_jax.agent.policy import ScriptedPolicy
from retroact_jax.stages import expert, il as il_stage, model_expert

ENV = "hotpotqa"
MINI = model_expert.ModelExpertConfig(planner_examples=1, reflector_examples=1, max_new_tokens=12)


def _tasks(indices):
    e = envs.make(ENV, "train")
    try:
        return {i: e.task_at(i) for i in indices}
    finally:
        e.close()


def _cfg(source, trials, n):
    return expert.ExpertConfig(expert=source, trials=trials, batch_size=n, env_workers=2, progress=False)


def _stand_in(tasks, solve_at, seen, crash_after=None):
    """A scripted 'model': plays the gold from trial ``solve_at[i]`` on (0: never), fails before;
    every reflection names its question and trial."""
    def script(call):
        if crash_after is not None and len(seen) >= crash_after:
            raise RuntimeError("killed")
        seen.append(call)
        index, trial, role = call.key
        if role == "reflector":
            return f" Trial {trial} of question {index} failed: I will search both entities first.\n"
        fail = solve_at[index] == 0 or trial < solve_at[index]
        return gold.gold_planner(tasks[index], call.prompt, fail=fail)
    return ScriptedPolicy(script)


def _replay(zs_records, count_tokens, trials):
    """Play the recorded completions through the zero-shot agent loop (no exemplars); returns the
    records it builds. Same completions in -> the inference text the fine-tuned agent would see."""
    by_key = {}
    for r in zs_records:
        by_key[(r["task_index"], r["trial"], "planner")] = [c["text"] for c in r["planner_calls"]]
        if r.get("reflection"):
            by_key[(r["task_index"], r["trial"], "reflector")] = [r["reflection"]["spans"][1]["text"]]

    class Replay(ScriptedPolicy):
        def count_tokens(self, text):
            return count_tokens(text)
    used = {}

    def script(call):
        i = used.get(call.key, 0)
        used[call.key] = i + 1
        return by_key[call.key][i]
    pol = Replay(script)
    recs = []
    tasks = _tasks(sorted({r["task_index"] for r in zs_records}))
    runner = loop.TrialRunner(model_expert.protocols.protocol_for(ENV),
                              rollout.make_slots_factory(ENV, "train", 5, "threads", 2),
                              pol, pol, loop.AgentConfig(trials=trials, batch_size=len(tasks)))
    runner.run([loop.TaskState(t) for t in tasks.values()], recs.append)
    return recs


def _zero_shot(recs, p_ex, r_ex):
    tasks = _tasks(sorted({r["task_index"] for r in recs}))
    out = []
    for r in recs:
        z = model_expert.zero_shot_record(r, tasks[r["task_index"]], p_ex, r_ex)
        z["planner_calls"] = r["planner"]["calls"]
        out.append(z)
    return out


def _assert_inference_text(recs, p_ex, r_ex, count_tokens, trials):
    zs = _zero_shot(recs, p_ex, r_ex)
    replayed = {(r["task_index"], r["trial"]): r for r in _replay(zs, count_tokens, trials)}
    assert len(replayed) == len(zs)
    plain = lambda spans: [(s["role"], s["text"]) for s in spans]   # noqa: E731
    for z in zs:
        rp = replayed[(z["task_index"], z["trial"])]
        assert plain(rp["planner"]["spans"]) == plain(z["planner"]["spans"])
        assert (rp["reflection"] is None) == (z["reflection"] is None)
        if z["reflection"]:
            assert plain(rp["reflection"]["spans"]) == plain(z["reflection"]["spans"])
    return zs


def test_stand_in_few_shot_collection_zero_shot_samples_em_filter_resume(tmp_path):
    idx = [12, 13, 14, 15]   # the first title is not the answer: scripted failures fail
    tasks = _tasks(idx)
    solve_at = {12: 1, 13: 2, 14: 3, 15: 0}
    seen = []
    pol = _stand_in(tasks, solve_at, seen)
    cfg = _cfg("embedded", 3, 4)
    pl, rf, summ = expert.expert_il_data(ENV, tmp_path, cfg, mcfg=MINI, task_indices=idx,
                                         policies=(pol, pol))
    p_ex, r_ex, shown = model_expert.exemplars(ENV, MINI)
    assert shown == {0} and not shown & set(idx)
    # the few-shot prompts were used at collection, by both roles
    p_block = f"Here are some examples:\n{p_ex}\n(END OF EXAMPLES)\n"
    r_block = f"\nHere are some examples:\n{r_ex}\n(END OF EXAMPLES)"
    assert {c.key[2] for c in seen} == {"planner", "reflector"}
    for c in seen:
        assert (p_block if c.key[2] == "planner" else r_block) in c.prompt
    d = model_expert.run_dir(tmp_path, ENV, "embedded", model_expert.run_key("embedded", MINI, 0, p_ex, r_ex))
    recs = [json.loads(x) for x in open(d / "trajectories.jsonl")]
    assert len(recs) == 1 + 2 + 3 + 3
    assert all(r["success"] == (solve_at[r["task_index"]] == r["trial"]) for r in recs)
    # EM filter: one planner sample per solved question, reflections that preceded a success
    assert summ["positives"] == {"planner": 3, "reflector": 2} == {"planner": len(pl), "reflector": len(rf)}
    assert summ["questions_tried"] == 4 and summ["questions_solved"] == 3
    assert summ["solved_at_trial"] == {"1": 1, "2": 1, "3": 1}
    assert sorted((s.metadata["task_index"], s.metadata["trial"]) for s in pl) == [(12, 1), (13, 2), (14, 3)]
    assert sorted((s.metadata["task_index"], s.metadata["trial"]) for s in rf) == [(13, 1), (14, 2)]
    # the samples are zero-shot: the prompts the fine-tuned agent sees, with the expert's reflections
    for s in pl:
        t, mem = tasks[s.metadata["task_index"]], s.metadata["trial"] - 1
        assert s.spans[0] == ("prompt", prompts.hotpot_planner(t.instruction, [
            f"Trial {k} of question {t.index} failed: I will search both entities first." for k in range(1, mem + 1)]))
        assert "EXAMPLES" not in s.text and s.text.endswith("Answer is CORRECT")
    for s in rf:
        assert s.spans[0][1].startswith(prompts.HOTPOT_REFLECT_INSTRUCTION + "\n\nPrevious trial:\nQuestion: ")
        assert "EXAMPLES" not in s.text and s.spans[-1][1].startswith(f" Trial {s.metadata['trial']} of")
    lines = (d / "il_samples.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all("EXAMPLES" not in x for x in lines)
    assert json.loads((d / "summary.json").read_text())["positives"] == summ["positives"]
    # train text == inference text: the zero-shot loop replaying the same completions builds them
    _assert_inference_text(recs, p_ex, r_ex, pol.count_tokens, 3)
    # a finished collection is read back: no model call
    idle = ScriptedPolicy(lambda call: pytest.fail("the cached collection called the model"))
    pl2, rf2, summ2 = expert.expert_il_data(ENV, tmp_path, cfg, mcfg=MINI, task_indices=idx,
                                            policies=(idle, idle))
    assert [s.text for s in pl2 + rf2] == [s.text for s in pl + rf] and summ2 == summ
    # killed mid-collection, rerun: the same trajectories as the uninterrupted run
    part = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed"):
        crash = _stand_in(tasks, solve_at, [], crash_after=24)
        expert.expert_il_data(ENV, part, cfg, mcfg=MINI, task_indices=idx, policies=(crash, crash))
    dk = model_expert.run_dir(part, ENV, "embedded", model_expert.run_key("embedded", MINI, 0, p_ex, r_ex))
    n_partial = len((dk / "trajectories.jsonl").read_text().splitlines())
    assert 0 < n_partial < len(recs)
    rest = _stand_in(tasks, solve_at, [])
    expert.expert_il_data(ENV, part, cfg, mcfg=MINI, task_indices=idx, policies=(rest, rest))
    key = lambda r: (r["task_index"], r["trial"])   # noqa: E731
    again = sorted((json.loads(x) for x in open(dk / "trajectories.jsonl")), key=key)
    assert again == sorted(recs, key=key)


SHORT_EXAMPLES = ("Question: Who wrote it?\nThought 1: The page says so.\nAction 1: Finish[Ann]\n"
                  "Observation 1: Answer is CORRECT\n",
                  "Previous trial:\nQuestion: Who wrote it?\nThought 1: I guess.\nAction 1: Finish[Bo]\n"
                  "Observation 1: Answer is INCORRECT\n\nReflection: I guessed; search first.\n")


def test_tiny_random_model_writes_both_roles_and_resumes(tmp_path, monkeypatch):
    # short exemplars: the byte tokenizer makes the real ones ~2,500 tokens (a 4k-slot cache, GBs)
    monkeypatch.setattr(model_expert, "exemplars", lambda env, mcfg: (*SHORT_EXAMPLES, {0}))
    built = []
    real = model_expert.build_policies
    monkeypatch.setattr(model_expert, "build_policies", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    cfg = _cfg("tiny-random", 2, 2)
    pl, rf, summ = expert.expert_il_data(ENV, tmp_path, cfg, mcfg=MINI, task_indices=[10, 11])
    planner, reflector = built[0]
    assert planner.sampler is reflector.sampler            # one model writes actions and reflections
    assert planner.stats["calls"] > 0 and reflector.stats["calls"] > 0
    p_ex, r_ex, _ = model_expert.exemplars(ENV, MINI)
    d = model_expert.run_dir(tmp_path, ENV, "tiny-random", model_expert.run_key("tiny-random", MINI, 0, p_ex, r_ex))
    recs = [json.loads(x) for x in open(d / "trajectories.jsonl")]
    assert sorted((r["task_index"], r["trial"]) for r in recs if not r["success"]) == \
        sorted((r["task_index"], r["trial"]) for r in recs if not expert.passes_evaluator(r))
    refl = [r["reflection"] for r in recs if r["reflection"]]
    assert refl and all(x["spans"][1].get("token_ids") for x in refl)   # sampled by the model
    assert summ["positives"]["planner"] == len(pl) == sum(expert.passes_evaluator(r) for r in recs)
    _assert_inference_text(recs, p_ex, r_ex, planner.count_tokens, 2)
    expert.expert_il_data(ENV, tmp_path, cfg, mcfg=MINI, task_indices=[10, 11])
    assert built[1][0].stats["calls"] == 0 and built[1][1].stats["calls"] == 0


def test_expert_setting_reaches_the_model_expert(tmp_path, monkeypatch):
    got = []
    monkeypatch.setattr(model_expert, "expert_il_data", lambda env, out, cfg, **kw: got.append(cfg) or ([], [], {}))
    c = il_stage.default_config()
    c.data.released, c.data.expert_envs = "", ENV
    c.data.expert, c.data.expert_trials = "embedded", 3
    il_stage.load_samples(c, tmp_path)
    assert got[0].expert == "embedded" and got[0].trials == 3
    c.data.expert_envs = "hotpotqa,alfworld"           # refused before the HotpotQA expert runs
    with pytest.raises(expert.ExpertError, match="built for"):
        il_stage.load_samples(c, tmp_path)
    assert len(got) == 1
    assert expert.num_tasks_for(ENV, expert.ExpertConfig().num_tasks) == 0     # gold default: all 753
    assert expert.num_tasks_for("alfworld", -1) == 100 and expert.num_tasks_for(ENV, 7) == 7


def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(expert.ExpertError, match="built for"):
        model_expert.collect("alfworld", tmp_path, _cfg("embedded", 2, 1))
    with pytest.raises(expert.ExpertError, match="neither"):
        model_expert.collect(ENV, tmp_path, _cfg(str(tmp_path / "nope.gguf"), 2, 1))
    with pytest.raises(expert.ExpertError, match="exemplars"):
        model_expert.collect(ENV, tmp_path, _cfg("embedded", 2, 1), MINI, task_indices=[0, 5],
                             policies=(None, None))
    with pytest.raises(expert.ExpertError, match="few-shot"):
        model_expert.collect(ENV, tmp_path, _cfg("embedded", 2, 1),
                             model_expert.ModelExpertConfig(planner_examples=0))
    assert not list(tmp_path.iterdir())
