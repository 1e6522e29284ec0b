"""Checkpoint IO: safetensors directories both ways (vs transformers), GGUF import, load_pretrained."""
import json
import pathlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from retroact_jax.models import gguf as gguf_io
from retroact_jax.models import safetensors_io as sio
from retroact_jax.models.config import ConfigError, tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _random_tensors(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) * 0.1
            for k, s in sio.hf_param_shapes(cfg).items()}


# ------------------------------------------------------------------------------- safetensors dicts
@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])
def test_dict_round_trip_sharded(tmp_path, dtype):
    cfg = tiny("qwen2")
    tensors = _random_tensors(cfg)
    sio.write_hf_dir(tmp_path, cfg, tensors, dtype=dtype, max_shard_bytes=40_000)
    index = json.loads((tmp_path / sio.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg2, lazy = sio.read_hf_dir(tmp_path)
    assert cfg2 == cfg.replace(param_dtype=cfg2.param_dtype)
    assert set(lazy) == set(tensors)
    want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype or np.float32)
    for k, v in tensors.items():
        got = lazy[k]
        assert got.dtype == want and got.shape == v.shape
        np.testing.assert_array_equal(got, v.astype(want))


def test_lazy_reads_only_what_is_asked(tmp_path, monkeypatch):
    cfg = tiny()
    sio.write_hf_dir(tmp_path, cfg, _random_tensors(cfg))
    lazy = sio.LazyTensors(sio.safetensors_files(tmp_path))
    sizes = []
    real_open = open

    def spy(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if "b" in mode:
            orig = f.read
            f.read = lambda n=-1: (sizes.append(n), orig(n))[1]
        return f
    monkeypatch.setattr("builtins.open", spy)
    x = lazy["model.norm.weight"]
    assert x.shape == (cfg.hidden_size,) and sizes == [cfg.hidden_size * 4]


def test_clear_errors(tmp_path):
    cfg = tiny()
    tensors = _random_tensors(cfg)
    with pytest.raises(sio.CheckpointError, match="config.json is missing"):
        sio.read_hf_dir(tmp_path)
    d = sio.write_hf_dir(tmp_path / "ok", cfg, tensors)
    # missing tensor
    bad = dict(tensors)
    del bad["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(sio.CheckpointError, match="model.layers.1.mlp.up_proj.weight.*missing"):
        sio.write_hf_dir(tmp_path / "miss", cfg, bad)
    (tmp_path / "miss2").mkdir()
    (tmp_path / "miss2" / "config.json").write_text((d / "config.json").read_text())
    sio.write_safetensors(tmp_path / "miss2" / "model.safetensors", bad)
    with pytest.raises(sio.CheckpointError, match="up_proj.weight' is missing"):
        sio.read_hf_dir(tmp_path / "miss2")
    # shape mismatch
    bad = dict(tensors, **{"model.norm.weight": np.zeros(3, np.float32)})
    with pytest.raises(sio.CheckpointError, match=r"model.norm.weight.*\(3,\).*\(64,\)"):
        sio.write_hf_dir(tmp_path / "shape", cfg, bad)
    # stray (e.g. unmerged LoRA) tensors are not exported
    with pytest.raises(sio.CheckpointError, match="merge LoRA"):
        sio.write_hf_dir(tmp_path / "x", cfg, dict(tensors, **{"a.lora_A.weight": np.zeros(2)}))
    # truncated file: the message names the file
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(sio.CheckpointError, match=r"model\.safetensors.*truncated"):
        sio.read_hf_dir(d)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    with pytest.raises(sio.CheckpointError, match=r"model\.safetensors: corrupt"):
        sio.read_hf_dir(d)
    # unsupported architecture in config.json
    cfg_json = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg_json, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        sio.read_config(d)


# ------------------------------------------------------------------- transformers <-> ours <-> NNX
def _hf_model(arch, tie):
    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
              rope_theta=5e4, max_position_embeddings=128)
    c = (transformers.LlamaConfig(**kw) if arch == "llama" else transformers.Qwen2Config(**kw))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(c).eval()


@pytest.mark.parametrize("arch,tie,torch_dtype,shard", [
    ("llama", True, torch.float32, False), ("llama", False, torch.bfloat16, True),
    ("qwen2", False, torch.float32, True), ("qwen2", True, torch.bfloat16, False)])
def test_transformers_round_trip(tmp_path, arch, tie, torch_dtype, shard):
    from retroact_jax.models.convert import load_model, to_hf_state_dict
    hf = _hf_model(arch, tie).to(torch_dtype)
    hf.save_pretrained(tmp_path / "src", max_shard_size="20KB" if shard else "5GB")
    if shard:
        assert (tmp_path / "src" / sio.INDEX_FILE).is_file()
    hf = hf.float()
    tokens = torch.tensor([[1, 5, 9, 33, 70, 2], [4, 4, 8, 95, 0, 17]])
    with torch.no_grad():
        ref = hf(tokens).logits.numpy()

    cfg, lazy = sio.read_hf_dir(tmp_path / "src")
    assert cfg.arch == arch and cfg.tie_word_embeddings == tie and cfg.rope_theta == 5e4
    model = load_model(cfg, lazy)
    logits, _ = model(jnp.asarray(tokens.numpy()))
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-5)

    sio.write_hf_dir(tmp_path / "out", cfg, to_hf_state_dict(model),
                     dtype="bfloat16" if torch_dtype == torch.bfloat16 else None,
                     max_shard_bytes=30_000 if shard else sio.DEFAULT_MAX_SHARD_BYTES)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        out = back(tokens).logits.numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)   # bf16 source -> bf16 export is lossless
    # the lazy tensors the stages export with (one host copy at a time) write the same bytes
    from retroact_jax.models.convert import hf_tensors
    sio.write_hf_dir(tmp_path / "lazy", cfg, hf_tensors(model),
                     dtype="bfloat16" if torch_dtype == torch.bfloat16 else None,
                     max_shard_bytes=30_000 if shard else sio.DEFAULT_MAX_SHARD_BYTES)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "lazy").iterdir())
    for f in files:
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "lazy" / f).read_bytes(), f


# ------------------------------------------------------------------------------------------- GGUF
def _llamacpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows (written from its docs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _write_gguf(path, cfg, tensors, quant_2d=False):
    import gguf
    w = gguf.GGUFWriter(str(path), cfg.arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rev = {v: k for k, v in gguf_io._GLOBAL_NAMES.items()}
    for name, arr in tensors.items():
        if name in rev:
            g = rev[name]
        else:
            i, rest = name[len("model.layers."):].split(".", 1)
            g = f"blk.{i}." + {v: k for k, v in gguf_io._LAYER_NAMES.items()}[rest]
        if cfg.arch == "llama" and g.endswith("attn_q.weight"):
            arr = _llamacpp_permute(arr, cfg.num_heads)
        if cfg.arch == "llama" and g.endswith("attn_k.weight"):
            arr = _llamacpp_permute(arr, cfg.num_kv_heads)
        if quant_2d and arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_import_unpermutes_and_dequantises(tmp_path, arch):
    cfg = tiny(arch, head_dim=16, hidden_size=64, rms_norm_eps=1e-6, rope_theta=1e5)
    tensors = _random_tensors(cfg, seed=1)
    _write_gguf(tmp_path / "f32.gguf", cfg, tensors)
    cfg2, got = gguf_io.read_gguf(tmp_path / "f32.gguf")
    assert cfg2.replace(pad_token_id=0) == cfg
    assert set(got) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(got[k], tensors[k], err_msg=k)
    _write_gguf(tmp_path / "q8.gguf", cfg, tensors, quant_2d=True)
    _, got = gguf_io.read_gguf(tmp_path / "q8.gguf")
    for k in tensors:     # Q8_0: 8-bit blocks of 32 with an f16 scale
        np.testing.assert_allclose(got[k], tensors[k], atol=np.abs(tensors[k]).max() / 100, err_msg=k)


def test_gguf_cache_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("RETROACT_CACHE", str(tmp_path / "cache"))
    cfg = tiny()
    tensors = _random_tensors(cfg, seed=2)
    _write_gguf(tmp_path / "m.gguf", cfg, tensors)
    cfg1, lazy1, where = gguf_io.load_gguf(tmp_path / "m.gguf")
    assert where.parent == tmp_path / "cache" / "models" and (where / "weights" / "config.json").is_file()
    assert isinstance(lazy1, sio.LazyTensors)
    with monkeypatch.context() as m:
        m.setattr(gguf_io, "read_gguf", lambda p: pytest.fail("cache not used"))
        cfg2, lazy2, _ = gguf_io.load_gguf(tmp_path / "m.gguf")
    assert cfg2 == cfg1
    np.testing.assert_array_equal(lazy2["model.layers.1.self_attn.k_proj.weight"],
                                  tensors["model.layers.1.self_attn.k_proj.weight"])
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(gguf_io.GGUFError, match="junk.gguf"):
        gguf_io.read_gguf(tmp_path / "junk.gguf")
    with pytest.raises(gguf_io.GGUFError, match="not found"):
        gguf_io.read_gguf(tmp_path / "none.gguf")


# ---------------------------------------------------------------------------------- load_pretrained
def test_load_pretrained_hf_dir(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers
    from retroact_jax.models.hub import load_pretrained
    hf = _hf_model("llama", True)
    hf.save_pretrained(tmp_path)
    vocab = {f"w{i}": i for i in range(90)}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "w1", "eos_token": "w2", "pad_token": "w0"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    model, tok, cfg = load_pretrained(tmp_path)
    assert tok.encode("w5 w9", add_bos=True) == [1, 5, 9] and tok.eos_ids == (2, 7)
    logits, _ = model(jnp.asarray([[1, 5, 9]]))
    with torch.no_grad():
        ref = hf(torch.tensor([[1, 5, 9]])).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-5)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_pretrained(tmp_path / "nope")
