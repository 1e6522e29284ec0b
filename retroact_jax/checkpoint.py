"""Orbax checkpoints of a whole run: parameters of both roles, optimizer state, schedule step,
rng, RL iteration, data position and the replay buffer.

A checkpoint step holds two items:
  ``state``  a pytree of arrays (``nnx.to_pure_dict`` of each role's trainable state, optimizer
             states, the rng key data, counters) saved with ``StandardSave``; restored against an
             abstract tree so shapes, dtypes and shardings are those of the live run;
  ``meta``   JSON: stage, RL iteration, data iterator position, replay buffer rows (text + floats),
             the config that made it (a changed config is reported on restore).
Saves are atomic (orbax writes to a temp dir and renames), so a run killed with SIGKILL mid-save
restores the previous complete step. ``latest_step`` is None for a fresh run.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2, async_save: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                            enable_async_checkpointing=async_save)
        self._mgr = ocp.CheckpointManager(self.directory, options=opts,
                                          item_names=("state", "meta"))

    @property
    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, state: Any, meta: dict, force: bool = True) -> None:
        self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=force)
        self._mgr.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        step = self.latest_step if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; name the step and the directory
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: "
                                  f"{type(e).__name__}: {e}") from e
        return out["state"], out["meta"]

    def close(self) -> None:
        self._mgr.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live tree: the restore target."""
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree_util.tree_map(one, tree)
