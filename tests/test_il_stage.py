"""The IL stage: tiny runs (multi-agent LoRA, single-agent, full fine-tuning), export equals the
trained model, expert rollouts on the real envs filtered by their evaluators, the metrics writer,
and (real weights) IL on the original ALFWorld data lowers SmolLM2's held-out loss."""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retroact_jax import metrics as M
from retroact_jax import benchmarks, stages
from retroact_jax.stages import expert, il as il_stage
from tests.test_resume import overrides, write_data


def _config(tmp_path, **extra):
    data = tmp_path / "data.jsonl"
    write_data(data, 24, 10)
    c = il_stage.default_config()
    base = overrides(data, **{"train.epochs": 3, "train.eval_every": 10, "train.checkpoint_every": 0,
                              "export.enabled": True, "train.tensorboard": True})
    base.update(extra)
    c.update_from_flattened_dict(base)
    return c


def _eval(workdir):
    return [r for r in M.read_jsonl(workdir / "metrics.jsonl") if r["split"] == "eval"]


def test_multi_agent_lora_run_lowers_heldout_loss_and_exports(tmp_path):
    c = _config(tmp_path)
    wd = tmp_path / "run"
    s = il_stage.run_il(c, wd)
    ev = _eval(wd)
    assert ev[0]["step"] == 0 and ev[-1]["step"] == s["steps"]
    for role in ("planner", "reflector"):
        assert ev[-1][f"loss_{role}"] < ev[0][f"loss_{role}"] - 0.5, ev
    assert s["data"]["planner"] == {"train": 20, "heldout": 4, "over_max_tokens": 0, "long_rows": "truncate"}
    # each role saw its data `epochs` times: 20 planner rows / 2 per step, 6 reflector / 1 per step
    assert s["steps"] == max(10 * 3, 6 * 3)
    assert list((wd / "tb").glob("events.out.tfevents.*"))
    # the export equals the trained model: base + saved adapters (eval mode) vs the merged HF dir
    from retroact_jax.models import convert, lora, safetensors_io as sio
    from retroact_jax.models.config import tiny
    from retroact_jax.models.decoder import Decoder
    for role in ("planner", "reflector"):
        cfg, tensors = sio.read_hf_dir(wd / "export" / role / "hf")
        merged = convert.load_model(cfg, tensors)
        adapted = Decoder(tiny(vocab_size=259), rngs=nnx.Rngs(0))   # the tiny-random base of seed 0
        lora.load_lora(adapted, wd / "export" / role / "lora")
        adapted.eval()
        ids = jnp.arange(3, 40)[None]
        np.testing.assert_allclose(np.asarray(merged(ids, None, None)[0]),
                                   np.asarray(adapted(ids, None, None)[0]), atol=2e-5)
    # a finished run restarted does no step and keeps its parameters
    before = il_stage.trained_params(wd)
    again = il_stage.run_il(c, wd)
    assert again["resumed_from"] == s["steps"]
    assert again["eval"] == pytest.approx(s["eval"]) and len(_eval(wd)) == len(ev)   # no new eval line
    after = il_stage.trained_params(wd)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_single_agent_shares_one_model_and_full_finetuning(tmp_path):
    c = _config(tmp_path, **{"model.multi_agent": False, "model.lora": False, "train.epochs": 1})
    wd = tmp_path / "single"
    s = il_stage.run_il(c, wd)
    assert list(s["export"]) == ["shared"]
    params = il_stage.trained_params(wd)
    assert all("['shared']" in k for k in params) and not any("lora" in k for k in params)
    assert any("embed" in k for k in params)                 # full fine-tuning: base weights train


def test_bad_configs_are_named(tmp_path):
    c = _config(tmp_path, **{"data.roles": "planner,critic"})
    with pytest.raises(stages.StageError, match="data.roles"):
        il_stage.run_il(c, tmp_path / "x")
    c = _config(tmp_path, **{"data.long_rows": "drop", "data.max_tokens": 10})
    with pytest.raises(stages.StageError, match="no planner samples"):
        il_stage.run_il(c, tmp_path / "y")


# ----------------------------------------------------------------------------------- metrics
def test_metrics_writer_files_truncation_and_lag(tmp_path):
    with M.MetricsWriter(tmp_path) as w:
        for step in (1, 2, 3):
            w.write(step, {"loss": 1.0 / step, "nan": float("nan")})
        w.write(3, {"loss_planner": 0.5}, split="eval")
    recs = M.read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in recs] == [(1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    assert recs[1]["loss"] == 0.5 and recs[0]["nan"] == "nan"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "spl')                      # torn by a kill
    M.MetricsWriter(tmp_path, tensorboard=False, start_step=2).close()
    assert [r["step"] for r in M.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    fetched = []
    lag = M.Lagged(lambda dev, step: fetched.append(step) or {"v": float(dev["v"])})
    assert lag.push(1, {"v": 1}, {"h": 1}) is None and fetched == []     # fetched one step late
    assert lag.push(2, {"v": 2}, {"h": 2}) == (1, {"v": 1.0, "h": 1})
    assert lag.flush() == (2, {"v": 2.0, "h": 2}) and lag.flush() is None
    # FLOPs: 6N (full) / 4N (frozen base) + attention 12 L H d T
    assert M.flops_per_token(100, 2, 4, 16, 32) == 600 + 12 * 2 * 4 * 16 * 32
    assert M.flops_per_token(100, 2, 4, 16, 32, frozen_base=True) == 400 + 12 * 2 * 4 * 16 * 32
    t = iter([0.0, 2.0])
    thr = M.Throughput(peak_flops=100.0, clock=lambda: next(t))
    assert thr.update(tokens=10, flops=50.0) == {"tokens_per_s": 5.0, "step_time_s": 2.0, "mfu": 0.25}


# ------------------------------------------------------------------------ expert on real envs
def _check_expert(env, tmp_path, n, **kw):
    cfg = expert.ExpertConfig(num_tasks=0, reflect_fraction=1.0, batch_size=n, env_workers=2,
                              progress=False)
    import envs
    probe = envs.make(env, benchmarks.get(env).train_split)
    idx = list(range(n))
    probe.close()
    pl, rf, counts = expert.expert_il_data(env, tmp_path, cfg, task_indices=idx, **kw)
    recs = [json.loads(line) for line in open(tmp_path / env / "trajectories.jsonl")]
    assert {r["split"] for r in recs} == {"train"}
    assert all(not expert.passes_evaluator(r) for r in recs if r["trial"] == 1)   # failed on purpose
    kept = [r for r in recs if expert.passes_evaluator(r)]
    assert counts["trials_kept"] == len(pl) == len(kept) and counts["reflector_kept"] == len(rf)
    assert all(s.metadata["trial"] == 2 for s in pl) and all(s.metadata["trial"] == 1 for s in rf)
    for s in rf:                         # the reflection the successful trial saw
        twin = next(p for p in pl if p.metadata["task_id"] == s.metadata["task_id"])
        assert s.spans[-1][1].strip() in twin.spans[0][1]
    lines = (tmp_path / env / "il_samples.jsonl").read_text().splitlines()
    assert len(lines) == len(pl) + len(rf)
    # a second call reuses the cache: no new trial is written
    n_before = len(recs)
    expert.expert_il_data(env, tmp_path, cfg, task_indices=idx)
    assert len(open(tmp_path / env / "trajectories.jsonl").read().splitlines()) == n_before
    return pl, rf, recs


def test_expert_hotpotqa_filtered_by_exact_match(tmp_path):
    pl, rf, recs = _check_expert("hotpotqa", tmp_path, 4)
    assert len(pl) >= 3
    for s in pl:
        assert s.text.endswith("Answer is CORRECT")
    # trial-1 failures answered the first title: F1 may be > 0 but EM is not
    assert all(r["steps"][-1]["info"]["em"] is False for r in recs if r["trial"] == 1)


@pytest.mark.mariadb
def test_expert_intercode_sql_reward_one(tmp_path):
    from envs.intercode_sql import server
    if server.available():
        pytest.skip(server.available())
    pl, rf, recs = _check_expert("intercode_sql", tmp_path, 3)
    assert len(pl) == 3 and len(rf) == 3
    assert all(r["score"] == 1.0 for r in recs if r["trial"] == 2)


@pytest.mark.alfworld
@pytest.mark.slow
def test_expert_alfworld_two_games_won(tmp_path):
    pytest.importorskip("textworld")
    pl, rf, recs = _check_expert("alfworld", tmp_path, 2)
    assert len(pl) == 2 and len(rf) == 2
    assert all(r["steps"][-1]["info"]["won"] for r in recs if r["trial"] == 2)


def test_expert_task_subset_and_failures_are_seeded():
    a = expert.select_tasks(3553, 50, seed=0)
    assert a == expert.select_tasks(3553, 50, seed=0) != expert.select_tasks(3553, 50, seed=1)
    assert len(a) == 50 and a == sorted(a) and len({i // 500 for i in a}) > 3   # spread over the split
    f = [expert.fails_first(i, 0.3, 0) for i in range(1000)]
    assert 0.25 < np.mean(f) < 0.35 and f == [expert.fails_first(i, 0.3, 0) for i in range(1000)]


# ------------------------------------------------------------------------------ real weights
@pytest.mark.real_weights
@pytest.mark.slow
def test_il_on_released_alfworld_lowers_smollm2_heldout_loss(tmp_path):
    pytest.importorskip("gguf")
    c = il_stage.default_config()
    c.update_from_flattened_dict({
        "model.planner": "embedded", "data.released": "alfworld_il", "data.roles": "planner",
        "data.max_tokens": 256, "data.long_rows": "truncate", "data.eval_rows": 4,
        "data.max_rows_per_role": 16, "train.buckets": "256", "train.rows_planner": 2,
        "train.epochs": 1, "train.max_steps": 8, "train.eval_every": 8, "train.checkpoint_every": 0,
        "train.progress": False, "train.tensorboard": False, "export.enabled": False,
        "optimizer.learning_rate": 3e-4, "optimizer.warmup_steps": 2})
    s = il_stage.run_il(c, tmp_path / "smol")
    ev = _eval(tmp_path / "smol")
    before, after = ev[0]["loss_planner"], ev[-1]["loss_planner"]
    assert ev[0]["tokens_planner"] > 100 and s["steps"] == 8
    assert after < before - 0.05, (before, after)
