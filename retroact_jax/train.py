"""The jitted joint train step: planner and reflector (or one shared model) updated in one step.

A step's batch has ``rows = (Bp, Br)`` rows: planner rows first, then reflector rows (``collate_step``
builds it; a role's filler rows are all-invalid). Each role's rows go through that role's model; in the
single-agent setting both roles are one model with shared parameters and all rows go through it in one
forward. The log-probs of all rows are then put together and ``losses.joint_loss`` computes
planner RL + reflector RL + lambda * IL, so the gradient of each part reaches its own parameters only.

Trainable parameters are the LoRA adapters when the model has any (``nnx.LoRAParam``), else every
``nnx.Param`` (full fine-tuning). The rest (frozen base, RNG state of LoRA dropout) is split off once;
the RNG state is carried in the train state so dropout masks differ per step and a resumed run
continues the same stream. The step is one ``jax.jit`` with the train state donated and, given a mesh,
explicit ``in_shardings`` / ``out_shardings`` from the partition rules (``sharding.py``).

Divergence guard: besides the losses, each step returns per role (``planner`` / ``reflector`` /
``shared``) the norms of its gradient, of its update and of its trainable parameters before the
update, and their ratio update norm / parameter norm. ``Learner.check`` (the host-side fetch, one step late
through ``metrics.Lagged``) raises ``TrainError`` naming the step and the role on a non-finite loss or
norm, or on a ratio above ``max_update_ratio``: LoRA at an absurd learning rate keeps a finite loss
while its adapters explode, and only the norms show it. ``check_latest`` checks the newest step if the
lagged fetch has not yet: the checkpointer calls it before every save, so no checkpoint holds a state
whose step was not checked.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from retroact_jax import batching, distributed, losses, optim, sharding
from retroact_jax.models.decoder import set_memory_options

ROLES = losses.ROLES
# A step whose update norm exceeds this many times the role's parameter norm is divergence. Sane
# runs stay far below: Adam moves each element by ~lr, so the ratio is ~lr * sqrt(N) / |p|: ~lr/0.03
# for full fine-tuning (RMS weight ~0.03), lr * sqrt(6 d_in) for fresh LoRA adapters (A uniform
# +-1/sqrt(d_in), B = 0): 0.2 at lr 1e-3 for d_in 8192, at most ~3x that in Adam's transients.
DEFAULT_MAX_UPDATE_RATIO = 10.0
TRACES: collections.Counter = collections.Counter()   # times each step function was traced


class TrainError(RuntimeError):
    pass


def has_lora(model: nnx.Module) -> bool:
    return len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) > 0


def trainable_filter(model: nnx.Module):
    return nnx.LoRAParam if has_lora(model) else nnx.Param


# ------------------------------------------------------------------------------------------- batches
def _filler(B: int, T: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows that are all padding: they contribute nothing to any loss or metric."""
    z = lambda dt: np.zeros((B, T), dt)  # noqa: E731
    return dict(tokens_BxT=np.full((B, T), pad_id, np.int32), positions_BxT=z(np.int32),
                valid_BxT=z(bool), kinds_BxT=np.full((B, T), batching.KIND_PAD, np.int8),
                loss_mask_BxT=z(bool), reward_BxT=z(np.float32), behaviour_logp_BxT=z(np.float32),
                behaviour_mask_BxT=z(bool), role_B=np.zeros(B, np.int32),
                objective_B=np.full(B, losses.OBJECTIVE_IL, np.int32), reward_B=np.zeros(B, np.float32),
                lengths_B=np.zeros(B, np.int32), segments_BxT=z(np.int32))


def _pad_to(arrays: dict[str, np.ndarray], T: int, pad_id: int) -> dict[str, np.ndarray]:
    out = {}
    for k, a in arrays.items():
        if not k.endswith("_BxT") or a.shape[1] == T:
            out[k] = a
            continue
        fill = {"tokens_BxT": pad_id, "kinds_BxT": batching.KIND_PAD}.get(k, 0)
        out[k] = np.pad(a, ((0, 0), (0, T - a.shape[1])), constant_values=fill)   # right padding
    return out


def collate_step(samples: Mapping[str, Sequence[batching.TokenizedSample]], rows: Mapping[str, int],
                 buckets: Sequence[int], pad_id: int, **collate_kwargs) -> tuple[dict[str, np.ndarray], dict]:
    """One step's arrays: ``rows[role]`` rows per role (planner first), one common length bucket.
    A row is a sample or a list of samples packed into one row (``batching.collate``).

    Returns the arrays and host-side counts (real rows, truncated rows per role).
    """
    parts, stats, T = {}, {}, 0
    for role in ROLES:
        B = int(rows.get(role, 0))
        got = list(samples.get(role, ()))
        if len(got) > B:
            raise TrainError(f"{len(got)} {role} samples for a step of {B} {role} rows")
        flat = [s for row in got for s in (row if isinstance(row, (list, tuple)) else (row,))]
        if any(s.sample.role != role for s in flat):
            raise TrainError(f"a sample in the {role} part of a step has another role")
        if B == 0:
            continue
        if got:
            b = batching.collate(got, buckets, pad_id, batch_size=B, **collate_kwargs)
            parts[role] = b.arrays()
            stats[role] = {"rows": b.n_rows, "truncated": b.n_truncated, "untrained": b.n_rows_untrained,
                           "samples": b.n_samples}
        else:
            parts[role] = None
            stats[role] = {"rows": 0, "truncated": 0, "untrained": 0, "samples": 0}
        T = max(T, parts[role]["tokens_BxT"].shape[1] if parts[role] is not None else 0)
    if not parts:
        raise TrainError("a step needs rows for at least one role")
    T = T or min(buckets)
    for role, arr in parts.items():
        B = int(rows[role])
        parts[role] = _filler(B, T, pad_id) if arr is None else _pad_to(arr, T, pad_id)
        if arr is None:
            parts[role]["role_B"][:] = batching.ROLES[role]
    keys = parts[next(iter(parts))].keys()
    return {k: np.concatenate([parts[r][k] for r in ROLES if r in parts]) for k in keys}, stats


# ------------------------------------------------------------------------------------ memory settings
ATTENTIONS, REMATS = ("default", "dot_product", "blockwise"), ("none", "dots", "full", "layer")


def memory_kwargs(train_cfg: Any) -> dict:
    """``Learner`` keyword arguments from a stage's ``train`` config: ``head_chunk`` (positions per
    chunk of the vocabulary head, 0 = whole logits), ``attention`` and ``remat`` (the decoder's
    memory options for the train step; bench/README.md has their memory and speed)."""
    attn, remat = str(train_cfg.attention), str(train_cfg.remat)
    if attn not in ATTENTIONS:
        raise TrainError(f"config.train.attention={attn!r}: choose one of {ATTENTIONS}")
    if remat not in REMATS:
        raise TrainError(f"config.train.remat={remat!r}: choose one of {REMATS}")
    if int(train_cfg.head_chunk) < 0:
        raise TrainError(f"config.train.head_chunk must be >= 0, got {train_cfg.head_chunk}")
    return {"head_chunk": int(train_cfg.head_chunk), "memory": {"attention": attn, "remat": remat}}


# --------------------------------------------------------------------------------------------- learner
@dataclasses.dataclass
class _Part:
    graphdef: Any
    frozen: Any


class Learner:
    """Owns the trainable state of the roles' models and the jitted joint step.

    ``models``: {"planner": Decoder, "reflector": Decoder}; pass the same object for both roles for the
    single-agent setting (shared parameters), or omit a role that is not trained (e.g. SFT+RL trains
    the planner only). ``rows``: rows per role in each step's batch. ``head_chunk``: positions per
    chunk of the vocabulary head + log-prob (0 = the whole [B, T, V] logits at once). ``memory``: the
    decoder's memory options for the train step only (``decoder.set_memory_options``: ``attention``,
    ``attention_block``, ``remat``); the models themselves (and samplers split from them) keep theirs.
    """

    def __init__(self, models: Mapping[str, nnx.Module], *, optimizer: Any,
                 loss: losses.LossConfig = losses.LossConfig(), rows: Mapping[str, int],
                 mesh: Mesh | None = None, rules=sharding.DECODER_RULES,
                 max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO, head_chunk: int = 256,
                 memory: Mapping[str, Any] | None = None):
        unknown = set(models) - set(ROLES)
        if unknown or not models:
            raise TrainError(f"models must map roles {ROLES} to models, got {sorted(models)}")
        self.rows = {r: int(rows.get(r, 0)) for r in ROLES}
        for r in ROLES:
            if (r in models) != (self.rows[r] > 0):
                raise TrainError(f"role {r}: a model {'is' if r in models else 'is not'} given but "
                                 f"rows[{r!r}] = {self.rows[r]}")
        self.models = dict(models)
        # one parameter set per distinct model object: "shared" in the single-agent setting
        shared = len(models) == 2 and models["planner"] is models["reflector"]
        self.role_name: dict[str, str] = {r: ("shared" if shared else r) for r in ROLES if r in models}
        self.names = tuple(dict.fromkeys(self.role_name.values()))
        self.loss_cfg = loss
        self.mesh = mesh
        self.head_chunk = int(head_chunk)   # positions per head chunk (losses.head_logprobs_and_entropy)
        self.unroll = sharding.loops_deadlock(mesh)     # head chunks unrolled (XLA:CPU, see there)
        self.max_update_ratio = float(max_update_ratio)
        if not self.max_update_ratio >= 0:
            raise TrainError(f"max_update_ratio must be >= 0 (0: off), got {max_update_ratio}")
        self._latest: Mapping[str, Any] | None = None    # device metrics of the newest step
        self._latest_checked = True
        self.tx = optim.make_optimizer(optimizer)
        self._parts: dict[str, _Part] = {}
        params, rngs = {}, {}
        for name in self.names:
            model = next(models[r] for r in ROLES if self.role_name.get(r) == name)
            model.train()
            own_cfg = model.cfg
            if memory:
                set_memory_options(model, **memory)
            try:
                graphdef, p, rng, frozen = nnx.split(model, trainable_filter(model), nnx.RngState, ...)
            finally:
                model.cfg = own_cfg
            self._parts[name] = _Part(graphdef, frozen)
            params[name], rngs[name] = p, rng
        # abstract models (``nnx.eval_shape``, ShapeDtypeStruct leaves): a state of shapes only, for
        # ``lower`` (bench/memory_plan.py compiles the step without allocating weights)
        self.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
        init = (lambda p: jax.eval_shape(self.tx.init, p)) if self.abstract else self.tx.init
        opt = {n: init(params[n]) for n in self.names}
        self.state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": opt, "rngs": rngs}
        frozen = {n: self._parts[n].frozen for n in self.names}
        if mesh is not None:
            st_sh = sharding.tree_shardings(self.state, mesh, rules)
            fr_sh = sharding.tree_shardings(frozen, mesh, rules)
            if not self.abstract:
                self.state = distributed.place(self.state, st_sh)
                frozen = distributed.place(frozen, fr_sh)
                # the models take the placed frozen weights: samplers / scorers split from them (the
                # RL behaviour policy) share this one copy, and the unplaced originals are freed.
                # Several processes: the models keep their local copy (each process samples alone)
                for r, name in self.role_name.items():
                    if distributed.count() == 1:
                        nnx.update(self.models[r], frozen[name])
            self._batch_sh = {"2": sharding.batch_sharding(mesh, 2), "1": sharding.batch_sharding(mesh, 1)}
            self._jit = jax.jit(self._step_fn, donate_argnums=(0,),
                                in_shardings=(st_sh, fr_sh, None), out_shardings=(st_sh, None))
        else:
            self._batch_sh = None
            self._jit = jax.jit(self._step_fn, donate_argnums=(0,))
        self._frozen = frozen
        self._synced = None        # the state last written into the models (sync_models)

    # -- the pure step ------------------------------------------------------------------------------
    def _logp(self, params, rngs, frozen, batch):
        """Per-token log-probs and entropies of every row under its role's model."""
        logps, ents, new_rngs = [], [], {}
        start = 0
        spans = []
        for r in ROLES:
            if self.rows[r]:
                spans.append((r, start, start + self.rows[r]))
                start += self.rows[r]
        for name in self.names:
            part = self._parts[name]
            # fresh Variables in this trace (the States' own Variables belong to the outer trace:
            # LoRA dropout advancing its count, or a remat layer writing its state back, would
            # raise TraceContextError)
            fresh = lambda st: jax.tree.map(lambda x: x, st)  # noqa: E731
            model = nnx.merge(part.graphdef, fresh(params[name]), fresh(rngs[name]), fresh(frozen[name]))
            mine = [(r, a, b) for r, a, b in spans if self.role_name[r] == name]
            # rows of one model are contiguous (planner then reflector), so one forward per model
            a, b = mine[0][1], mine[-1][2]
            sl = lambda x: x[a:b]  # noqa: E731
            seg = batch.get("segments_BxT")     # packed rows (batching.collate); None: one per row
            h_BxTxD, _ = model.hidden(sl(batch["tokens_BxT"]), sl(batch["positions_BxT"]),
                                      sl(batch["valid_BxT"]), segments_BxT=None if seg is None else sl(seg))
            # the last position predicts no trained token: the head runs on T-1 positions, in chunks
            # of head_chunk positions (never the whole [B, T, V] logits, recomputed in the backward)
            lp, ent = losses.head_logprobs_and_entropy(model.head, h_BxTxD[:, :-1], sl(batch["tokens_BxT"]),
                                                       self.head_chunk, unroll=self.unroll)
            logps.append((a, lp))
            ents.append((a, ent))
            new_rngs[name] = nnx.state(model, nnx.RngState)
        order = lambda xs: jnp.concatenate([x for _, x in sorted(xs, key=lambda t: t[0])], axis=0)  # noqa: E731
        return order(logps), order(ents), new_rngs

    def _step_fn(self, state, frozen, batch):
        TRACES["train_step"] += 1

        def loss_fn(params):
            logp, ent, new_rngs = self._logp(params, state["rngs"], frozen, batch)
            loss, metrics = losses.joint_loss(logp, ent, batch, self.loss_cfg)
            return loss, (metrics, new_rngs)

        grads, (metrics, new_rngs) = jax.grad(loss_fn, has_aux=True)(state["params"])
        new_params, new_opt = {}, {}
        for n in self.names:
            updates, new_opt[n] = self.tx.update(grads[n], state["opt"][n], state["params"][n])
            new_params[n] = optax.apply_updates(state["params"][n], updates)
            metrics[f"grad_norm_{n}"] = _norm(grads[n])
            # the divergence guard's inputs (see the module docstring). The update's norm is taken
            # as new - old params (what was applied; XLA keeps `updates` fused into the apply:
            # 2x fewer bytes than norming `updates`). Finite norms of the old params and of the
            # change vouch for the new params: an element past float32's range overflows them.
            p0 = _norm(state["params"][n])
            u = _norm(jax.tree.map(jnp.subtract, new_params[n], state["params"][n]))
            metrics[f"update_norm_{n}"] = u
            metrics[f"param_norm_{n}"] = p0
            metrics[f"update_ratio_{n}"] = jnp.where(p0 > 0, u / jnp.where(p0 > 0, p0, 1.0), 0.0)
            lr = optim.current_lr(new_opt[n])
            if lr is not None:
                metrics[f"lr_{n}"] = lr
        return {"step": state["step"] + 1, "params": new_params, "opt": new_opt, "rngs": new_rngs}, metrics

    # -- host API ---------------------------------------------------------------------------------
    def lower(self, batch: Mapping[str, Any]):
        """``jax.jit(step).lower(state, frozen, batch)``; ``batch`` may hold ShapeDtypeStructs."""
        arrays = {k: v for k, v in batch.items() if k in _STEP_KEYS}
        with _maybe_mesh(self.mesh):
            return self._jit.lower(self.state, self._frozen, arrays)

    def step(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """One update; returns device metrics (fetch them a step later to keep the device busy)."""
        B = sum(self.rows.values())
        if batch["tokens_BxT"].shape[0] != B:
            raise TrainError(f"batch has {batch['tokens_BxT'].shape[0]} rows, the step expects {B} "
                             f"({self.rows})")
        arrays = {k: v for k, v in batch.items() if k in _STEP_KEYS}
        if self._batch_sh is not None:
            arrays = {k: distributed.global_batch(np.asarray(v), self._batch_sh[str(np.ndim(v))])
                      for k, v in arrays.items()}
        with _maybe_mesh(self.mesh):
            self.state, metrics = self._jit(self.state, self._frozen, arrays)
        self._latest, self._latest_checked = metrics, False
        return metrics

    def check(self, metrics: Mapping[str, Any], step: int) -> dict[str, float]:
        """Fetch a step's metrics to the host and stop on divergence (``check_finite``)."""
        host = check_finite(metrics, step, self.max_update_ratio)
        if metrics is self._latest:
            self._latest_checked = True
        return host

    def check_latest(self) -> None:
        """Check the newest step now if nobody has (before a checkpoint of its state)."""
        if self._latest is not None and not self._latest_checked:
            self.check(self._latest, self.step_count)

    def sync_models(self) -> None:
        """Write the trained parameters back into the NNX models (for sampling, scoring, export);
        with several processes, as local copies (a collective: every process calls it)."""
        if self._synced is self.state:
            return
        for name in self.names:
            params, rngs = distributed.local_copy((self.state["params"][name], self.state["rngs"][name]))
            for r in ROLES:
                if self.role_name.get(r) == name:
                    nnx.update(self.models[r], params, rngs)
        self._synced = self.state

    @property
    def step_count(self) -> int:
        return int(self.state["step"])


_STEP_KEYS = ("tokens_BxT", "positions_BxT", "valid_BxT", "loss_mask_BxT", "reward_BxT",
              "behaviour_logp_BxT", "behaviour_mask_BxT", "role_B", "objective_B", "segments_BxT")


class _maybe_mesh:
    def __init__(self, mesh):
        self.mesh = mesh
        self._cm = None

    def __enter__(self):
        if self.mesh is not None:
            self._cm = jax.set_mesh(self.mesh)
            self._cm.__enter__()

    def __exit__(self, *exc):
        if self._cm is not None:
            self._cm.__exit__(*exc)


def _norm(tree: Any) -> jax.Array:
    """Global L2 norm in float32 (bf16 sums lose the small leaves)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)) if leaves \
        else jnp.zeros((), jnp.float32)


def check_finite(metrics: Mapping[str, Any], step: int,
                 max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO) -> dict[str, float]:
    """Fetch metrics to the host; stop (``TrainError``, one line naming the step and the role) on a
    NaN/inf loss, a non-finite gradient / update / parameter norm, or an update norm above
    ``max_update_ratio`` times the parameter norm (0: no ratio check)."""
    host = {k: float(np.asarray(v)) for k, v in metrics.items()}
    bad = [k for k, v in host.items() if not np.isfinite(v) and k.startswith(("loss", "rl", "il"))]
    if bad:
        raise TrainError(f"non-finite loss at step {step}: " + ", ".join(f"{k}={host[k]}" for k in bad))
    problems = []
    for n in [k[len("update_norm_"):] for k in host if k.startswith("update_norm_")]:
        nonfinite = [f"{w} norm {host[f'{w}_norm_{n}']}" for w in ("grad", "update", "param")
                     if not np.isfinite(host.get(f"{w}_norm_{n}", 0.0))]
        ratio = host.get(f"update_ratio_{n}", 0.0)
        if nonfinite:
            problems.append(f"{n}: non-finite " + ", ".join(nonfinite) + " (NaN/inf or past float32)")
        elif max_update_ratio > 0 and not ratio <= max_update_ratio:
            problems.append(f"{n}: update norm {host[f'update_norm_{n}']:.3g} is {ratio:.3g} x the "
                            f"parameter norm (limit max_update_ratio={max_update_ratio:g})")
    if problems:
        raise TrainError(f"training diverged at step {step}: " + "; ".join(problems) +
                         "; this step's state is not checkpointed (lower the learning rate)")
    return host
