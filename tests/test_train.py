"""The joint train step on tiny random models: first-update ratios, reward direction, sharding
equivalence, shared parameters, LoRA-only updates, no recompilation."""
import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retroact_jax import batching, losses, train
from retroact_jax.models.config import tiny
from retroact_jax.models.decoder import Decoder
from retroact_jax.models.lora import LoRAConfig, apply_lora

V = 512


class CharTok:
    """One token per character (ids 3..), pieces known exactly: enough to test masks and rewards."""
    def encode_pieces(self, pieces):
        ids, idx = [], []
        for i, p in enumerate(pieces):
            ids += [3 + (ord(c) % (V - 3)) for c in p]
            idx += [i] * len(p)
        return ids, idx


TOK = CharTok()
SPANS = {
    "planner": (("prompt", "Question: what?\n"), ("generated", "Thought 1: look"),
                ("observation", "\nObs: x\n"), ("generated", "Finish[y]")),
    "reflector": (("prompt", "Past trial failed.\nNew plan:"), ("generated", " try again better")),
}


def _model(seed=0):
    return Decoder(tiny(), rngs=nnx.Rngs(seed))


def _beh_logp(model, ids):
    logits, _ = model(jnp.asarray(ids)[None], None, None)
    return np.asarray(losses.token_logprobs(logits, jnp.asarray(ids)[None]))[0]


def _sample(role, model, objective="rl", reward=1.0, with_beh=True):
    kw = dict(reward=reward) if role == "planner" else dict(last_reward=0.0, current_reward=reward)
    s = batching.Sample(role, SPANS[role], objective=objective, **(kw if objective == "rl" else {}))
    ts = batching.tokenize_sample(s, TOK)
    if not with_beh:
        return ts
    lp = _beh_logp(model, ts.ids)
    nonprompt = ts.kinds != batching.KIND_PROMPT
    s = batching.Sample(role, SPANS[role], objective=objective, behaviour_logp=tuple(lp[nonprompt]),
                        **(kw if objective == "rl" else {}))
    return batching.tokenize_sample(s, TOK)


OPT = {"name": "sgd", "learning_rate": 0.5, "schedule": "constant", "grad_clip_norm": None}


def _batch(models, rows, reward=1.0, objective="rl"):
    samples = {r: [_sample(r, models[r], objective, reward)] * rows[r] for r in rows if rows[r]}
    arrays, _ = train.collate_step(samples, rows, buckets=(64,), pad_id=0)
    return arrays


def test_first_update_ratio_is_one_and_metrics():
    models = {"planner": _model(0), "reflector": _model(1)}
    rows = {"planner": 2, "reflector": 1}
    learner = train.Learner(models, optimizer=OPT, rows=rows)
    m = train.check_finite(learner.step(_batch(models, rows)), 0)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["ratio_min"] == pytest.approx(1.0, abs=1e-5) and m["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert m["clip_fraction"] == 0.0 and abs(m["approx_kl"]) < 1e-6
    assert m["rl_tokens_missing_behaviour"] == 0
    n_pl = sum(len(t) for k, t in SPANS["planner"] if k != "prompt")
    assert m["tokens_rl_planner"] == 2 * n_pl
    assert m["rows_rl_reflector"] == 1 and m["rows_rl_planner"] == 2


@pytest.mark.parametrize("reward", [1.0, -1.0])
def test_reward_sign_moves_logprobs_of_rewarded_tokens(reward):
    model = _model(0)
    rows = {"planner": 1}
    ts = _sample("planner", model, "rl", reward)
    before = _beh_logp(model, ts.ids)
    learner = train.Learner({"planner": model}, optimizer=OPT, rows=rows,
                            loss=losses.LossConfig(il_coef=0.0))
    arrays, _ = train.collate_step({"planner": [ts]}, rows, buckets=(64,), pad_id=0)
    for _ in range(3):
        learner.step(arrays)
    learner.sync_models()
    after = _beh_logp(model, ts.ids)
    trained = batching.trained_mask(ts.kinds) & (np.arange(len(ts)) > 0)
    delta = (after - before)[trained].sum()
    assert np.sign(delta) == np.sign(reward), delta
    # prompt tokens are not rewarded: the mean change there is far smaller than on trained tokens
    assert abs(delta) > 1.0


def test_single_agent_shares_parameters_and_step_is_traced_once():
    model = _model(0)
    rows = {"planner": 1, "reflector": 1}
    learner = train.Learner({"planner": model, "reflector": model}, optimizer=OPT, rows=rows)
    assert learner.names == ("shared",)
    train.TRACES.clear()
    b = _batch({"planner": model, "reflector": model}, rows)
    for _ in range(3):
        learner.step(b)
    assert train.TRACES["train_step"] == 1
    assert learner.step_count == 3


def test_memory_settings_give_the_same_step_and_leave_the_models_alone():
    """Chunked head + blockwise attention + full remat in the step = the plain step (loss, metrics and
    updated parameters); the models keep their own attention / remat options."""
    rows = {"planner": 2, "reflector": 1}
    results = []
    for kw in (dict(head_chunk=0), dict(head_chunk=7, memory=dict(attention="blockwise", attention_block=16,
                                                                   remat="full")),
               dict(head_chunk=7, memory=dict(remat="layer"))):
        models = {"planner": _model(0), "reflector": _model(1)}
        apply_lora(models["reflector"], LoRAConfig(rank=4, alpha=8, dropout=0.1), nnx.Rngs(params=1, dropout=2))
        learner = train.Learner(models, optimizer=OPT, rows=rows, **kw)
        m = train.check_finite(learner.step(_batch(models, rows)), 0)
        learner.sync_models()
        assert all(mod.cfg.attention == "default" and mod.cfg.remat == "none" for mod in models.values())
        results.append((m, {r: nnx.state(models[r], nnx.Param) for r in models}))
    (m0, p0), *rest = results
    for m1, p1 in rest:
        for k in m0:
            assert m1[k] == pytest.approx(m0[k], abs=1e-5), k
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), p0, p1)


def test_lora_trains_only_adapters():
    model = _model(0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0), nnx.Rngs(params=1, dropout=2))
    base = copy.deepcopy(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    lora0 = copy.deepcopy(nnx.state(model, nnx.LoRAParam))
    rows = {"planner": 1}
    learner = train.Learner({"planner": model}, optimizer=OPT, rows=rows)
    learner.step(_batch({"planner": model}, rows))
    learner.sync_models()
    jax.tree.map(np.testing.assert_array_equal, base,
                 nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                           lora0, nnx.state(model, nnx.LoRAParam)))
    assert any(changed)


def test_sharded_step_equals_single_device():
    from retroact_jax import sharding
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    rows = {"planner": 4, "reflector": 4}
    outs = []
    for mesh in (None, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        models = {"planner": _model(0), "reflector": _model(1)}
        b = _batch(models, rows)
        # SGD: the update is linear in the gradient, so equality is checked tightly (adam's
        # normalisation would magnify reduction-order noise in near-zero gradients)
        learner = train.Learner(models, optimizer=OPT, rows=rows, mesh=mesh)
        m = learner.step(b)
        m2 = learner.step(b)
        outs.append((float(m["loss"]), float(m2["loss"]),
                     jax.device_get(jax.tree.map(np.asarray, learner.state["params"]))))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
    assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), outs[0][2], outs[1][2])


def test_collate_step_layout_and_errors():
    models = {"planner": _model(0), "reflector": _model(1)}
    arrays, stats = train.collate_step({"planner": [_sample("planner", None, "il", with_beh=False)]},
                                       {"planner": 2, "reflector": 2}, buckets=(32, 64), pad_id=0)
    assert arrays["tokens_BxT"].shape == (4, 64)
    assert list(arrays["role_B"]) == [losses.ROLE_PLANNER] * 2 + [losses.ROLE_REFLECTOR] * 2
    assert not arrays["valid_BxT"][1:].any() and stats["reflector"]["rows"] == 0
    with pytest.raises(train.TrainError, match="reflector part"):
        train.collate_step({"reflector": [_sample("planner", None, "il", with_beh=False)]},
                           {"reflector": 1}, buckets=(64,), pad_id=0)
    with pytest.raises(train.TrainError, match="rows"):
        train.Learner({"planner": models["planner"]}, optimizer=OPT, rows={"reflector": 1})


def _collectives_in_loops(hlo: str) -> list[str]:
    """Collectives of compiled HLO text that sit in a while loop's body or condition (nested too)."""
    comps, name = {}, None
    for line in hlo.splitlines():
        if line.endswith("{") and not line.startswith(" "):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            comps[name] = []
        elif name:
            comps[name].append(line)
    calls = lambda ln: [c for c in re.findall(r"%([\w.\-]+)", ln) if c in comps]  # noqa: E731
    todo = [c for body in comps.values() for ln in body if " while(" in ln for c in calls(ln)]
    seen, found = set(), []
    while todo:
        c = todo.pop()
        if c in seen:
            continue
        seen.add(c)
        for ln in comps[c]:
            if re.search(r" (all-reduce|all-gather|collective-permute|reduce-scatter|all-to-all)\(", ln):
                found.append(f"{c}: {ln.strip()[:80]}")
            todo += calls(ln)
    return found


def test_fsdp_over_two_devices_of_one_process_keeps_collectives_out_of_loops():
    """Regression: mesh fsdp=2 over 2 CPU devices of one process deadlocked in the RL train step
    (XLA:CPU orders a loop before later collectives by scheduling only, so the 2 device threads
    met at different collectives): the chunked head's loop held an all-reduce of the logits. The
    step now unrolls the chunks there: no collective inside a loop, the same step as one device."""
    from retroact_jax import sharding
    if jax.device_count() < 2:
        pytest.skip("needs 2 (fake) devices")
    assert not sharding.loops_deadlock(None)
    assert not sharding.loops_deadlock(sharding.make_mesh({"fsdp": 1}, jax.devices()[:1]))
    rows = {"planner": 2, "reflector": 2}
    outs = []
    for mesh in (None, sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])):
        models = {"planner": _model(0), "reflector": _model(1)}
        for i, m in enumerate(models.values()):
            apply_lora(m, LoRAConfig(rank=4, alpha=8, dropout=0.0), nnx.Rngs(params=1 + i, dropout=2))
        b = _batch(models, rows)
        learner = train.Learner(models, optimizer=OPT, rows=rows, mesh=mesh, head_chunk=16)
        if mesh is not None:
            assert learner.unroll
            assert _collectives_in_loops(learner.lower(b).compile().as_text()) == []
        m = learner.step(b)
        outs.append((float(m["loss"]), jax.device_get(jax.tree.map(np.asarray, learner.state["params"]))))
    assert outs[1][0] == pytest.approx(outs[0][0], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), outs[0][1], outs[1][1])
