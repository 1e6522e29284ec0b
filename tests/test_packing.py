"""Packed rows (packing.py, batching.collate, segment masks in models/attention.py): several IL samples
in one row give the loss and the gradients of the same samples unpacked, with every attention
implementation, full fine-tuning and LoRA; the epoch plan covers every row once; the IL stage packs,
resumes the same packed rows, and refuses packing under the ``positions`` normalisation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retroact_jax import batching, losses, packing, train
from retroact_jax.models.config import tiny
from retroact_jax.models.decoder import Decoder, set_memory_options
from retroact_jax.models.lora import LoRAConfig, apply_lora


def _samples(n=5, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(4, 13))
        kinds = np.full(L, batching.KIND_GENERATED, np.int8)
        kinds[: int(rng.integers(1, L - 1))] = batching.KIND_PROMPT
        kinds[L // 2] = batching.KIND_OBSERVATION
        s = batching.Sample("planner", (("prompt", "p"), ("generated", "g")), metadata={"i": i})
        ids = rng.integers(3, 512, L).astype(np.int32)
        out.append(batching.TokenizedSample(s, ids, kinds, np.zeros(L, np.float32), np.zeros(L, bool)))
    return out


def _model(lora: bool):
    model = Decoder(tiny(num_layers=2), rngs=nnx.Rngs(0))
    if lora:   # dropout 0: packed and unpacked rows draw different masks
        apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0), nnx.Rngs(params=1, dropout=2))
        for lin in (model.layers[0].self_attn.q_proj, model.layers[1].self_attn.v_proj):
            lin.lora_b[...] = 0.05 * jnp.ones_like(lin.lora_b[...])   # adapters that matter
    return model


def _loss_and_grads(impl: str, lora: bool, rows, batch_size: int, buckets):
    model = set_memory_options(_model(lora), attention=impl, attention_block=8)
    learner = train.Learner({"planner": model}, optimizer={"name": "sgd", "learning_rate": 0.0},
                            loss=losses.LossConfig(il_normalization="tokens"), rows={"planner": batch_size},
                            head_chunk=16)
    arrays, _ = train.collate_step({"planner": rows}, {"planner": batch_size}, buckets, 0)
    batch = {k: jnp.asarray(v) for k, v in arrays.items() if k in train._STEP_KEYS}
    st = learner.state

    def loss_fn(params):
        logp, ent, _ = learner._logp(params, st["rngs"], learner._frozen, batch)
        return losses.joint_loss(logp, ent, batch, learner.loss_cfg)

    (loss, m), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(st["params"])
    return float(loss), int(m["tokens_il_planner"]), g


@pytest.mark.parametrize("impl", ["default", "dot_product", "blockwise"])
@pytest.mark.parametrize("lora", [False, True])
def test_packed_rows_give_the_loss_and_gradients_of_unpacked_rows(impl, lora):
    s = _samples()
    # unpacked: one sample per row; packed: two rows of 3 + 2 samples (segments cross blocks of 8)
    ref_loss, ref_n, ref_g = _loss_and_grads(impl, lora, [[x] for x in s], len(s), (16,))
    loss, n, g = _loss_and_grads(impl, lora, [s[:3], s[3:]], 2, (48,))
    assert n == ref_n > 0
    assert abs(loss - ref_loss) <= 1e-5
    for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(g)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)
    # a mask that let segments see each other would change the loss: the test can fail
    model_loss_mixed = _mixed_loss(impl, s)
    assert abs(model_loss_mixed - ref_loss) > 1e-4


def _mixed_loss(impl, s):
    """The packed rows with one segment id for the whole row (no segment mask): not the same loss."""
    model = set_memory_options(_model(False), attention=impl, attention_block=8)
    b = batching.collate([s[:3], s[3:]], (48,), 0)
    seg = np.where(b.valid_BxT, 1, 0).astype(np.int32)
    h, _ = model.hidden(jnp.asarray(b.tokens_BxT), jnp.asarray(b.positions_BxT), jnp.asarray(b.valid_BxT),
                        segments_BxT=jnp.asarray(seg))
    lp, ent = losses.head_logprobs_and_entropy(model.head, h[:, :-1], jnp.asarray(b.tokens_BxT), 0)
    arrays = {k: jnp.asarray(v) for k, v in b.arrays().items()}
    return float(losses.joint_loss(lp, ent, arrays, losses.LossConfig(il_normalization="tokens"))[0])


def test_collate_packs_segments_with_positions_from_zero():
    s = _samples(3)
    b = batching.collate([s], (64,), 0)
    L = [len(x) for x in s]
    assert b.n_rows == 1 and b.n_samples == 3 and b.lengths_B.tolist() == [sum(L)]
    starts = np.cumsum([0] + L[:-1])
    for j, (a, n) in enumerate(zip(starts, L)):
        assert b.positions_BxT[0, a:a + n].tolist() == list(range(n))
        assert (b.segments_BxT[0, a:a + n] == j + 1).all()
        assert not b.loss_mask_BxT[0, a]            # a segment's first token is never trained
        np.testing.assert_array_equal(b.tokens_BxT[0, a:a + n], s[j].ids)
    assert (b.segments_BxT[0, sum(L):] == 0).all()
    with pytest.raises(batching.SampleError, match="packed row"):
        batching.collate([s], (16,), 0)             # does not fit max_len


def test_pack_epoch_covers_every_row_once_within_capacity():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 900, 300)
    lengths[:3] = 1500                              # longer than the capacity: a row of its own
    for epoch in range(3):
        groups = packing.pack_epoch(lengths, 1024, seed=7, epoch=epoch)
        flat = np.concatenate(groups)
        assert sorted(flat.tolist()) == list(range(300))
        assert all(lengths[g].sum() <= 1024 or len(g) == 1 for g in groups)
        assert len(groups) < 0.7 * 300              # packing actually packs
        again = packing.pack_epoch(lengths, 1024, seed=7, epoch=epoch)
        assert all((a == b).all() for a, b in zip(groups, again))
    assert [len(s) for s in packing.steps_of(groups, 4)][:-1] == [4] * (len(groups) // 4 - (len(groups) % 4 == 0))


def test_the_il_stage_refuses_packing_under_positions_normalisation():
    from retroact_jax.stages import il
    from retroact_jax.stages.setup import StageError
    c = il.default_config()
    assert not c.train.pack and il.pack_capacity(c, (256, 2048)) == 0   # off by default
    c.train.pack = True
    assert il.pack_capacity(c, (256, 2048)) == 2048
    c.loss.il_normalization = "positions"
    with pytest.raises(StageError, match="train.pack=True needs loss.il_normalization='tokens'"):
        il.pack_capacity(c, (256, 2048))
    c.train.pack = False
    assert il.pack_capacity(c, (256, 2048)) == 0
    c.train.pack, c.loss.il_normalization, c.train.pack_len = True, "tokens", 4096
    with pytest.raises(StageError, match="pack_len"):
        il.pack_capacity(c, (256, 2048))


def test_role_batches_see_every_row_exactly_once_per_epoch_packed():
    from retroact_jax.stages.il import RoleBatches
    lengths = list(np.random.default_rng(3).integers(5, 60, 41))
    it = RoleBatches(lengths, 2, seed=0, role_index=1, epochs=3, capacity=128)
    seen = np.zeros(41, int)
    for _ in range(it.total):
        for g in it.next():
            assert sum(lengths[j] for j in g) <= 128
            seen[g] += 1
    assert (seen == 3).all() and it.next() == []
