"""Device meshes from config and regex partition rules -> shardings (EasyLM / cookbook style).

A mesh has three named axes: ``data`` (batch), ``fsdp`` (batch + parameter sharding) and ``tensor``
(model-parallel within a layer). Sizes come from config; one size may be -1 (= the rest of the
devices). Axes are ``AxisType.Auto``: jax 0.10's ``jax.make_mesh`` defaults to Explicit axes, which
breaks auto-sharded code.

Partition rules are ``(regex, PartitionSpec)`` pairs matched (``re.search``) against the '.'-joined
parameter path (``layers.3.self_attn.q_proj.kernel``); the first match wins, no match = replicated.
A mesh axis that does not divide its array dimension is dropped for that dimension (replicated
there) and reported by ``explain``; shapes stay exact, nothing is padded.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Rules for the decoder (models/config.py naming contract). Kernels are [in, out].
DECODER_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens\.embedding$", P("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", P("tensor")),
    (r"(o_proj|down_proj)\.kernel$", P("tensor", "fsdp")),
    (r"lm_head\.kernel$", P("fsdp", "tensor")),
    (r"lora_a$", P("fsdp", None)),
    (r"lora_b$", P(None, "tensor")),
    (r"(norm|layernorm)\.scale$", P()),
)


class ShardingError(ValueError):
    pass


def mesh_shape(axes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
    """Resolve sizes (one may be -1) for ``AXES`` against ``n_devices``."""
    unknown = set(axes) - set(AXES)
    if unknown:
        raise ShardingError(f"unknown mesh axes {sorted(unknown)}; valid axes: {AXES}")
    sizes = [int(axes.get(a, 1)) for a in AXES]
    if sizes.count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh axis sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ShardingError(f"{n_devices} devices are not divisible by the fixed axes "
                                f"{dict(zip(AXES, sizes))}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ShardingError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                            f"have {n_devices}")
    return tuple(sizes)


def make_mesh(axes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(axes or {"fsdp": -1}, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def path_str(path: Sequence[Any]) -> str:
    """'.'-joined key path; the trailing ``.value`` of an NNX Variable leaf is dropped."""
    parts = []
    for k in path:
        k = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        parts.append(str(k))
    if len(parts) > 1 and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes that do not divide their dimension; pad/trim the spec to the rank."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    entries = entries[: len(shape)]
    out = []
    for dim, e in zip(shape, entries):
        names = () if e is None else (e if isinstance(e, tuple) else (e,))
        size = math.prod(mesh.shape[n] for n in names) if names else 1
        out.append(e if names and dim % size == 0 else None)
    return P(*out)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh,
             rules: Sequence[tuple[str, P]] = DECODER_RULES) -> P:
    for pattern, spec in rules:
        if re.search(pattern, name):
            return _fit(spec, shape, mesh)
    return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = DECODER_RULES) -> Any:
    """A pytree of ``NamedSharding`` matching ``tree`` (arrays or ShapeDtypeStructs)."""
    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(path_str(path), shape, mesh, rules))
    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
    """Leading dimension over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (rank - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def explain(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = DECODER_RULES) -> list[str]:
    """One line per leaf: path, shape, the rule's spec and the spec actually used."""
    lines = []
    def one(path, leaf):
        name, shape = path_str(path), tuple(getattr(leaf, "shape", ()))
        want = next((s for p, s in rules if re.search(p, name)), P())
        got = _fit(want, shape, mesh)
        padded = (tuple(want) + (None,) * len(shape))[: len(shape)]
        note = "" if tuple(got) == padded else f"  (rule {want} fitted to the shape)"
        lines.append(f"{name} {shape} -> {got}{note}")
    jax.tree_util.tree_map_with_path(one, tree)
    return lines


def tree_mesh(tree: Any) -> Mesh | None:
    """The mesh of the first leaf placed with a ``NamedSharding`` (weights sharded over a mesh, e.g.
    the RL learner's placed copy), else None."""
    return next((x.sharding.mesh for x in jax.tree.leaves(tree)
                 if isinstance(getattr(x, "sharding", None), NamedSharding)), None)


def loops_deadlock(mesh: Mesh | None) -> bool:
    """Whether a loop (``lax.map`` / ``scan``) holding collectives may deadlock on ``mesh``: XLA:CPU
    runs the devices of one process as threads that meet at each collective, and orders a loop
    before the collectives after it by scheduling only (the loop may still be running), so two
    devices can enter different collectives and wait for each other (a ``fsdp=2`` mesh over 2 CPU
    devices of one process, in the train step's chunked head; XLA aborts after 40 s). True on CPU
    when this process holds more than one of the mesh's devices: unroll such loops there."""
    if mesh is None:
        return False
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return len(mine) > 1 and all(d.platform == "cpu" for d in mine)
