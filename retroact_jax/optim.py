"""Optimizers from config: any optax optimizer by name + kwargs, a warmup/decay schedule,
gradient clipping and accumulation.

Config (ml_collections or dict):
    name: "adamw"            any optax function name that takes ``learning_rate`` (adamw, adam, sgd,
                             lion, adafactor, ...); unknown names fail listing close matches
    kwargs: {...}            passed through (e.g. weight_decay, b1, b2); unknown kwargs fail
    learning_rate: 1e-4      peak learning rate
    schedule: "linear"       "constant" | "linear" (warmup then linear decay to end_lr, HF default)
                             | "cosine" (warmup then cosine decay)
    warmup_steps: 100
    total_steps: 1000        optimizer updates (after accumulation)
    end_lr_ratio: 0.0
    grad_clip_norm: 1.0      global-norm clipping (0 or None = off); HF's max_grad_norm default
    accumulate_steps: 1      gradient accumulation (optax.MultiSteps) over micro-batches
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Mapping

import jax
import optax


class OptimizerConfigError(ValueError):
    pass


def _get(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default) if hasattr(cfg, key) else default


def make_schedule(cfg: Any) -> optax.Schedule:
    lr = float(_get(cfg, "learning_rate", 1e-4))
    kind = _get(cfg, "schedule", "linear")
    warmup = int(_get(cfg, "warmup_steps", 0))
    total = int(_get(cfg, "total_steps", 1000))
    end = lr * float(_get(cfg, "end_lr_ratio", 0.0))
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
            [max(warmup, 1)]) if warmup else optax.constant_schedule(lr)
    if total <= warmup:
        raise OptimizerConfigError(f"optimizer.total_steps={total} must exceed warmup_steps={warmup}")
    if kind == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr),
             optax.linear_schedule(lr, end, total - warmup)], [warmup])
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end)
    raise OptimizerConfigError(f"optimizer.schedule={kind!r}; valid: constant, linear, cosine")


def make_optimizer(cfg: Any) -> optax.GradientTransformation:
    name = _get(cfg, "name", "adamw")
    fn = getattr(optax, name, None)
    if fn is None or not callable(fn):
        close = difflib.get_close_matches(str(name), [n for n in dir(optax) if not n.startswith("_")])
        raise OptimizerConfigError(f"optimizer.name={name!r} is not an optax optimizer; "
                                   f"close matches: {close}")
    kwargs = dict(_get(cfg, "kwargs", None) or {})
    params = inspect.signature(fn).parameters
    if "learning_rate" not in params:
        raise OptimizerConfigError(f"optax.{name} takes no learning_rate; not an optimizer")
    bad = [k for k in kwargs if k not in params and not any(
        p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())]
    if bad:
        raise OptimizerConfigError(f"optimizer.kwargs {bad} are not arguments of optax.{name}; "
                                   f"valid: {sorted(k for k in params if k != 'learning_rate')}")

    @optax.inject_hyperparams
    def build(learning_rate):
        return fn(learning_rate=learning_rate, **kwargs)

    parts = []
    clip = _get(cfg, "grad_clip_norm", 1.0)
    if clip:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(build(learning_rate=make_schedule(cfg)))
    tx = optax.chain(*parts)
    k = int(_get(cfg, "accumulate_steps", 1))
    if k < 1:
        raise OptimizerConfigError(f"optimizer.accumulate_steps must be >= 1, got {k}")
    return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx


def current_lr(opt_state: Any) -> Any:
    """The learning rate of the last update (from inject_hyperparams), for logging."""
    found = []

    def is_inject(s):
        return hasattr(s, "hyperparams") and isinstance(s.hyperparams, Mapping)

    def visit(s):
        if is_inject(s):
            found.append(s.hyperparams["learning_rate"])
        return s

    jax.tree_util.tree_map(visit, opt_state, is_leaf=is_inject)
    return found[0] if found else None
