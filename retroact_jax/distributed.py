"""Several processes (``jax.distributed``, one per host) running one stage together.

The division of work (README "Several hosts"): every process rolls out its own share of the tasks
(``share``: task ``i`` of a sorted list goes to process ``i mod n``), the trial records are gathered
so that every process holds all of them (``allgather_json``) in one canonical order, every process
then builds the same global batches and feeds the learner's step, whose mesh spans every process's
devices (``place`` / ``global_batch``); the parameters of the sampler and the scorer are a local
copy of the learner's (``local_copy``), so each process samples on its own devices with no
collective. Only process 0 writes shared files (``is_main``); orbax checkpoints are written by every
process together (each its own shards). Seeds depend on (seed, task, trial, call), never on the
process, so the rollouts do not depend on the process count.

With one process every function here is the identity (no collective, nothing gathered).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import jax
import numpy as np


def count() -> int:
    return jax.process_count()


def index() -> int:
    return jax.process_index()


def is_main() -> bool:
    return jax.process_index() == 0


def share(items: Sequence, n: int | None = None, p: int | None = None) -> list:
    """This process's part of ``items`` (strided: item ``i`` to process ``i mod n``)."""
    n = count() if n is None else n
    p = index() if p is None else p
    return list(items)[p::n]


def part_dir(run_dir: str | pathlib.Path) -> pathlib.Path:
    """Where this process writes its share of a rollout: ``run_dir`` itself with one process,
    ``run_dir/process-<p>-of-<n>`` with several (a rerun with another count starts that part anew)."""
    run_dir = pathlib.Path(run_dir)
    return run_dir if count() == 1 else run_dir / f"process-{index()}-of-{count()}"


def allgather_json(obj: Any) -> list[Any]:
    """[obj of process 0, obj of process 1, ...] on every process (``obj`` JSON-able)."""
    if count() == 1:
        return [obj]
    from jax.experimental import multihost_utils as mu
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(mu.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(mu.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(rows[i, :int(sizes[i])]).decode()) for i in range(len(sizes))]


def agree(obj: Any) -> Any:
    """Process 0's ``obj`` on every process (a decision all must take alike, e.g. a file exists)."""
    return obj if count() == 1 else allgather_json(obj)[0]


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)``; with several processes each leaf (the same value on
    every process) becomes a global array, typed PRNG keys included."""
    if count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sh):
        if not _is_key(x):
            return jax.device_put(np.asarray(x), sh)
        data = jax.device_put(np.asarray(jax.random.key_data(x)), sh)
        impl = jax.random.key_impl(x)
        return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=sh)(data)
    return jax.tree.map(one, tree, shardings)


def global_batch(array: np.ndarray, sharding) -> jax.Array:
    """A global array from the whole batch, which every process holds alike (each process
    transfers only the rows of its own devices)."""
    if count() == 1:
        return jax.device_put(array, sharding)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def local_copy(tree: Any) -> Any:
    """Process-local arrays (on this process's default device) of a tree of global arrays: a
    replicated leaf's own copy, a sharded one gathered from every process."""
    if count() == 1:
        return tree
    from jax.experimental import multihost_utils as mu
    dev = jax.local_devices()[0]

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return jax.device_put(x.addressable_data(0), dev)
        if _is_key(x):
            data = mu.process_allgather(jax.random.key_data(x), tiled=True)
            return jax.random.wrap_key_data(jax.device_put(data, dev), impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(mu.process_allgather(x, tiled=True)), dev)
    return jax.tree.map(one, tree)
