"""Test doubles: a byte tokenizer and a tiny random decoder (tests, smoke runs, wiring checks).

``model.planner = "tiny-random"`` gives a 2-layer random decoder over a 259-id byte vocabulary.
A trained tiny model exported by a stage is an HF directory like any other, with a marker file
(``MARKER``) saying that its tokenizer is the byte tokenizer, so later stages load it back.
"""
from __future__ import annotations

import json
import pathlib

from flax import nnx

from retroact_jax import tokenizer as tokenizer_lib

TINY_RANDOM = "tiny-random"
MARKER = "byte_tokenizer.json"


class ByteTokenizer(tokenizer_lib.Tokenizer):
    """UTF-8 bytes as ids 3..258 (0 pad, 1 bos, 2 eos): the tokenizer of the tiny random model.
    ``add_bos=True`` makes it a BOS family (as Llama-2's tokenizer), for tests of that path."""

    def __init__(self, add_bos: bool = False):
        self.bos_id, self.eos_ids, self.pad_id, self.add_bos = 1, (2,), 0, add_bos
        self.chat_template = self.bos_token = self.eos_token = None
        self.source = TINY_RANDOM

    @property
    def vocab_size(self) -> int:
        return 259

    def _encode_offsets(self, text):
        ids, offsets = [], []
        for i, ch in enumerate(text):
            for b in ch.encode("utf-8"):
                ids.append(3 + b)
                offsets.append((i, i + 1))
        return ids, offsets

    def decode(self, ids, skip_special=False):
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")

    def _piece_text(self, token_id):
        return "" if not 3 <= token_id < 259 else bytes([token_id - 3]).decode("utf-8", errors="replace")


def is_tiny(source: str) -> bool:
    """The random tiny model, or a directory a stage exported from one."""
    return str(source) == TINY_RANDOM or (pathlib.Path(str(source)) / MARKER).is_file()


def load_tiny(source: str, param_dtype: str = "float32", seed: int = 0):
    """(model, ByteTokenizer, ModelConfig): random from ``seed``, or the exported directory's weights."""
    from retroact_jax.models.config import tiny
    from retroact_jax.models.decoder import Decoder
    if str(source) == TINY_RANDOM:
        cfg = tiny(vocab_size=ByteTokenizer().vocab_size, param_dtype=param_dtype, dtype=param_dtype)
        return Decoder(cfg, rngs=nnx.Rngs(seed)), ByteTokenizer(), cfg
    from retroact_jax.models import convert, safetensors_io as sio
    cfg, tensors = sio.read_hf_dir(source)
    cfg = cfg.replace(param_dtype=param_dtype, dtype=param_dtype)
    return convert.load_model(cfg, tensors), ByteTokenizer(), cfg


def mark_export(hf_dir: str | pathlib.Path) -> None:
    """Label an exported directory of a tiny model (its tokenizer has no files)."""
    (pathlib.Path(hf_dir) / MARKER).write_text(json.dumps({"tokenizer": "bytes"}) + "\n")
