"""Orbax checkpoints of a whole run: parameters of both roles, optimizer state, schedule step,
rng, RL iteration, data position and the replay buffer.

A checkpoint step holds two items:
  ``state``  a pytree of arrays (``nnx.to_pure_dict`` of each role's trainable state, optimizer
             states, the rng key data, counters) saved with ``StandardSave``; restored against an
             abstract tree so shapes, dtypes and shardings are those of the live run;
  ``meta``   JSON: stage, RL iteration, data iterator position, replay buffer rows (text + floats),
             the config that made it (a changed config is reported on restore).

Saves are atomic (orbax writes to a temp dir and renames it) and **sealed**: just before that
rename, the size and sha256 of every file of the step (arrays, orbax metadata, the meta JSON) go into
``retroact_checksums.json`` inside it (temp file + fsync + rename), so a step that exists carries
its seal; orbax's own commit files written after the seal (``_CHECKPOINT_METADATA``,
``commit_success.txt``) are checked for being present and readable. A step is *intact* when every
sealed file has its size and hash. ``latest_step`` is the newest intact step: damaged steps
(truncated, bit-flipped, torn metadata or meta JSON, no seal) are skipped with one warning line each
naming the step and why; steps exist but none is intact -> ``CheckpointError`` (never a silent fresh
start). A damaged step is never overwritten or deleted: the next save moves every step at or after
its own number to ``<dir>/set_aside/`` first. ``clean_leftovers`` (the writer calls it at its start;
saves call it too) removes the temporary folders of saves killed before orbax's rename.
``latest_step`` is None for a fresh run.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

SEAL = "retroact_checksums.json"
SET_ASIDE = "set_aside"
_TMP_MARK = ".orbax-checkpoint-tmp"
_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")   # step root, written after the seal
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ seals
def _files(step_dir: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                  if p.is_file() and p.name != SEAL and not p.name.startswith(f".{SEAL}")
                  and not (p.parent == step_dir and p.name in _COMMIT_FILES))


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)              # hashlib releases the GIL: files hash in parallel threads
    return h.hexdigest()


def _hash_all(step_dir: pathlib.Path, names: list[str]) -> dict[str, str]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as ex:
        return dict(zip(names, ex.map(lambda n: _sha256(step_dir / n), names)))


def seal(step_dir: pathlib.Path) -> None:
    """Write the step's checksum file (atomically, after all its data)."""
    names = _files(step_dir)
    hashes = _hash_all(step_dir, names)
    body = {"version": 1, "files": {n: {"bytes": (step_dir / n).stat().st_size, "sha256": hashes[n]}
                                    for n in names}}
    tmp = step_dir / f".{SEAL}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / SEAL)
    fd = os.open(step_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def damage(step_dir: pathlib.Path) -> str | None:
    """Why the step is not intact (one short phrase), or None when every sealed file checks out."""
    try:
        listed = json.loads((step_dir / SEAL).read_text(encoding="utf-8"))["files"]
        sizes = {n: int(v["bytes"]) for n, v in listed.items()}
        hashes = {n: str(v["sha256"]) for n, v in listed.items()}
    except FileNotFoundError:
        return f"no {SEAL} (not written by this code's save)"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {SEAL} ({type(e).__name__})"
    if not sizes:
        return f"{SEAL} lists no files"
    if not (step_dir / _COMMIT_FILES[1]).is_file():
        return f"{_COMMIT_FILES[1]} is missing"
    try:
        if not isinstance(json.loads((step_dir / _COMMIT_FILES[0]).read_text(encoding="utf-8")), dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        return f"unreadable {_COMMIT_FILES[0]} ({type(e).__name__}: truncated or corrupted)"
    for n, size in sizes.items():           # sizes first: cheap, and names a truncation as such
        p = step_dir / n
        if not p.is_file():
            return f"{n} is missing"
        if p.stat().st_size != size:
            return f"{n} has {p.stat().st_size} bytes, {size} when saved (truncated or rewritten)"
    got = _hash_all(step_dir, sorted(hashes))
    bad = [n for n in sorted(hashes) if got[n] != hashes[n]]
    if bad:
        return f"sha256 of {bad[0]} differs from the saved one (corrupted)" + \
            (f", and {len(bad) - 1} more file(s)" if len(bad) > 1 else "")
    return None


class SealingRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """Orbax's atomic rename, with the step sealed just before it (items are finalised first)."""

    async def finalize(self):
        tmp, final = pathlib.Path(self.get()), pathlib.Path(self.get_final())
        if final.name.isdigit() and _TMP_MARK not in final.parent.name:     # a step, not an item
            await asyncio.to_thread(seal, tmp)
        await super().finalize()


def _first_line(e: BaseException, limit: int = 300) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    return (s[:limit] + " ...") if len(s) > limit else s


# ------------------------------------------------------------------------------------ checkpointer
class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2, async_save: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                            enable_async_checkpointing=async_save,
                                            temporary_path_class=SealingRename)
        self._mgr = ocp.CheckpointManager(self.directory, options=opts,
                                          item_names=("state", "meta"))
        self._damage: dict[int, str | None] = {}      # step -> damage() (each step checked once)
        self._warned_fallback: int | None = None

    # -- integrity ----------------------------------------------------------------------------------
    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(int(step))

    def check(self, step: int) -> str | None:
        """Why step ``step`` is damaged, or None if it is intact (cached)."""
        if step not in self._damage:
            why = damage(self.step_dir(step))
            if why is not None:
                log.warning("checkpoint step %d in %s is damaged: %s", step, self.directory, why)
            self._damage[step] = why
        return self._damage[step]

    @property
    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    @property
    def latest_step(self) -> int | None:
        """The newest intact step (damaged newer ones warned about and skipped); None: no steps."""
        steps = self.all_steps
        for s in reversed(steps):
            if self.check(s) is None:
                if s != steps[-1] and self._warned_fallback != s:
                    self._warned_fallback = s
                    log.warning("resuming from checkpoint step %d, the newest intact one (damaged "
                                "steps are kept and moved to %s/ at the next save)", s, SET_ASIDE)
                return s
        if steps:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}: " + "; ".join(
                    f"step {s}: {self._damage[s]}" for s in reversed(steps)) +
                " (not starting afresh: move the directory away to start a new run)")
        return None

    def clean_leftovers(self) -> list[pathlib.Path]:
        """Remove temporary folders of saves killed before they completed (only the writer calls
        this: a reader could remove a live writer's save in progress)."""
        gone = []
        if self.directory.is_dir() and jax.process_index() == 0:
            for p in sorted(self.directory.iterdir()):
                if _TMP_MARK in p.name and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                    log.warning("removed %s, the temporary folder of an interrupted checkpoint save", p)
                    gone.append(p)
        return gone

    def _set_aside(self, from_step: int) -> None:
        moved = False
        for s in self.all_steps:
            if s >= from_step and jax.process_index() == 0:
                base = self.directory / SET_ASIDE / f"{s}-{time.strftime('%Y%m%dT%H%M%S')}"
                dest, n = base, 1
                while dest.exists():
                    dest, n = base.with_name(f"{base.name}-{n}"), n + 1
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.step_dir(s), dest)
                why = self._damage.get(s) or "not restored by this run"
                log.warning("checkpoint step %d (%s) moved to %s: a new step %d is being saved",
                            s, why, dest, from_step)
                self._damage.pop(s, None)
                moved = True
        if moved:
            self._mgr.reload()

    # -- save / restore ----------------------------------------------------------------------------
    def save(self, step: int, state: Any, meta: dict, force: bool = True) -> None:
        step = int(step)
        self._set_aside(step)
        self.clean_leftovers()
        self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=force)
        self._mgr.wait_until_finished()
        self._damage[step] = None
        for s in list(self._damage):         # steps orbax removed (max_to_keep) leave the cache
            if not self.step_dir(s).exists():
                self._damage.pop(s)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        step = self.latest_step if step is None else int(step)
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps:
            raise CheckpointError(f"no checkpoint step {step} in {self.directory} "
                                  f"(steps: {self.all_steps})")
        why = self.check(step)
        if why is not None:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {why}")
        if abstract_state is None:     # a reader: on this process's first device, whoever wrote it
            abstract_state = self._local_target(step)
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types, with long messages: name the step, one line
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: "
                                  f"{type(e).__name__}: {_first_line(e)}") from e
        return out["state"], out["meta"]

    def _local_target(self, step: int) -> Any:
        """The saved tree's shapes and dtypes on this process's first device (a checkpoint written
        by several processes, or on other devices, restores without the writer's topology)."""
        md = ocp.StandardCheckpointHandler().metadata(self.step_dir(step) / "state")
        tree = getattr(md, "tree", md)
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)

    def close(self) -> None:
        self._mgr.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live tree: the restore target."""
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree_util.tree_map(one, tree)
