"""The offline data packs under ``data/``: where they are and whether they are intact.

Every file the product reads is listed in ``PACK`` with its sha256 (the figures of the packs'
provenance READMEs). ``path(name)`` returns a checked path or raises ``DataError`` naming the file,
what was wrong and how to get it back. The root is ``$RETROACT_DATA`` or ``<repo>/data``.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib

PACK: dict[str, str] = {
    "alfworld/train.tar.xz": "6f882826269154e8af0361ff6348c0af65bca136f8ab9358ecd8c5081b6fe96b",
    "alfworld/valid_seen.tar.xz": "f1de328b9fcdd78321d32f4f01e17df59796608e2f53074d3a2721f1caf573ff",
    "alfworld/valid_train.tar.xz": "94d8cae302a1934af7c8a47d58053851350cb10ee11cd315fca1ebb4614b4bd4",
    "alfworld/valid_unseen.tar.xz": "bc8b701fd005a1c79b4fb900ad38b99f0a8c441a4eb01968f3251c85a9fe101d",
    "hotpotqa/hotpotqa_distractor.jsonl.gz": "df66560858181fc4c46e751284e7cd7d8aea49a4ffebe55775bfaebbae6679da",
    "intercode/ic_spider_dbs.sql": "61f6e8000cb5bb696f123fa55e111acdcd8da7eca64f452a36fd1a6e5fb1781a",
    "intercode/ic_spider_dev.json": "68c9ecb0692c80770f46c724cc073ea76be4f301a294caa532c050546948128e",
    "intercode/nl2bash_fs_1.json": "60f88e1aacc7ebba535093f9890c5c33203f4e5f32958e0e94fbe90ec4f01c82",
    "intercode/nl2bash_fs_2.json": "8f4ce24e535fab782fda607e37db2ae1d6c5f99993c638d1ac0a7e0b542f633e",
    "intercode/nl2bash_fs_3.json": "a2d4ec8bc7ad69a4e2fb3eb84033994cf65ee9cfb355e3e63099df67a339b2e1",
    "intercode/nl2bash_fs_4.json": "ce41b89450f87765a02a51df259ca0c1762e8249185c022adb089147e2c16200",
    "intercode/nl2bash_fs_manifest.json": "b9c7b926fcf36074f621215d4b6cafe5d6c0c741c51e11a5451bdb1adb35cbfe",
    "intercode/nl2bash_test_queries.json": "d24a7a1eb61c2621c48a42f942d08f6aa02066630ab49c2a07de2530a226e0aa",
    "retroact/alfworld_il.json": "778bb8fc59a475b2dc7b6ff09d1146551bae56f48576a62644ea0809566b9771",
    "retroact/intercode_il.json": "7508403798c27c872fcae255b924629c2753b4dfd814bc5434b4f3576626cc60",
    "retroact/intercode_rl.json": "fd1cde07a9216338565be6de67208cacf6bcbe53da108a503c7fc635ef24450e",
}


class DataError(RuntimeError):
    """A data file is missing or corrupt; the message says which and how to restore it."""


def root() -> pathlib.Path:
    env = os.environ.get("RETROACT_DATA")
    if env:
        return pathlib.Path(env).expanduser().resolve()
    return pathlib.Path(__file__).resolve().parent.parent / "data"


def sha256(p: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _checked(p: str, size: int, mtime_ns: int, expected: str) -> bool:
    del size, mtime_ns  # part of the cache key: a changed file is checked again
    return sha256(pathlib.Path(p)) == expected


def path(name: str, check: bool = True) -> pathlib.Path:
    """The checked path of pack file ``name`` (e.g. ``"intercode/ic_spider_dev.json"``)."""
    if name not in PACK:
        raise DataError(f"{name!r} is not a file of the data pack; known: {sorted(PACK)}")
    p = root() / name
    how = (f"restore it from the repository (git checkout -- data/{name}) or point $RETROACT_DATA at a "
           f"copy of the pack; its provenance is in data/{name.split('/')[0]}/README.md")
    if not p.is_file():
        raise DataError(f"data file missing: {p}; {how}")
    if check:
        st = p.stat()
        if not _checked(str(p), st.st_size, st.st_mtime_ns, PACK[name]):
            raise DataError(f"data file corrupt (sha256 differs from {PACK[name]}): {p}; {how}")
    return p


def cache_dir(*parts: str) -> pathlib.Path:
    """A writable cache folder: ``$RETROACT_CACHE`` or ``~/.cache/retroact_jax``."""
    base = pathlib.Path(os.environ.get("RETROACT_CACHE", "~/.cache/retroact_jax")).expanduser()
    d = base.joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d
