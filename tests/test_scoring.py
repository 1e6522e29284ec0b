"""The scoring pass (behaviour log-probs) against transformers' PyTorch log-softmax."""
import numpy as np
import pytest
import torch
import transformers

from retroact_jax import scoring
from retroact_jax.models import convert
from retroact_jax.models.config import ModelConfig


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hc = transformers.Qwen2Config(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
        tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    hf = transformers.Qwen2ForCausalLM(hc).eval()
    return hf, convert.load_model(ModelConfig.from_hf(hc.to_dict()), hf.state_dict())


def _reference(hf, seq):
    """log p(seq[t] | seq[:t]) for one unpadded sequence; 0 for the first token."""
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([seq])).logits[0].double()
    lp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    return np.concatenate([[0.0], lp.numpy()])


def test_left_right_padded_and_holed_rows_match_transformers(pair):
    hf, model = pair
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 384, n).tolist() for n in (30, 9, 17)]
    t = 36
    tokens = np.full((4, t), 5, np.int32)          # padding ids are arbitrary: masked out
    valid = np.zeros((4, t), bool)
    tokens[0, t - 30:], valid[0, t - 30:] = seqs[0], True          # left-padded
    tokens[1, :9], valid[1, :9] = seqs[1], True                    # right-padded
    cols = np.sort(rng.choice(t, 17, replace=False))               # holes anywhere
    tokens[2, cols], valid[2, cols] = seqs[2], True
    # row 3: all padding
    scorer = scoring.Scorer(model, chunk=16)
    logp = scorer(tokens, valid)
    assert logp.shape == (4, t) and logp.dtype == np.float32
    np.testing.assert_allclose(logp[0, t - 30:], _reference(hf, seqs[0]), atol=1e-5)
    np.testing.assert_allclose(logp[1, :9], _reference(hf, seqs[1]), atol=1e-5)
    np.testing.assert_allclose(logp[2, cols], _reference(hf, seqs[2]), atol=1e-5)
    assert (logp[~valid] == 0).all() and (logp[3] == 0).all()
    assert (logp[valid] < 0).sum() == 30 + 9 + 17 - 3      # all but each row's first token

    # chunked head == one chunk; no recompile for another batch within the same buckets
    np.testing.assert_allclose(scoring.Scorer(model, chunk=64)(tokens, valid), logp, atol=1e-6)
    before = dict(scoring.TRACE_COUNTS)
    scorer(tokens[:3, :33], valid[:3, :33])            # buckets 4 x 64 as before
    assert dict(scoring.TRACE_COUNTS) == before


def test_scorer_rejects_bad_input(pair):
    _, model = pair
    scorer = scoring.Scorer(model)
    with pytest.raises(scoring.ScoringError, match="outside"):
        scorer(np.array([[1, 999]]), np.ones((1, 2), bool))
    with pytest.raises(scoring.ScoringError, match="must be equal"):
        scorer(np.zeros((1, 3), np.int32), np.ones((1, 2), bool))


def test_the_vocabulary_head_is_never_materialised_whole():
    """The head runs chunk by chunk in a loop: XLA's temp for a batch whose [B, T, V] logits would
    be 64 MB stays under half of it (before, a Python loop over chunks let XLA schedule every chunk's
    logits at once: temp ~ B x T x V floats); the unrolled form (multi-device CPU meshes) agrees."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from retroact_jax.models import decoder
    cfg = ModelConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_position_embeddings=1024)
    model = decoder.Decoder(cfg, rngs=nnx.Rngs(0))
    gd, st = nnx.split(model)
    B, T = 4, 512
    args = (jax.ShapeDtypeStruct((B, T), np.int32), jax.ShapeDtypeStruct((B, T), bool))
    temp = scoring._score_jit.lower(gd, st, *args, 128, False).compile().memory_analysis().temp_size_in_bytes
    assert temp < 0.5 * B * T * cfg.vocab_size * 4, temp     # the rest is the [B, H, T, T] attention scores
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 8192, (2, 40)), jnp.int32)
    valid = jnp.ones((2, 40), bool)
    loop = scoring._score_jit(gd, st, tokens, valid, 16, False)
    unrolled = scoring._score_jit(gd, st, tokens, valid, 16, True)
    np.testing.assert_allclose(np.asarray(loop), np.asarray(unrolled), atol=1e-6)
