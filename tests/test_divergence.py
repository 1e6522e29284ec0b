"""The divergence guard: per-role norms of the update and of the trainable parameters, checked on the
host. LoRA at an absurd learning rate (its loss stays finite while the adapters explode) and full
fine-tuning both stop with a ``TrainError`` naming the step and the role, before the bad state is
checkpointed, so the last checkpoint is good and a rerun with a sane learning rate resumes from it."""
import json

import numpy as np
import pytest
from flax import nnx

from retroact_jax import train
from retroact_jax.models.lora import LoRAConfig, apply_lora
from retroact_jax.stages import il as il_stage, setup
from tests.test_resume import overrides, write_data
from tests.test_train import _batch, _model


def _learner(lora: bool, lr: float, warmup: int = 0, **kw):
    model = _model(0)
    if lora:
        apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0), nnx.Rngs(params=1, dropout=2))
    rows = {"planner": 1}
    opt = {"name": "adamw", "learning_rate": lr, "schedule": "constant", "warmup_steps": warmup}
    return train.Learner({"planner": model}, optimizer=opt, rows=rows, **kw), _batch({"planner": model}, rows)


@pytest.mark.parametrize("lr,why", [(1e6, r"update norm .* x the parameter norm"),
                                    (1e30, r"non-finite .*update norm inf")])
def test_lora_at_an_absurd_lr_stops_naming_step_and_role(lr, why):
    learner, b = _learner(True, lr)
    m = learner.step(b)
    assert np.isfinite(float(m["loss"]))                 # the loss alone would not notice
    with pytest.raises(train.TrainError, match=rf"^training diverged at step 1: planner: {why}"):
        learner.check(m, 1)


def test_sane_runs_stay_far_below_the_default_limit():
    for lora in (True, False):
        learner, b = _learner(lora, 1e-3)
        for step in range(1, 5):
            h = learner.check(learner.step(b), step)
            assert 0 < h["update_ratio_planner"] < train.DEFAULT_MAX_UPDATE_RATIO / 100
            assert h["param_norm_planner"] > 0 and h["update_norm_planner"] > 0


def test_full_finetuning_stops_too():
    learner, b = _learner(False, 1e6)
    with pytest.raises(train.TrainError, match="diverged at step 1: planner: update norm"):
        learner.check(learner.step(b), 1)
    learner, b = _learner(False, 1e6, max_update_ratio=0.0)      # ratio check off: NaN/inf still stop
    with pytest.raises(train.TrainError, match="non-finite"):
        for step in range(1, 7):
            learner.check(learner.step(b), step)
    assert step <= 4
    with pytest.raises(train.TrainError, match=r"^non-finite loss at step 7: loss=nan"):
        train.check_finite({"loss": np.float32("nan"), "update_norm_planner": 1.0}, 7)
    with pytest.raises(train.TrainError, match="max_update_ratio"):
        _learner(False, 1e-3, max_update_ratio=-1.0)


def test_a_checkpoint_is_never_written_from_an_unchecked_state(tmp_path):
    learner, b = _learner(True, 1e6, warmup=2)    # step 1: lr 0 (warmup), step 2: lr 5e5
    ck = setup.TrainCheckpoints(tmp_path / "ck")
    learner.step(b)
    assert ck.save(learner, {"stage": "t"}) == 1  # nobody fetched step 1's metrics: the save checks them
    learner.step(b)
    with pytest.raises(train.TrainError, match="step 2: planner"):
        ck.save(learner, {"stage": "t"})
    assert ck.ck.all_steps == [1] and ck.latest_step == 1
    ck.close()


@pytest.mark.parametrize("lr", [1e6, 1e30])
def test_il_stage_with_lora_at_an_absurd_lr_stops_and_leaves_a_good_checkpoint(tmp_path, lr):
    data = tmp_path / "data.jsonl"
    write_data(data, 16, 8)
    c = il_stage.default_config()
    c.update_from_flattened_dict(overrides(data, **{
        "optimizer.learning_rate": lr, "optimizer.warmup_steps": 3, "train.checkpoint_every": 1,
        "train.epochs": 1}))
    wd = tmp_path / "run"
    with pytest.raises(train.TrainError, match="diverged at step 2: (planner|reflector)"):
        il_stage.run_il(c, wd)
    ck = setup.TrainCheckpoints(wd / "checkpoints")
    assert ck.ck.all_steps == [1] and ck.ck.check(1) is None
    params, meta = ck.read()
    ck.close()
    lora = {k: v for k, v in params.items() if k.startswith("['params']")}
    assert lora and all(np.all(np.isfinite(v)) and np.abs(v).max() < 1.0 for v in lora.values())
    if lr == 1e6:     # the good checkpoint is usable: a sane learning rate resumes from it
        c.optimizer.learning_rate = 1e-3
        s = il_stage.run_il(c, wd)
        assert s["resumed_from"] == 1 and s["steps"] > 1
        assert json.loads((wd / "il_summary.json").read_text())["steps"] == s["steps"]
