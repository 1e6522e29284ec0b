"""Each method of Table 2 wired as the paper ran it (README's methods table), on the tiny random
model through the real pipeline: which roles' parameters change, how many trials run at collection
and at evaluation, whether the reflector is called; and several methods merged into one table."""
import json
import pathlib

import numpy as np
import pytest

from retroact_jax.stages import pipeline, rl, setup, validate
from experiments.configs.common import base


def tiny_config(run_dir: pathlib.Path, methods: str, multi_agent: bool = True):
    c = base("hotpotqa")
    c.methods, c.multi_agent, c.run_dir = methods, multi_agent, str(run_dir)
    c.model.planner = "tiny-random"
    for k, v in dict(num_tasks=2, trials=3, batch_size=2, env_workers=2, max_steps=1,
                     planner_max_tokens=8, reflector_max_tokens=8, num_examples=1, progress=False).items():
        c.eval[k] = v
    c.il.data.expert_tasks = 3
    c.il.data.expert_reflect_fraction = 1.0     # every expert task gives a reflector row
    c.il.data.eval_rows = 0
    c.il.train.update(max_steps=2, buckets="2048", eval_every=0, progress=False, tensorboard=False)
    c.il.optimizer.update(warmup_steps=0, learning_rate=1e-2)
    c.rl.collect.update(tasks_per_iteration=2, trials=2, batch_size=2, env_workers=2, max_steps=1,
                        planner_max_tokens=8, reflector_max_tokens=8, batch_buckets="2",
                        cache_buckets="2048,4096", new_token_buckets="8", score_buckets="2048",
                        score_rows=2)
    c.rl.replay.update(drop_zero_reward=False, max_chars=0, max_tokens=0)
    c.rl.train.update(buckets="2048", progress=False, tensorboard=False, checkpoint_every=0)
    c.rl.optimizer.update(warmup_steps=0, learning_rate=1e-2)
    c.rl_schedule = "iterated"
    c.rl.train.iterations = 1
    return c


def run(c):
    pipeline.resolve(c)
    validate.validate(c)
    return pipeline.run(c)


def records(path: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (path / "trajectories.jsonl").read_text().splitlines()]


def roles_changed(workdir: pathlib.Path) -> set[str]:
    """Roles whose LoRA B matrices (zero at init) moved in the stage's last checkpoint."""
    params = setup.trained_params(workdir)
    return {k.split("'")[3] for k, v in params.items() if "lora_b" in k and np.abs(v).max() > 0}


def trials_per_task(recs) -> set[int]:
    out: dict = {}
    for r in recs:
        out[r["task_index"]] = out.get(r["task_index"], 0) + 1
    return set(out.values())


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods_a")
    return d, run(tiny_config(d, "react,sft,retroact"))


@pytest.fixture(scope="module")
def other_three(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods_b")
    return d, run(tiny_config(d, "reflexion,sft_ei,sft_rl"))


@pytest.mark.slow
def test_merged_table_of_three_methods(three):
    d, results = three
    assert [r["method"] for r in results] == ["ReAct", "SFT", "RetroAct"]
    table = json.loads((d / "results.json").read_text())
    assert [(r["backbone"], r["method"]) for r in table] == [("tiny-random", m) for m in ("ReAct", "SFT", "RetroAct")]
    md = (d / "results.md").read_text()
    for m in ("ReAct", "SFT", "RetroAct"):
        assert f"| tiny-random | {m} |" in md
    assert (d / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun finds every piece finished and changes nothing
    done = ("trajectories.jsonl", "il_summary.json", "rl_summary.json", "stage_config.json")
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.name in done}
    assert len(before) >= 3 + 2 + 1 + 2 * 3
    again = run(tiny_config(d, "react,sft,retroact"))
    assert [r["metrics"] for r in again] == [r["metrics"] for r in results]
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_react_is_one_prompted_trial_without_reflector(three):
    d, _ = three
    recs = records(d / "react" / "eval")
    assert trials_per_task(recs) == {1} and all(r["reflection"] is None for r in recs)
    assert "Question:" in recs[0]["planner"]["spans"][0]["text"].split("Question:", 1)[1]  # exemplar
    assert not (d / "react" / "rl").exists()
    res = json.loads((d / "react" / "eval" / "results.json").read_text())
    f1 = res["metrics"]["f1"]
    assert f1["IR"] == f1["FR"] == f1["AR"] and res["trials"] == 3


@pytest.mark.slow
def test_sft_trains_the_planner_only_and_runs_one_trial(three):
    d, _ = three
    assert roles_changed(d / "il_planner") == {"planner"}
    assert json.loads((d / "il_planner" / "il_summary.json").read_text())["roles"] == ["planner"]
    assert not (d / "sft" / "rl").exists()
    recs = records(d / "sft" / "eval")
    assert trials_per_task(recs) == {1} and all(r["reflection"] is None for r in recs)
    assert "Question:" not in recs[0]["planner"]["spans"][0]["text"].split("Question:", 1)[1]  # zero-shot


@pytest.mark.slow
def test_retroact_trains_both_roles_with_the_reflector_in_the_loop(three):
    d, _ = three
    assert roles_changed(d / "il_planner+reflector") == {"planner", "reflector"}
    s = json.loads((d / "retroact" / "rl" / "rl_summary.json").read_text())
    assert s["roles"] == ["planner", "reflector"] and s["reflector_in_loop"] and s["steps"] > 0
    assert "planner" in roles_changed(d / "retroact" / "rl")
    assert {k.split("'")[3] for k in setup.trained_params(d / "retroact" / "rl")} == {"planner", "reflector"}
    coll = records(d / "retroact" / "rl" / "rollouts" / "iter-0001")
    assert trials_per_task(coll) == {2} and sum(r["reflection"] is not None for r in coll) == 2
    recs = records(d / "retroact" / "eval")
    assert trials_per_task(recs) == {3} and sum(r["reflection"] is not None for r in recs) == 4


@pytest.mark.slow
def test_reflexion_prompts_a_reflector_over_k_trials(other_three):
    d, _ = other_three
    recs = records(d / "reflexion" / "eval")
    assert trials_per_task(recs) == {3} and sum(r["reflection"] is not None for r in recs) == 4
    refl = next(r for r in recs if r["reflection"])["reflection"]["spans"][0]["text"]
    assert "Previous trial" in refl and refl.count("Question:") >= 2          # exemplar + this trial
    assert not (d / "reflexion" / "rl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft_ei", "sft_rl"])
def test_sft_ei_and_sft_rl_train_the_planner_without_reflector(other_three, method):
    d, _ = other_three
    s = json.loads((d / method / "rl" / "rl_summary.json").read_text())
    assert s["roles"] == ["planner"] and not s["reflector_in_loop"] and s["method"] == method
    coll = records(d / method / "rl" / "rollouts" / "iter-0001")
    assert trials_per_task(coll) == {1} and all(r["reflection"] is None for r in coll)
    if method == "sft_rl":          # RL rows + the IL regulariser move the planner only
        assert s["steps"] > 0 and roles_changed(d / method / "rl") == {"planner"}
    else:                           # expert iteration keeps successes only: the tiny model has none
        assert s["history"][0]["collect"]["added"] == 0 and s["steps"] == 0
    recs = records(d / method / "eval")
    assert trials_per_task(recs) == {1} and all(r["reflection"] is None for r in recs)
    assert roles_changed(d / "il_planner") == {"planner"}     # shared with sft's IL (one run dir)


def test_rl_schedule_presets():
    c = rl.default_config()
    assert (c.train.iterations, c.train.epochs, c.optimizer.schedule) == rl.SCHEDULES["original"]
    rl.apply_schedule(c, "iterated")
    assert (c.train.iterations, c.train.epochs, c.optimizer.schedule) == (3, 1, "constant")


def test_public_api_and_method_table():
    import retroact_jax
    from retroact_jax.stages import methods
    assert retroact_jax.run is pipeline.run and retroact_jax.validate is validate.validate
    assert list(retroact_jax.METHODS) == ["react", "reflexion", "sft", "sft_ei", "sft_rl", "retroact",
                                          "retroact_single"]
    assert [m.eval_trials(10) for m in methods.METHODS.values()] == [1, 10, 1, 1, 1, 10, 10]
    single = methods.get("retroact_single")     # = retroact with --config.multi_agent=False, by name
    assert not single.multi_agent(True) and single.run_name(True) == methods.get("retroact").run_name(False)
    assert retroact_jax.benchmark("intercode_sql").primary == "reward"
    with pytest.raises(AttributeError):
        retroact_jax.no_such_name
