"""The CPU Table 2 command (experiments/configs/table2_cpu.py) on the tiny random model: every published
artifact, re-evaluation from the published adapters reproducing per-task scores, and the validation
slice never reaching training data (expert rollouts, released IL rows, RL collection)."""
import json
import pathlib

import pytest

from experiments.configs import table2_cpu
from retroact_jax import released_data
from retroact_jax.stages import expert, holdout, methods, pipeline, publish, validate

ENVS = ("hotpotqa", "intercode_sql", "alfworld")


def tiny_table_config(tmp: pathlib.Path, methods_: str):
    c = table2_cpu.get_config()
    c.methods, c.run_dir, c.publish = methods_, str(tmp / "run"), str(tmp / "published")
    c.model.planner, c.backbone = "tiny-random", "tiny-random"
    c.validation.num_tasks = 3
    c.eval.update(num_tasks=2, trials=2, batch_size=2, env_workers=2, max_steps=1, planner_max_tokens=8,
                  reflector_max_tokens=8, num_examples=1, progress=False, cache_buckets="2048,4096",
                  chunk_buckets="")
    c.il.data.update(expert_tasks=4, expert_reflect_fraction=1.0, eval_rows=0, max_tokens=2048,
                     long_rows="truncate")
    c.il.train.update(max_steps=2, buckets="2048", eval_every=0, progress=False, tensorboard=False)
    c.il.optimizer.update(warmup_steps=0, learning_rate=1e-2)
    c.rl.collect.update(tasks_per_iteration=2, trials=2, batch_size=2, env_workers=2, max_steps=1,
                        planner_max_tokens=8, reflector_max_tokens=8, batch_buckets="2",
                        cache_buckets="2048,4096", chunk_buckets="", new_token_buckets="8", score_buckets="2048",
                        score_rows=2)
    c.rl.replay.update(drop_zero_reward=False, max_chars=0, max_tokens=0)
    c.rl.train.update(iterations=2, buckets="2048", progress=False, tensorboard=False, checkpoint_every=0)
    c.rl.optimizer.update(warmup_steps=0, learning_rate=1e-2)
    c.rl.eval.update(num_tasks=2, trials=2, batch_size=2)
    return c


@pytest.mark.parametrize("env", ENVS)
def test_config_validates_all_seven_methods_per_env(env):
    c = table2_cpu.get_config()
    c.env = env
    pipeline.resolve(c)
    validate.validate(c)
    assert pipeline.method_names(c) == ["react", "reflexion", "sft", "sft_ei", "sft_rl", "retroact",
                                        "retroact_single"]
    assert c.run_dir == f"runs/table2_cpu/{env}" and c.publish == f"results/table2_cpu/{env}"
    assert c.eval.trials >= 5
    single = methods.get("retroact_single")
    assert pipeline.il_dir(c, single).name == "il_planner+reflector_single"
    assert pipeline.stage_config(c, "rl", single).model.multi_agent is False
    assert pipeline.stage_config(c, "rl", methods.get("retroact")).model.multi_agent is True
    for stage in ("il", "rl"):
        assert pipeline.stage_config(c, stage, single).validation.to_dict() == {
            "env": env, "num_tasks": 20, "seed": 0}


def test_unknown_key_fails():
    c = table2_cpu.get_config()
    c.lock()                                   # as experiments.run loads it (lock_config=True)
    with pytest.raises(AttributeError):
        c.eval.no_such_key = 1


def test_validation_slice_is_fixed_and_disjoint():
    a, b = holdout.indices(753, 20, 0), holdout.indices(753, 20, 0)
    assert a == b and len(set(a)) == 20 and holdout.indices(753, 20, 1) != a
    rest = holdout.training_indices(753, 20, 0)
    assert not set(a) & set(rest) and len(rest) == 733
    with pytest.raises(holdout.HoldoutError):
        holdout.indices(5, 5, 0)


@pytest.mark.parametrize("name, env", [("intercode_il", "intercode_sql"), ("alfworld_il", "alfworld")])
def test_released_rows_of_the_slice_are_dropped(name, env):
    held = holdout.Slice(env, 40, 0)
    samples = released_data.load_retroact(name).samples
    kept, dropped = holdout.drop_released(samples, held.instructions)
    assert len(kept) + dropped == len(samples)
    assert not any(holdout.mentions(holdout.sample_text(s), held.instructions) for s in kept)
    if env == "intercode_sql":   # released InterCode rows name their question: some slice tasks are in them
        assert dropped > 0
        assert all(any(f"Question: {q}" in holdout.sample_text(s) for q in held.instructions)
                   for s in samples if s not in kept)


def test_expert_never_plays_the_slice():
    held = holdout.Slice("hotpotqa", 20, 0)
    cfg = expert.ExpertConfig(num_tasks=0, exclude=tuple(held.indices))
    picked = expert.pick(753, "hotpotqa", cfg)
    assert len(picked) == 733 and not set(picked) & set(held.indices)
    sub = expert.pick(753, "hotpotqa", expert.ExpertConfig(num_tasks=50, exclude=tuple(held.indices)))
    assert len(sub) == 50 and not set(sub) & set(held.indices)
    # without a slice: the same subset as before the slice existed
    assert expert.pick(753, "hotpotqa", expert.ExpertConfig(num_tasks=50)) == expert.select_tasks(753, 50, 0)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("table2")
    c = tiny_table_config(d, "react,sft_rl,retroact_single")
    pipeline.resolve(c)
    validate.validate(c)
    return d, c, pipeline.run(c)


@pytest.mark.slow
def test_publishes_every_artifact(table):
    d, c, results = table
    pub = d / "published"
    for f in ("results.md", "results.json", "metrics.png", "rl_curve.png", "RUN.md", "config.json",
              "adapters.json"):
        assert (pub / f).is_file(), f
    res = json.loads((pub / "results.json").read_text())
    assert [m["method"] for m in res["methods"]] == ["ReAct", "SFT+RL", "RetroAct (single-agent)"]
    for m in res["methods"]:
        assert len(m["tasks"]) == 2 and all({"score", "success", "steps"} <= set(t["trials"][0])
                                            for t in m["tasks"])
        assert m["actions"]["actions"] > 0
    rl = {m["run"]: m["rl"] for m in res["methods"] if "rl" in m}
    assert set(rl) == {"sft_rl", "retroact_single"}
    for r in rl.values():
        assert [p["iteration"] for p in r["curve"]] == [1, 2] and r["logged_updates"] > 0
    assert res["methods"][2]["reflection_changes"]["pairs"] >= 0
    md = (pub / "results.md").read_text()
    assert "tiny-random" in md and "RetroAct (single-agent)" in md and "valid actions" in md
    merged = (d / "README.md").read_text()      # every published env beside the paper's 7B rows
    assert "Llama-2-7B-chat (paper)" in merged and "tiny-random" in merged and "60.92" in merged
    run_md = (pub / "RUN.md").read_text()
    assert "retroact_single/rl" in run_md and "il_planner" in run_md and "experiments.table2" in run_md
    ad = json.loads((pub / "adapters.json").read_text())
    assert set(ad) == {"sft_rl", "retroact_single"}
    assert [pathlib.Path(x).parts[-2:] for x in ad["sft_rl"]["planner"]] == [("il", "planner"), ("rl", "planner")]
    assert ad["retroact_single"]["planner"] == ad["retroact_single"]["reflector"]
    for chain in ad.values():
        for dirs in chain.values():
            assert all((pub / x / "adapter_config.json").is_file() for x in dirs)


@pytest.mark.slow
def test_validation_slice_never_reaches_training(table):
    d, c, _ = table
    held = set(holdout.indices(753, 3, 0))
    run = pathlib.Path(c.run_dir)
    expert_recs = [json.loads(x) for f in run.glob("il_*/expert/hotpotqa/trajectories.jsonl")
                   for x in f.read_text().splitlines()]
    assert expert_recs and not {r["task_index"] for r in expert_recs} & held
    rollouts = [json.loads(x) for f in run.glob("*/rl/rollouts/*/trajectories.jsonl")
                for x in f.read_text().splitlines()]
    assert rollouts and not {r["task_index"] for r in rollouts} & held
    evals = [json.loads(x) for f in run.glob("*/rl/eval/*/trajectories.jsonl") for x in f.read_text().splitlines()]
    assert evals and {r["task_index"] for r in evals} <= held and {r["split"] for r in evals} == {"train"}


@pytest.mark.slow
def test_reevaluation_from_published_adapters_reproduces_scores(table, tmp_path):
    d, _, _ = table
    got = publish.reevaluate(d / "published", tmp_path)
    assert set(got) == {"sft_rl", "retroact_single"}
    for r in got.values():
        assert r["tasks"] == 2 and r["mismatches"] == []


@pytest.mark.slow
def test_validation_eval_shares_the_run_dir_with_the_test_eval(table):
    """Tuning (split=validation) in the table's run dir reuses its trained stages and evaluates into
    eval_validation/; the test eval's trajectories and results stay as they were (before, the second
    split's eval found the first's trajectories.jsonl and stopped)."""
    d, c, _ = table
    run = pathlib.Path(c.run_dir)
    test_res = (run / "sft_rl" / "eval" / "results.json").read_text()
    rl_summary = (run / "sft_rl" / "rl" / "rl_summary.json").stat().st_mtime_ns
    v = tiny_table_config(d, "sft_rl")
    v.split, v.publish = "validation", str(d / "published_validation")
    pipeline.resolve(v)
    validate.validate(v)
    got = pipeline.run(v)
    assert len(got) == 1 and got[0]["num_tasks"] == 2
    vrecs = [json.loads(x) for x in (run / "sft_rl" / "eval_validation" / "trajectories.jsonl").read_text().splitlines()]
    assert {r["split"] for r in vrecs} == {"train"}
    assert {r["task_index"] for r in vrecs} <= set(holdout.indices(753, 3, 0))
    assert (run / "sft_rl" / "eval" / "results.json").read_text() == test_res
    assert (run / "sft_rl" / "rl" / "rl_summary.json").stat().st_mtime_ns == rl_summary   # not retrained
    assert json.loads((d / "published_validation" / "results.json").read_text())["methods"][0]["tasks"]
    # and back: the test split's finished eval is skipped, not replayed into the validation records
    pipeline.run(c)
    assert (run / "sft_rl" / "eval" / "results.json").read_text() == test_res


@pytest.mark.slow
def test_execution_settings_do_not_redo_finished_stages_or_evals(table, tmp_path):
    """Rows per reflector / scoring call and the progress bar say how a stage runs, not what it
    computes: a finished stage or eval is not redone when only they change; another setting is
    still a different stage."""
    import copy
    d, c, _ = table
    run = pathlib.Path(c.run_dir)
    done = sorted(run.glob("*/rl/rl_summary.json")) + sorted(run.glob("*/eval/results.json"))
    stamps = [p.stat().st_mtime_ns for p in done]
    v = tiny_table_config(d, c.methods)
    v.publish = str(tmp_path / "published")
    v.rl.collect.update(score_rows=1, reflector_rows=1)
    v.eval.update(reflector_rows=1, progress=True)
    pipeline.resolve(v)
    validate.validate(v)
    pipeline.run(v)
    assert len(done) == 5 and [p.stat().st_mtime_ns for p in done] == stamps
    sc = pipeline.stage_config(v, "rl", methods.get("sft_rl")).to_dict()
    other = copy.deepcopy(sc)
    other["collect"]["reflector_rows"] += 2
    assert pipeline._what(sc) == pipeline._what(other)
    other["collect"]["batch_size"] += 1
    assert pipeline._what(sc) != pipeline._what(other)


@pytest.mark.slow
def test_progress_carries_a_run_to_a_fresh_machine(table, tmp_path):
    """save -> (the machine is lost) -> restore: the merged exports are rebuilt byte for byte from the
    LoRA adapters, and the table's command skips every finished stage and eval."""
    from retroact_jax.stages import progress
    d, c, results = table
    run = pathlib.Path(c.run_dir)
    got = progress.save(run, tmp_path / "progress")
    saved = [p.relative_to(tmp_path / "progress") for p in (tmp_path / "progress").rglob("*") if p.is_file()]
    assert got["files"] == len(saved) - 1 and not got["skipped_over_max_mb"]
    assert not any("hf" in p.parts for p in saved)
    assert not any("checkpoints" in p.parts for p in saved)         # every stage finished: none needed
    assert any(p.name == "adapter_model.safetensors" for p in saved)
    kept = tmp_path / "lost_machine"
    run.rename(kept)
    try:
        with pytest.raises(progress.StageError, match="saved from run_dir"):
            progress.restore(tmp_path / "progress", tmp_path / "elsewhere")
        back = progress.restore(tmp_path / "progress", run)
        assert back["copied"] == got["files"] and len(back["rebuilt"]) >= 3   # sft_rl il + rl, single il + rl
        hf = sorted(p.relative_to(kept) for p in kept.rglob("export/*/hf/*") if p.is_file())
        assert hf and any(p.suffix == ".safetensors" for p in hf)
        for p in hf:
            assert (run / p).read_bytes() == (kept / p).read_bytes(), p
        stages = (run / "stages.json").read_text()
        c2 = tiny_table_config(d, "react,sft_rl,retroact_single")
        c2.publish = str(tmp_path / "published")
        pipeline.resolve(c2)
        validate.validate(c2)
        again = pipeline.run(c2)
        assert (run / "stages.json").read_text() == stages            # nothing trained or evaluated again
        assert [r["metrics"] for r in again] == [r["metrics"] for r in results]
    finally:
        import shutil
        shutil.rmtree(run, ignore_errors=True)
        kept.rename(run)


@pytest.mark.slow
def test_publish_keeps_the_published_rows_it_does_not_rebuild(table, tmp_path):
    """Publishing one method of a run directory (or one that lost the others' evals) keeps the other
    published rows, their adapters, RL curves and stage figures, in Table 2's order."""
    import shutil
    d, c, _ = table
    pub = tmp_path / "published"
    shutil.copytree(d / "published", pub)
    before = json.loads((pub / "results.json").read_text())
    c2 = tiny_table_config(d, "sft_rl")
    c2.publish = str(pub)
    pipeline.resolve(c2)
    publish.publish(c2, [], command="x")
    after = json.loads((pub / "results.json").read_text())
    assert [m["method"] for m in after["methods"]] == ["ReAct", "SFT+RL", "RetroAct (single-agent)"]
    for old, new in zip(before["methods"], after["methods"]):
        assert new["tasks"] == old["tasks"] and new["metrics"] == old["metrics"]
        assert new["commit"]
    assert set(after["adapters"]) == {"sft_rl", "retroact_single"}
    assert set(after["stages"]) >= set(before["stages"]) and "retroact_single/rl" in after["stages"]
    assert "retroact_single/rl" in (pub / "RUN.md").read_text()
    # a different env's table is never merged in
    other = json.loads((pub / "results.json").read_text())
    other["env"] = "alfworld"
    (pub / "results.json").write_text(json.dumps(other))
    publish.publish(c2, [], command="x")
    assert [m["method"] for m in json.loads((pub / "results.json").read_text())["methods"]] == ["SFT+RL"]


def test_progress_keeps_the_checkpoints_of_unfinished_stages_only(tmp_path):
    from retroact_jax.stages import progress
    run = tmp_path / "run"
    for stage, done in (("il_planner", True), ("sft_rl/rl", False)):
        (run / stage / "checkpoints" / "50").mkdir(parents=True)
        (run / stage / "checkpoints" / "50" / "state.bin").write_bytes(b"x")
        (run / stage / "metrics.jsonl").write_text("{}\n")
        if done:
            (run / stage / f"{stage.split('/')[-1].split('_')[0]}_summary.json").write_text("{}")
    (run / "il_planner" / "export" / "planner" / "hf").mkdir(parents=True)
    (run / "il_planner" / "export" / "planner" / "hf" / "model.safetensors").write_bytes(b"w")
    got = progress.save(run, tmp_path / "p")
    saved = sorted(str(p.relative_to(tmp_path / "p")) for p in (tmp_path / "p").rglob("*") if p.is_file())
    assert saved == ["il_planner/il_summary.json", "il_planner/metrics.jsonl", "progress.json",
                     "sft_rl/rl/checkpoints/50/state.bin", "sft_rl/rl/metrics.jsonl"]
    assert got["files"] == 4


def test_second_backbone_config_has_its_own_run_and_table():
    from experiments.configs import table2_cpu_qwen
    c = table2_cpu_qwen.get_config()
    c.env = "intercode_sql"
    pipeline.resolve(c)
    from retroact_jax.models import embedded
    try:
        embedded.check_installed(c.model.planner)
    except embedded.EmbeddedModelError:           # CI installs without --qwen-coder: the one-line error
        with pytest.raises(validate.ConfigError, match="setup.sh --qwen-coder"):
            validate.validate(c)
    else:
        validate.validate(c)
    assert (c.run_dir, c.publish) == ("runs/table2_cpu/intercode_sql_qwen", "results/table2_cpu/intercode_sql_qwen")
    assert c.model.planner == "qwen2.5-coder-0.5b-instruct" and c.model.reflector == ""
    base = table2_cpu.get_config()            # every other setting is the SmolLM2 table's
    assert c.methods == base.methods
    for k in ("eval", "il", "rl", "validation"):
        assert c[k].to_dict() == base[k].to_dict()
