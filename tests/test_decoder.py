"""The NNX decoder against transformers' PyTorch Llama / Qwen2 (float32, CPU), conversion both ways,
and the KV cache (prefill + extend with holes == one full forward)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from retroact_jax.models import convert
from retroact_jax.models.config import ModelConfig, tiny
from retroact_jax.models.decoder import (Decoder, KVCache, forward_fn, positions_after,
                                         positions_from_mask)

V = 256
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
             max_position_embeddings=512)


def _hf_configs():
    return {
        "llama2": transformers.LlamaConfig(
            **SMALL, tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "llama3": transformers.LlamaConfig(
            **SMALL, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16}),
        "qwen2": transformers.Qwen2Config(
            **SMALL, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"],
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    }


def _hf_model(name):
    torch.manual_seed({"llama2": 0, "llama3": 1, "qwen2": 2}[name])
    hc = _hf_configs()[name]
    cls = transformers.Qwen2ForCausalLM if name == "qwen2" else transformers.LlamaForCausalLM
    m = cls(hc).eval()
    with torch.no_grad():                      # random biases and norm scales, so both are tested
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m, ModelConfig.from_hf(hc.to_dict())


def _batch(rng, lengths, t):
    tokens = np.zeros((len(lengths), t), np.int32)
    valid = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        tokens[i, t - n:] = rng.integers(3, V, n)
        valid[i, t - n:] = True
    return tokens, valid


def _torch_logits(m, tokens, valid):
    mask = torch.tensor(valid.astype(np.int64))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return m(input_ids=torch.tensor(tokens.astype(np.int64)), attention_mask=mask,
                 position_ids=pos).logits.numpy()


@pytest.mark.parametrize("name", ["llama2", "llama3", "qwen2"])
def test_logits_match_transformers_and_round_trip(name):
    hf, cfg = _hf_model(name)
    assert cfg.arch == ("qwen2" if name == "qwen2" else "llama")
    assert cfg.attention_bias == (name == "qwen2")
    model = convert.load_model(cfg, hf.state_dict())
    tokens, valid = _batch(np.random.default_rng(0), [40, 7, 23, 1], 40)
    ref = _torch_logits(hf, tokens, valid)
    ours, _ = jax.jit(forward_fn, static_argnums=(0, 6))(
        *nnx.split(model), tokens, positions_from_mask(jnp.asarray(valid)), valid, None, False)
    ours = np.asarray(ours)
    diff = np.abs(ours - ref)[valid].max()
    assert diff <= 1e-5, diff
    assert (ours.argmax(-1) == ref.argmax(-1))[valid].all()
    # last_only gives the last position's logits
    last, _ = model(jnp.asarray(tokens), positions_from_mask(jnp.asarray(valid)), valid,
                    last_only=True)
    np.testing.assert_allclose(np.asarray(last), ours[:, -1], atol=1e-5)

    # round trip: NNX -> HF state dict -> a fresh torch model gives the same logits
    sd = convert.to_hf_state_dict(model)
    hf2 = type(hf)(hf.config).eval()
    missing, unexpected = hf2.load_state_dict({k: torch.tensor(v) for k, v in sd.items()},
                                              strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"} and (not missing or cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        hf2.tie_weights()
    np.testing.assert_allclose(_torch_logits(hf2, tokens, valid)[valid], ref[valid], atol=1e-6)


def test_prefill_then_extend_with_holes_equals_full_forward():
    cfg = tiny("qwen2")
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    tokens, valid = _batch(np.random.default_rng(1), [30, 12, 21], 30)
    full, _ = model(jnp.asarray(tokens), positions_from_mask(jnp.asarray(valid)), valid)
    full = np.asarray(full)

    cache = KVCache.init(cfg, 3, 64)
    step = jax.jit(forward_fn, static_argnums=(0, 6))
    g, s = nnx.split(model)
    got = np.zeros_like(full)
    # prefill the first 10 columns, then chunks; each chunk is re-left-padded (holes in the cache)
    for lo, hi, pad in [(0, 10, 0), (10, 17, 3), (17, 18, 0), (18, 30, 4)]:
        t_tok = np.zeros((3, pad + hi - lo), np.int32)
        t_val = np.zeros((3, pad + hi - lo), bool)
        t_tok[:, pad:], t_val[:, pad:] = tokens[:, lo:hi], valid[:, lo:hi]
        # move each row's valid tokens to the right end (left padding inside the chunk)
        for b in range(3):
            k = t_val[b].sum()
            tt, vv = t_tok[b][t_val[b]], np.ones(k, bool)
            t_tok[b], t_val[b] = 0, False
            if k:
                t_tok[b, -k:], t_val[b, -k:] = tt, vv
        pos = positions_after(cache, jnp.asarray(t_val))
        logits, cache = step(g, s, t_tok, pos, t_val, cache, False)
        logits = np.asarray(logits)
        for b in range(3):
            k = t_val[b].sum()
            cols = np.nonzero(valid[b, lo:hi])[0] + lo
            got[b, cols] = logits[b, -k:] if k else got[b, cols]
    assert int(cache.end) == 10 + 10 + 1 + 16
    assert np.asarray(cache.lengths()).tolist() == valid.sum(1).tolist()
    np.testing.assert_allclose(got[valid], full[valid], atol=1e-5)


def test_load_model_errors_name_the_tensor():
    hf, cfg = _hf_model("llama3")
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    bad = dict(sd)
    del bad["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(convert.CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        convert.load_model(cfg, bad)
    bad = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((3, 64), np.float32)})
    with pytest.raises(convert.CheckpointError, match="k_proj.weight.*shape"):
        convert.load_model(cfg, bad)
    bad = dict(sd, **{"model.layers.5.mlp.up_proj.weight": sd["model.layers.1.mlp.up_proj.weight"]})
    with pytest.raises(convert.CheckpointError, match="layers.5"):
        convert.load_model(cfg, bad)


def test_load_model_places_with_shardings():
    from jax.sharding import NamedSharding, PartitionSpec as P
    hf, cfg = _hf_model("llama2")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("fsdp",))
    shard = {"layers.0.mlp.up_proj.kernel": NamedSharding(mesh, P(None, "fsdp"))}
    model = convert.load_model(cfg, hf.state_dict(), shardings=shard)
    assert model.layers[0].mlp.up_proj.kernel[...].sharding == shard["layers.0.mlp.up_proj.kernel"]


def test_abstract_allocates_nothing_and_lora_hook():
    cfg = tiny()
    a = Decoder.abstract(cfg)
    assert isinstance(a.layers[1].mlp.down_proj.kernel.get_value(), jax.ShapeDtypeStruct)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(8, dtype=jnp.int32)[None]
    base, _ = model(tokens)
    lin = model.layers[0].self_attn.q_proj
    lin.lora_a = nnx.LoRAParam(jnp.ones((64, 2)) * 0.1)
    lin.lora_b = nnx.LoRAParam(jnp.zeros((2, 64)))
    same, _ = model(tokens)
    np.testing.assert_allclose(np.asarray(same), np.asarray(base), atol=1e-6)
    lin.lora_b = nnx.LoRAParam(jnp.ones((2, 64)) * 0.1)
    lin.lora_scale = 2.0
    changed, _ = model(tokens)
    assert np.abs(np.asarray(changed) - np.asarray(base)).max() > 1e-3


@pytest.mark.parametrize("b", [1, 3])
def test_one_query_attention_paths_agree(b):
    """The decode step's two attention forms (dots for batch 1, broadcast-reduce otherwise) are
    the same function, holes in the cache included."""
    from retroact_jax.models import attention as dec
    rng = np.random.default_rng(b)
    q = jnp.asarray(rng.standard_normal((b, 1, 2, 3, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, 40, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, 40, 2, 16)), jnp.float32)
    mask = jnp.asarray(rng.random((b, 1, 40)) < 0.6).at[:, :, 0].set(True)
    a = dec._attend_one_dots(q, k, v, mask)
    r = dec._attend_one_reduce(q, k, v, mask)
    assert a.shape == r.shape == (b, 1, 2 * 3 * 16)
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5)
    ref = _np_attention(np.asarray(q), np.asarray(k), np.asarray(v), np.asarray(mask))
    np.testing.assert_allclose(np.asarray(a), ref, atol=1e-5)


def _np_attention(q_BxTxKxGxH, k, v, mask_BxTxS):
    """numpy reference: softmax over the visible keys of each query."""
    s = np.einsum("btkgh,bskh->btkgs", q_BxTxKxGxH, k)
    s = np.where(mask_BxTxS[:, :, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    b, t = q_BxTxKxGxH.shape[:2]
    return np.einsum("btkgs,bskh->btkgh", p, v).reshape(b, t, -1)


@pytest.mark.parametrize("b,t,s_len,end,block", [(1, 1, 64, 0, 16), (1, 1, 64, 37, 16), (3, 1, 64, 63, 16),
                                                 (3, 1, 40, 20, 512), (2, 7, 64, 20, 16),
                                                 (2, 16, 64, 48, 16), (1, 5, 48, 9, 32)])
def test_cache_attention_reads_only_the_blocks_up_to_the_cursor(b, t, s_len, end, block):
    """``attend_prefix`` (T > 1) and ``attend_one_prefix`` (a decode step) equal a softmax over the
    visible keys (numpy), holes included, and never read a key block past the one holding the last
    query's slot: NaN written there changes nothing."""
    from retroact_jax.models import attention as att
    rng = np.random.default_rng(b * 100 + t + end)
    q = rng.standard_normal((b, t, 2, 3, 16)).astype(np.float32)
    k = rng.standard_normal((b, s_len, 2, 16)).astype(np.float32)
    v = rng.standard_normal((b, s_len, 2, 16)).astype(np.float32)
    valid = rng.random((b, s_len)) < 0.7
    valid[:, end:end + t] = True                       # each query sees at least itself
    valid[:, end + t:] = False
    bk = att.key_block(s_len, block)
    past = -(-(end + t) // bk) * bk
    k[:, past:], v[:, past:] = np.nan, np.nan          # blocks past the cursor's: never read
    qslot = jnp.arange(end, end + t, dtype=jnp.int32)
    mask = att.Mask(qslot_T=qslot, kvalid_BxS=jnp.asarray(valid))
    full = np.asarray(mask.full())
    ref = _np_attention(q, np.nan_to_num(k), np.nan_to_num(v), full)
    if t == 1:
        out = jax.jit(att.attend_one_prefix, static_argnums=5)(q, k, v, qslot, mask.kvalid_BxS, block)
    else:
        out = jax.jit(att.attend_prefix, static_argnums=5)(q, k, v, qslot, mask.kvalid_BxS, block)
    out = np.asarray(out)
    assert out.shape == (b, t, 2 * 3 * 16) and np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=2e-5)
    # the decoder's dispatch picks them for a cache (and not for dot_product)
    got = att.attend_cached("default", jnp.asarray(q), jnp.asarray(np.nan_to_num(k)),
                            jnp.asarray(np.nan_to_num(v)), mask, block=block)
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5)


def test_key_block_divides_the_cache_or_is_the_whole_cache():
    from retroact_jax.models.attention import key_block
    assert key_block(4096, 512) == 512 and key_block(4096, 256) == 256 and key_block(40, 512) == 40
    assert key_block(1536, 512) == 512 and key_block(1000, 512) == 500 and key_block(1031, 512) == 1031
