"""The embedded SmolLM2-135M-Instruct against transformers on PyTorch loading the same GGUF:
weights (our dequantisation + Q/K unpermutation), our exported HF directory, and logits of a
left-padded batch (NNX decoder)."""
import jax
import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.real_weights
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["The capital of France is",
           "Thought: I need to search Colorado orogeny.\nAction:",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def smol():
    from retroact_jax.models import embedded, gguf
    path = embedded.gguf_path()
    cfg, tensors = embedded.load_weights()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return cfg, tensors, hf, gguf.cache_dir_for(path) / "weights"


def test_config_and_weights_match_transformers_gguf_loader(smol):
    cfg, tensors, hf, _ = smol
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
        (30, 576, 9, 3, 64)
    assert cfg.rope_theta == 1e5 and cfg.rms_norm_eps == 1e-5 and cfg.tie_word_embeddings
    ref = hf.state_dict()
    for name in tensors:       # includes the unpermuted q_proj / k_proj of every layer
        np.testing.assert_allclose(tensors[name], ref[name].numpy(), atol=1e-6, err_msg=name)


def test_cached_export_loads_in_transformers(smol):
    _, _, hf, weights_dir = smol
    ours = transformers.AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)
    ref = hf.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, ref[name]), name


def test_left_padded_logits_match_transformers(smol):
    from retroact_jax.models.convert import load_model
    from retroact_jax.models.decoder import forward_fn, positions_from_mask
    from retroact_jax.models.embedded import load_tokenizer
    cfg, tensors, hf, _ = smol
    tok = load_tokenizer()
    rows = [tok.encode(p) for p in PROMPTS]
    t = max(map(len, rows))
    tokens = np.full((len(rows), t), tok.pad_id, np.int32)
    valid = np.zeros((len(rows), t), bool)
    for i, r in enumerate(rows):
        tokens[i, t - len(r):] = r
        valid[i, t - len(r):] = True
    assert len(set(map(len, rows))) == 3

    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(valid, dtype=torch.long),
                 position_ids=torch.tensor(positions)).logits.numpy()

    model = load_model(cfg, tensors)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(forward_fn, static_argnums=0)
    logits, _ = fwd(graphdef, state, tokens, positions_from_mask(valid), valid)
    logits = np.asarray(logits)
    diff = np.abs(logits - ref)[valid]
    print(f"SmolLM2 left-padded batch {tokens.shape}: max |logit diff| = {diff.max():.2e}")
    assert diff.max() <= 1e-3, diff.max()
    np.testing.assert_array_equal(logits.argmax(-1)[valid], ref.argmax(-1)[valid])


def test_load_pretrained_embedded(smol):
    from retroact_jax.models.hub import load_pretrained
    cfg, _, _, _ = smol
    model, tok, cfg2 = load_pretrained("embedded")
    assert cfg2 == cfg and tok.eos_ids == (2,) and tok.vocab_size == cfg.vocab_size
    ids = tok.encode("The capital of France is")
    logits, _ = model(np.asarray([ids]), last_only=True)
    assert tok.decode_token(int(np.argmax(logits[0]))) == " Paris"
