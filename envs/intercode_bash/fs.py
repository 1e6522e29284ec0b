"""The NL2Bash tasks and file systems as data, and git-status-style diffs of sandbox snapshots.

Tasks: ``nl2bash_fs_{1..4}.json`` in that order (60 + 53 + 60 + 27 = 200), task ``i`` of file
``k`` has id ``fs_k#i``. Its file system is ``file_systems["fs_k"]`` of the manifest
(data/intercode/README.md). Entries with ``mtime: null`` get one build time per episode,
``BUILD_AGE_S`` (30 min) before the episode starts: old enough that ``-mmin +5`` finds them and
young enough that ``-mtime -1``, ``-amin -60`` and ``-cmin -60`` do, while every explicit
(2023) mtime stays older than any ``-mtime +N`` of the golds. So each time predicate of the golds
separates the two groups, as on InterCode's freshly built images. atime = mtime; ctime cannot be
set and is the real build time.

Diffs: InterCode runs ``git status --short`` over ``/`` of a container whose initial tree was
committed, with ``docker.gitignore`` (system folder names, matched at any depth). ``git_status``
computes the same list from two snapshots (``controller.op_snapshot``): tracked = the files and
symlinks present after the build (git tracks no empty dirs); a tracked path gone -> ``D``; its
content, symlink target or executable bit changed -> ``M``; an untracked file -> ``??``, collapsed
into ``dir/`` at its highest ancestor that holds no tracked file (git's untracked-dir rule).
Unlike InterCode's whitespace split of git's output, paths with spaces stay whole.
"""
from __future__ import annotations

import functools
import json

from envs import data

FS_NAMES = ("fs_1", "fs_2", "fs_3", "fs_4")
BUILD_AGE_S = 30 * 60
# Folders every task machine has besides its manifest tree (the data README's replay set).
EXTRA_DIRS = [["/root", "0700"], ["/tmp", "1777"], ["/home", "0755"], ["/var", "0755"],
              ["/var/log", "0755"], ["/var/tmp", "1777"]]


class ManifestError(RuntimeError):
    """The file-system manifest is not what this module expects."""


@functools.lru_cache(maxsize=1)
def manifest() -> dict:
    m = json.loads(data.path("intercode/nl2bash_fs_manifest.json").read_text())
    if m.get("format") != "intercode-nl2bash-fs-manifest/1":
        raise ManifestError(f"unknown manifest format {m.get('format')!r}")
    for name in FS_NAMES:
        if name not in m.get("file_systems", {}):
            raise ManifestError(f"manifest has no file system {name!r}")
    return m


def entries(fs_name: str) -> list[dict]:
    return manifest()["file_systems"][fs_name]["entries"]


@functools.lru_cache(maxsize=1)
def nl2bash_tasks() -> tuple[tuple[str, int, str, str], ...]:
    """(fs_name, index within its file, query, gold) for all 200 tasks, in the stable order."""
    rows = []
    for k, name in enumerate(FS_NAMES, start=1):
        for i, r in enumerate(json.loads(data.path(f"intercode/nl2bash_fs_{k}.json").read_text())):
            if not isinstance(r.get("query"), str) or not isinstance(r.get("gold"), str):
                raise ManifestError(f"nl2bash_fs_{k}.json row {i} lacks a string query/gold: {r!r}")
            rows.append((name, i, r["query"], r["gold"]))
    return tuple(rows)


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:j]) for j in range(1, len(parts))]


def git_status(initial: dict, now: dict) -> set[tuple[str, str]]:
    """{(path, code)} that ``git status --short`` would list for ``now`` against ``initial``."""
    tracked = {p: v for p, v in initial["files"].items() if v[0] in ("f", "l")}
    files = {p: v for p, v in now["files"].items() if v[0] in ("f", "l")}
    out = set()
    for p, v in tracked.items():
        w = files.get(p)
        if w is None:
            out.add((p, "D"))
        elif w != v:
            out.add((p, "M"))
    tracked_dirs = {a for p in tracked for a in _ancestors(p)}
    for p in files:
        if p in tracked:
            continue
        top = next((a for a in _ancestors(p) if a not in tracked_dirs), None)
        out.add((top + "/", "??") if top is not None else (p, "??"))
    if now.get("overflow"):
        out.add(("<more files than the snapshot limit>", "??"))
    return out


def tree_digest(snap: dict, path: str):
    """What hashing ``path`` shows: a file's (kind, exec, md5), or a dir's sorted file digests."""
    p = path.rstrip("/")
    if p in snap["files"]:
        return tuple(snap["files"][p])
    prefix = p + "/"
    return tuple(sorted((q, tuple(v)) for q, v in snap["files"].items() if q.startswith(prefix)))
