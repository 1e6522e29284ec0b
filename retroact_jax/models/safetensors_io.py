"""HF checkpoint directories in and out: config.json + safetensors (single file or sharded).

Reading is lazy: ``read_hf_dir(path)`` returns the ModelConfig and a ``LazyTensors`` Mapping that reads
one tensor from disk when it is indexed, so converting a 7B model needs the memory of the model plus
one tensor, not twice the model. The safetensors format (8-byte little-endian header length, a JSON
header ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian bytes) is parsed here
directly rather than through ``safetensors.numpy``, because that loader cannot represent bfloat16;
bf16/fp8 tensors come back as ``ml_dtypes`` arrays. Every file is checked on open (header parses,
offsets lie inside the file), so a truncated download fails naming the file and the tensor.

Writing: ``write_hf_dir(path, cfg, tensors)`` writes config.json (``ModelConfig.to_hf``), optional
generation_config.json, ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` when the tensors exceed ``max_shard_bytes``, and copies tokenizer
files. transformers' ``AutoModelForCausalLM.from_pretrained`` loads the result (tested).

Tensors are HF-named and in torch layout (``(out, in)`` for linear weights); see ``hf_param_shapes``.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from retroact_jax.models.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, corrupt or inconsistent; the message names it."""


# ----------------------------------------------------------------------------------------- reading
def _read_header(file: pathlib.Path) -> tuple[dict[str, Any], int]:
    """Parse one safetensors header; returns ({name: entry}, offset of the data section)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 1024**2:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file (header length {n}"
                                  f" but file has {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, e in header.items():
        try:
            dt = _DTYPES[e["dtype"]]
            b, end = e["data_offsets"]
            want = int(np.prod(e["shape"], dtype=np.int64)) * dt.itemsize
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has a malformed or unsupported header "
                                  f"entry {e!r}") from None
        if end - b != want:
            raise CheckpointError(f"{file}: tensor {name!r} spans {end - b} bytes, its shape "
                                  f"{e['shape']} and dtype {e['dtype']} need {want}")
        if data_start + end > size:
            raise CheckpointError(f"{file}: truncated: tensor {name!r} ends at byte "
                                  f"{data_start + end} but the file has {size} bytes")
    return header, data_start


class LazyTensors(Mapping[str, np.ndarray]):
    """Read-only ``{name: np.ndarray}`` over safetensors files; each access reads that tensor only."""

    def __init__(self, files: Iterable[str | os.PathLike]):
        self._where: dict[str, tuple[pathlib.Path, dict[str, Any], int]] = {}
        for file in files:
            file = pathlib.Path(file)
            if not file.is_file():
                raise CheckpointError(f"safetensors file missing: {file}")
            header, start = _read_header(file)
            for name, entry in header.items():
                if name in self._where:
                    raise CheckpointError(f"tensor {name!r} appears in both {self._where[name][0]} "
                                          f"and {file}")
                self._where[name] = (file, entry, start)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(name)
        file, e, start = self._where[name]
        b, end = e["data_offsets"]
        with open(file, "rb") as f:
            f.seek(start + b)
            raw = f.read(end - b)
        if len(raw) != end - b:
            raise CheckpointError(f"{file}: truncated while reading tensor {name!r}")
        arr = np.frombuffer(raw, dtype=_DTYPES[e["dtype"]].newbyteorder("<"))
        return arr.reshape(e["shape"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._where[name][1]["dtype"]]

    def file_of(self, name: str) -> pathlib.Path:
        return self._where[name][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not an HF model directory: config.json is missing")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    return ModelConfig.from_hf(raw)


def safetensors_files(path: str | os.PathLike) -> list[pathlib.Path]:
    """The weight files of an HF directory: the index's shards, or the single model.safetensors."""
    path = pathlib.Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e!r})") from None
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files "
                              "(PyTorch .bin checkpoints are not supported; convert them)")
    return found


def hf_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the model needs, with its torch-layout shape."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d),
                                          "model.norm.weight": (d,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f)})
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def check_tensors(cfg: ModelConfig, tensors: Mapping[str, Any], where: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first missing tensor or shape mismatch (extras are ignored)."""
    missing = [n for n in hf_param_shapes(cfg) if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]!r} is missing{more}")
    for name, want in hf_param_shapes(cfg).items():
        got = tensors.shape(name) if isinstance(tensors, LazyTensors) else tuple(tensors[name].shape)
        if tuple(got) != want:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(got)}, the config "
                                  f"needs {want}")


def read_hf_dir(path: str | os.PathLike) -> tuple[ModelConfig, LazyTensors]:
    """(config, lazy tensors) of an HF model directory, validated against the config's shapes."""
    cfg = read_config(path)
    tensors = LazyTensors(safetensors_files(path))
    check_tensors(cfg, tensors, where=str(path))
    return cfg, tensors


# ----------------------------------------------------------------------------------------- writing
def _as_numpy(x: Any, dtype: np.dtype | None) -> np.ndarray:
    arr = np.asarray(x)      # jax arrays and numpy; torch tensors should be converted by the caller
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    if arr.dtype not in _CODES:
        raise CheckpointError(f"cannot write dtype {arr.dtype} to safetensors")
    return np.ascontiguousarray(arr)


def write_safetensors(file: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None, dtype: Any = None) -> None:
    """Write one safetensors file (atomically: a temporary file renamed into place)."""
    file = pathlib.Path(file)
    dt = np.dtype(dtype) if dtype is not None else None
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset, names = 0, sorted(tensors)
    for name in names:       # first pass: shapes only (tensors may be lazy)
        x = tensors[name]
        xdt = dt if dt is not None else np.dtype(getattr(x, "dtype", np.float32))
        if xdt not in _CODES:
            raise CheckpointError(f"tensor {name!r}: cannot write dtype {xdt} to safetensors")
        nbytes = int(np.prod(x.shape, dtype=np.int64)) * xdt.itemsize
        header[name] = {"dtype": _CODES[xdt], "shape": list(x.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)           # data section 8-byte aligned, as safetensors does
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            arr = _as_numpy(tensors[name], dt)
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, file)


def _nbytes(x: Any, dtype: np.dtype | None) -> int:
    itemsize = (dtype or np.dtype(getattr(x, "dtype", np.float32))).itemsize
    return int(np.prod(x.shape, dtype=np.int64)) * itemsize


def write_hf_dir(path: str | os.PathLike, cfg: ModelConfig, tensors: Mapping[str, Any], *,
                 dtype: Any = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 generation_config: Mapping[str, Any] | None = None,
                 tokenizer_files: Iterable[str | os.PathLike] | str | os.PathLike = ()) -> pathlib.Path:
    """Write an HF directory transformers can load. ``dtype`` (e.g. "bfloat16") casts every tensor
    and is recorded as torch_dtype; tensors beyond ``hf_param_shapes(cfg)`` are refused so a stray
    LoRA factor cannot leak into an export. ``tokenizer_files`` is a list of files or a directory
    whose known tokenizer files are copied."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    check_tensors(cfg, tensors, where="tensors to export")
    extra = sorted(set(tensors) - set(hf_param_shapes(cfg)))
    if extra:
        raise CheckpointError(f"tensors to export include names the config does not define: "
                              f"{extra[:3]} (merge LoRA adapters before exporting)")
    dt = np.dtype(ml_dtypes.bfloat16 if dtype in ("bfloat16", "bf16") else dtype) \
        if dtype is not None else None
    hf = cfg.to_hf()
    if dt is not None:
        hf["torch_dtype"] = "bfloat16" if dt == np.dtype(ml_dtypes.bfloat16) else dt.name
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(dict(generation_config), indent=2))
    for stale in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)

    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        n = _nbytes(tensors[name], dt)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if len(shards) == 1:
        write_safetensors(path / SINGLE_FILE, {k: tensors[k] for k in shards[0]}, dtype=dt)
    else:
        weight_map, total = {}, 0
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(path / fname, {k: tensors[k] for k in names}, dtype=dt)
            for k in names:
                weight_map[k] = fname
                total += _nbytes(tensors[k], dt)
        (path / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    if isinstance(tokenizer_files, (str, os.PathLike)):
        src = pathlib.Path(tokenizer_files)
        tokenizer_files = [src / n for n in TOKENIZER_FILES if (src / n).is_file()] \
            if src.is_dir() else [src]
    for f in tokenizer_files:
        f = pathlib.Path(f)
        if not f.is_file():
            raise CheckpointError(f"tokenizer file to copy does not exist: {f}")
        shutil.copyfile(f, path / f.name)
    return path
