"""LoRA: identity at init, merge == adapted model, only adapters train, dropout, save/load, export."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from retroact_jax.models import lora
from retroact_jax.models import safetensors_io as sio
from retroact_jax.models.config import tiny
from retroact_jax.models.convert import to_hf_state_dict
from retroact_jax.models.decoder import Decoder, Linear

TOKENS = jnp.asarray([[1, 5, 7, 9, 11, 300], [3, 3, 8, 2, 100, 511]])


@nnx.jit
def _logits(model, tokens):      # jitted: far cheaper than op-by-op on the shared CPU
    return model(tokens)[0]


def _model(arch="llama", seed=0):
    return Decoder(tiny(arch), rngs=nnx.Rngs(seed))


def _randomise_b(model, seed=3):
    for i, m in enumerate(lora.lora_modules(model).values()):
        m.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(seed + i), m.lora_b[...].shape)


def test_config_validation():
    assert lora.LoRAConfig().scale == 2.0            # RetroAct: r=8, alpha=16
    with pytest.raises(lora.LoRAError, match="rank"):
        lora.LoRAConfig(rank=0)
    with pytest.raises(lora.LoRAError, match="target_modules"):
        lora.LoRAConfig(target_modules=("qproj",))
    with pytest.raises(lora.LoRAError, match="lm_head does not exist"):
        lora.apply_lora(_model(), lora.LoRAConfig(target_modules=("lm_head",)), nnx.Rngs(0))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fresh_adapter_is_identity_and_merge_matches(arch):
    model = _model(arch)
    base = _logits(model, TOKENS)
    lcfg = lora.LoRAConfig(rank=4, alpha=8, dropout=0.1,
                           target_modules=("q_proj", "v_proj", "down_proj"))
    assert lora.apply_lora(model, lcfg, nnx.Rngs(params=1, dropout=2)) == 3 * 2
    model.eval()
    fresh = _logits(model, TOKENS)
    np.testing.assert_array_equal(np.asarray(fresh), np.asarray(base))
    _randomise_b(model)
    adapted = _logits(model, TOKENS)
    assert float(jnp.abs(adapted - base).max()) > 0.1
    assert lora.merge_lora(model) == 6
    assert not lora.lora_modules(model) and not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    assert type(model.layers[0].self_attn.q_proj) is Linear
    merged = _logits(model, TOKENS)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=5e-5)


def test_dropout_only_in_train_mode():
    model = _model()
    lora.apply_lora(model, lora.LoRAConfig(dropout=0.5), nnx.Rngs(params=1, dropout=2))
    _randomise_b(model)
    model.eval()
    e1 = _logits(model, TOKENS)
    e2 = _logits(model, TOKENS)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    model.train()
    t1 = _logits(model, TOKENS)
    t2 = _logits(model, TOKENS)
    assert float(jnp.abs(t1 - t2).max()) > 1e-3 and float(jnp.abs(t1 - e1).max()) > 1e-3
    # Dropout only touches the adapter path: with B = 0 training output equals eval output.
    for m in lora.lora_modules(model).values():
        m.lora_b[...] = jnp.zeros_like(m.lora_b[...])
    t3 = _logits(model, TOKENS)
    model.eval()
    e3 = _logits(model, TOKENS)
    np.testing.assert_allclose(np.asarray(t3), np.asarray(e3), atol=1e-6)


def test_only_lora_params_get_gradients_and_update():
    model = _model()
    lora.apply_lora(model, lora.LoRAConfig(dropout=0.0), nnx.Rngs(params=1))
    _randomise_b(model)
    base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param,
                                                                    nnx.Not(nnx.LoRAParam))))

    def loss_fn(m):
        logits, _ = m(TOKENS)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 7])

    grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, lora.trainable_filter())))(model)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 2 * 2 * 2                  # (a, b) x (q, v) x 2 layers
    assert all(float(jnp.abs(g).max()) > 0 for g in leaves)
    assert len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == len(leaves)

    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
    before = nnx.jit(loss_fn)(model)
    opt.update(model, grads)
    assert float(nnx.jit(loss_fn)(model)) < float(before)
    base_after = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, base_after))


def test_save_load_adapters(tmp_path):
    model = _model()
    lcfg = lora.LoRAConfig(rank=2, alpha=5, target_modules=("k_proj", "o_proj", "up_proj"))
    lora.apply_lora(model, lcfg, nnx.Rngs(params=4, dropout=0))
    _randomise_b(model)
    model.eval()
    want = _logits(model, TOKENS)
    lora.save_lora(model, tmp_path / "ad", lcfg)
    assert lora.read_lora_config(tmp_path / "ad") == lcfg
    a = sio.LazyTensors([tmp_path / "ad" / lora.ADAPTER_WEIGHTS])
    assert a.shape("base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight") == (2, 64)
    assert a.shape("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight") == (128, 2)

    fresh = _model()
    assert lora.load_lora(fresh, tmp_path / "ad") == lcfg
    fresh.eval()
    got = _logits(fresh, TOKENS)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(lora.LoRAError, match="already has LoRA"):
        lora.load_lora(fresh, tmp_path / "ad")
    other = Decoder(tiny(num_kv_heads=4), rngs=nnx.Rngs(0))   # k_proj is wider there
    with pytest.raises(lora.LoRAError, match="k_proj.lora_B.weight.*shape"):
        lora.load_lora(other, tmp_path / "ad")


def test_merged_export_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = tiny("qwen2")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoRAConfig(), nnx.Rngs(params=1, dropout=2))
    _randomise_b(model)
    model.eval()
    adapted = _logits(model, TOKENS)
    with pytest.raises(sio.CheckpointError, match="merge LoRA"):   # NNX paths leak otherwise
        sio.write_hf_dir(tmp_path / "bad", cfg, {**to_hf_state_dict(model), "x.lora_a": np.zeros(1)})
    lora.merge_lora(model)
    sio.write_hf_dir(tmp_path / "out", cfg, to_hf_state_dict(model))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    np.testing.assert_allclose(ref, np.asarray(adapted), atol=1e-4)
