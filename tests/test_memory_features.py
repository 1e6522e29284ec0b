"""Memory options of the decoder (models/attention.py, ModelConfig.attention / remat): every attention
form and every remat policy gives today's loss and gradients (float32, left-padded rows, LoRA dropout
on), the KV-cache extension agrees, and the blockwise form's compiled temp memory stays far below
the full scores' size on a long sequence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retroact_jax.models import attention
from retroact_jax.models.config import ConfigError, tiny
from retroact_jax.models.decoder import (Decoder, KVCache, positions_after, positions_from_mask,
                                         set_memory_options)
from retroact_jax.models.lora import LoRAConfig, apply_lora

OPTIONS = [("dot_product", "none"), ("blockwise", "none"), ("default", "dots"), ("default", "full"),
           ("blockwise", "full"), ("dot_product", "dots"), ("default", "layer"), ("blockwise", "layer")]


def _batch(seed=0, lengths=(29, 11, 1, 20), t=29):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), t), np.int32)
    valid = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        tokens[i, t - n:] = rng.integers(3, 512, n)
        valid[i, t - n:] = True
    return jnp.asarray(tokens), jnp.asarray(valid)


def _model(lora: bool):
    model = Decoder(tiny(num_layers=2), rngs=nnx.Rngs(0))
    if lora:
        apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1), nnx.Rngs(params=1, dropout=2))
        for lin in (model.layers[0].self_attn.q_proj, model.layers[1].self_attn.v_proj):
            lin.lora_b[...] = 0.05 * jnp.ones_like(lin.lora_b[...])   # adapters that matter
    model.train()
    return model


def _loss_and_grads(model, tokens, valid, wrt):
    def loss_fn(m):
        h, _ = m.hidden(tokens, positions_from_mask(valid), valid)
        lp = jax.nn.log_softmax(m.head(h[:, :-1]), axis=-1)
        lp = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
        w = (valid[:, 1:] & valid[:, :-1]).astype(jnp.float32)
        return -jnp.sum(lp * w) / jnp.sum(w)
    return nnx.jit(lambda m: nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(m))(model)


@pytest.mark.parametrize("impl,remat", OPTIONS)
@pytest.mark.parametrize("lora", [False, True])
def test_loss_and_gradients_match_the_default_path(impl, remat, lora):
    tokens, valid = _batch()
    wrt = nnx.LoRAParam if lora else nnx.Param
    ref_loss, ref_g = _loss_and_grads(_model(lora), tokens, valid, wrt)
    model = set_memory_options(_model(lora), attention=impl, remat=remat, attention_block=8)
    loss, g = _loss_and_grads(model, tokens, valid, wrt)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5
    flat_ref, flat = jax.tree.leaves(ref_g), jax.tree.leaves(g)
    assert len(flat) == len(flat_ref) > 0
    for a, b in zip(flat, flat_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["dot_product", "blockwise"])
def test_cache_prefill_and_extension_match_the_default_path(impl):
    """Prefill 13 tokens, then extend by 9 with holes: logits at valid positions as ``default``."""
    tokens, valid = _batch(1, lengths=(22, 15, 6), t=22)
    valid = valid.at[1, 16].set(False)                  # a hole inside a row
    outs = {}
    for name in ("default", impl):
        model = set_memory_options(Decoder(tiny(), rngs=nnx.Rngs(3)), attention=name,
                                   attention_block=4)
        cache = KVCache.init(model.cfg, 3, 32)
        logits = []
        for a, b in ((0, 13), (13, 22)):
            tk, vd = tokens[:, a:b], valid[:, a:b]
            lg, cache = model(tk, positions_after(cache, vd), vd, cache=cache)
            logits.append(lg)
        one, cache = model(tokens[:, :1] * 0 + 5, positions_after(cache, valid[:, :1] | True),
                           valid[:, :1] | True, cache=cache)       # a decode step (T = 1)
        outs[name] = (np.asarray(jnp.concatenate(logits, axis=1)), np.asarray(one))
    m = np.asarray(valid)
    np.testing.assert_allclose(outs[impl][0][m], outs["default"][0][m], atol=1e-5)
    np.testing.assert_allclose(outs[impl][1], outs["default"][1], atol=1e-5)


def _attn_temp_bytes(impl: str, t: int, heads=(2, 2), h=16) -> int:
    """Compiled temp bytes of forward + backward of one attention call at sequence length t."""
    nk, g = heads
    sds = jax.ShapeDtypeStruct

    def f(q, k, v, valid):
        mask = attention.Mask(qslot_T=jnp.arange(t, dtype=jnp.int32), kvalid_BxS=valid)
        return jnp.sum(attention.attend(impl, q, k, v, mask, block=512) ** 2)

    args = (sds((1, t, nk, g, h), jnp.float32), sds((1, t, nk, h), jnp.float32),
            sds((1, t, nk, h), jnp.float32), sds((1, t), jnp.bool_))
    compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_blockwise_never_materialises_the_scores():
    """T = 16384, 4 query heads: the float32 scores alone are 4 GiB. Budget 256 MiB: the blockwise
    form's compiled forward + backward fits it, the default form's needs more than the scores."""
    t, budget = 16384, 256 << 20
    scores = t * t * 4 * 4
    blockwise = _attn_temp_bytes("blockwise", t)
    assert blockwise < budget, (blockwise, budget)
    assert _attn_temp_bytes("default", t) >= scores


def test_blockwise_long_sequence_matches_default_numerically():
    """A sequence of several blocks in both dimensions, uneven last block, left padding."""
    rng = np.random.default_rng(0)
    t, nk, g, h = 700, 2, 2, 16
    q = jnp.asarray(rng.standard_normal((2, t, nk, g, h)) / 4, jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, t, nk, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, t, nk, h)), jnp.float32)
    valid = jnp.asarray(np.arange(t)[None, :] >= np.array([[0], [123]]))
    mask = attention.Mask(qslot_T=jnp.arange(t, dtype=jnp.int32), kvalid_BxS=valid)
    w = jnp.asarray(rng.standard_normal((2, t, nk * g * h)), jnp.float32) * valid[:, :, None]

    def loss(impl, q, k, v):
        return jnp.sum(attention.attend(impl, q, k, v, mask, block=128) * w)
    ref = jax.value_and_grad(lambda *a: loss("default", *a), argnums=(0, 1, 2))(q, k, v)
    got = jax.value_and_grad(lambda *a: loss("blockwise", *a), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-5)
    for a, b in zip(got[1], ref[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_dot_product_backend_choice_and_bad_options():
    assert attention.dot_product_backend(jnp.float32) == "xla"            # CPU here, or float32
    with pytest.raises(ConfigError, match="attention"):
        tiny(attention="flash")
    with pytest.raises(ConfigError, match="remat"):
        tiny(remat="some")
    with pytest.raises(ValueError, match="unknown options"):
        set_memory_options(Decoder.abstract(tiny()), attn="blockwise")


def test_sampler_and_learner_share_the_placed_base_weights():
    """With a mesh, the Learner places the frozen base once and the models take it: a sampler's
    state split from the model afterwards holds the very same arrays (one copy on the devices)."""
    from retroact_jax import sampling, sharding, train
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    model = _model(lora=True)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    learner = train.Learner({"planner": model}, optimizer={"name": "sgd", "learning_rate": 0.1},
                            rows={"planner": 1}, mesh=mesh)
    placed = learner._frozen["planner"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]
    assert placed.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    model.eval()
    sampler = sampling.Sampler(model, pad_id=0, eos_ids=(2,))
    assert sampler.params["layers"][0]["mlp"]["up_proj"]["kernel"][...] is placed
    assert model.layers[0].mlp.up_proj.kernel[...] is placed
    state, out = sampler.sample([[5, 6, 7]] * 4, max_new_tokens=3)   # runs on the sharded weights
    assert out.lengths_B.tolist() == [3] * 4
    # the cache was created sharded like the weights' mesh: rows over fsdp, KV heads over tensor
    k = state.cache.k[0]
    assert k.sharding.shard_shape(k.shape) == (1, k.shape[1], 1, k.shape[3])


def test_stage_config_options_reach_the_models():
    from retroact_jax import benchmarks
    from retroact_jax.stages import methods, pipeline, setup
    from experiments.configs import paper_7b
    models, _, _ = setup.load_models("tiny-random", memory={"attention": "blockwise", "remat": "full"})
    assert {(m.cfg.attention, m.cfg.remat) for m in models.values()} == {("blockwise", "full")}
    c = paper_7b.get_config("alfworld,/models/Llama-2-7b-chat-hf")
    rl = pipeline.stage_config(c, "rl", methods.get(c.method))     # the RL stage's derived config
    assert (rl.model.planner, rl.model.param_dtype, rl.model.remat) == (
        "/models/Llama-2-7b-chat-hf", "bfloat16", "full")
    assert (c.split or benchmarks.get(c.env).eval_split) == "valid_unseen"
    assert c.rl.collect.trials == c.eval.trials == 10
    with pytest.raises(ValueError, match="env"):
        paper_7b.get_config("atari")
