"""Optimizer-from-config, mesh/partition rules and the Orbax checkpointer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from retroact_jax import checkpoint, optim, sharding


def test_optimizer_by_name_matches_optax_and_schedule():
    cfg = {"name": "adamw", "kwargs": {"weight_decay": 0.01}, "learning_rate": 1e-3,
           "schedule": "linear", "warmup_steps": 2, "total_steps": 6, "grad_clip_norm": 0}
    tx = optim.make_optimizer(cfg)
    sched = optim.make_schedule(cfg)
    assert [float(sched(i)) for i in range(7)] == pytest.approx(
        [0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])
    p = {"w": jnp.arange(3.0)}
    g = {"w": jnp.array([0.1, -0.2, 0.3])}
    s = tx.init(p)
    ref = optax.adamw(sched, weight_decay=0.01)
    rs = ref.init(p)
    for _ in range(4):
        u, s = tx.update(g, s, p)
        ru, rs = ref.update(g, rs, p)
        np.testing.assert_allclose(u["w"], ru["w"], rtol=1e-6)
    assert float(optim.current_lr(s)) == pytest.approx(float(sched(3)))


def test_optimizer_errors_name_the_problem():
    with pytest.raises(optim.OptimizerConfigError, match="adamax"):
        optim.make_optimizer({"name": "adamx"})
    with pytest.raises(optim.OptimizerConfigError, match=r"\['wd'\]"):
        optim.make_optimizer({"name": "adamw", "kwargs": {"wd": 0.1}})
    with pytest.raises(optim.OptimizerConfigError, match="schedule"):
        optim.make_schedule({"schedule": "exp", "total_steps": 10})


def test_accumulation_applies_every_k():
    tx = optim.make_optimizer({"name": "sgd", "learning_rate": 1.0, "schedule": "constant",
                               "accumulate_steps": 2, "grad_clip_norm": None})
    p = {"w": jnp.zeros(())}
    s = tx.init(p)
    u1, s = tx.update({"w": jnp.array(1.0)}, s, p)
    u2, s = tx.update({"w": jnp.array(3.0)}, s, p)
    assert float(u1["w"]) == 0.0 and float(u2["w"]) == pytest.approx(-2.0)


def test_mesh_shape_and_rules():
    assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4, 1)
    with pytest.raises(sharding.ShardingError, match="unknown mesh axes"):
        sharding.mesh_shape({"model": 2}, 8)
    with pytest.raises(sharding.ShardingError, match="needs 4 devices"):
        sharding.mesh_shape({"data": 4}, 8)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    spec = sharding.spec_for("layers.0.self_attn.q_proj.kernel", (64, 64), mesh)
    assert spec == P("fsdp", "tensor")
    # a dimension the axis does not divide is replicated, never padded
    assert sharding.spec_for("layers.0.self_attn.q_proj.kernel", (63, 64), mesh) == P(None, "tensor")
    assert sharding.spec_for("norm.scale", (64,), mesh) == P(None)
    tree = {"layers": {"0": {"mlp": {"down_proj": {"kernel": jnp.zeros((8, 4))}}}}}
    sh = sharding.tree_shardings(tree, mesh)
    assert sh["layers"]["0"]["mlp"]["down_proj"]["kernel"].spec == P("tensor", "fsdp")


def test_checkpoint_roundtrip_and_latest(tmp_path):
    ck = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
    assert ck.latest_step is None
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(7),
             "rng": jax.random.key_data(jax.random.key(3))}
    for step in (1, 2, 3):
        ck.save(step, jax.tree_util.tree_map(lambda x: x + step if x.dtype == jnp.float32 else x,
                                             state), {"iteration": step, "pos": [0, step]})
    again = checkpoint.Checkpointer(tmp_path)
    assert again.latest_step == 3
    got, meta = again.restore(checkpoint.abstract_like(state))
    np.testing.assert_array_equal(got["params"]["w"], state["params"]["w"] + 3)
    assert meta == {"iteration": 3, "pos": [0, 3]}
    with pytest.raises(checkpoint.CheckpointError, match="step 1"):
        again.restore(checkpoint.abstract_like(state), step=1)   # pruned by max_to_keep
