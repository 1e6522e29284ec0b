"""Every stage's config checked before the first stage starts: one error naming the key, its value
and what is allowed (``ConfigError``). Run-time fields (the env's IL data, model sources, roles)
are derived first (``pipeline.stage_config``), so what is checked is what the stages will run.
The plain checks run first without JAX; the loss, optimizer and released-file names, which need
the library's modules (JAX, optax), are checked after them (``libraries``).
"""
from __future__ import annotations

import pathlib
from typing import Any, Iterable

from retroact_jax import benchmarks
from retroact_jax.stages import methods as methods_lib
from retroact_jax.stages.configs import SCHEDULES, as_list

POLICIES = ("lm", "scripted-gold")
BACKENDS = ("threads", "processes")
COMPARE = ("base", "il")   # eval.compare: earlier models evaluated beside the trained one


class ConfigError(ValueError):
    """A config value that cannot work, named with its key (a user error: no traceback needed)."""


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config.{key}={value!r}: {allowed}")


def _at_least(c: Any, prefix: str, keys: Iterable[str], low: float) -> None:
    for k in keys:
        v = _get(c, k)
        if v < low:
            raise _fail(f"{prefix}{k}", v, f"must be >= {low:g}")


def _choice(c: Any, prefix: str, key: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if _get(c, key) not in allowed:
        raise _fail(f"{prefix}{key}", _get(c, key), f"choose one of {', '.join(map(repr, allowed))}")


def _get(c: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        c = c[part]
    return c


def _buckets(c: Any, prefix: str, key: str, allow_empty: bool = False) -> None:
    raw = _get(c, key)
    items = as_list(raw)
    if (not items and not allow_empty) or not all(x.isdigit() and int(x) > 0 for x in items):
        raise _fail(f"{prefix}{key}", raw, "a comma list of positive integers")


def top_level(c: Any) -> None:
    """The run's own fields: env, methods, stages, policy, evaluation."""
    if c.env not in benchmarks.NAMES:
        raise _fail("env", c.env, f"choose one of {', '.join(benchmarks.NAMES)}")
    names = as_list(c.methods) or [c.method]
    for n in names:
        if n not in methods_lib.METHODS:
            key = "methods" if as_list(c.methods) else "method"
            raise _fail(key, n, f"choose one of {', '.join(methods_lib.METHODS)}")
        m = methods_lib.get(n)
        if not c.multi_agent and m.reflector != methods_lib.TRAINED:
            raise _fail("multi_agent", False, f"single-agent training applies to retroact only ({n} "
                        "has no trained reflector)")
        if m.rl and "rl" in (as_list(c.stages) or m.stages) and not benchmarks.get(c.env).train_split:
            raise _fail("env", c.env, f"has no train split, which method {n} needs (RL collects on it)")
    known = {s for n in names for s in methods_lib.get(n).stages}
    for s in as_list(c.stages):
        if s not in known:
            raise _fail("stages", c.stages, f"a subset of {', '.join(sorted(known))} (the stages of "
                        f"{', '.join(names)})")
    _choice(c, "", "model.policy", POLICIES)
    if c.model.policy == "lm":
        for key in ("model.planner", "model.reflector"):
            _packaged_model(c, key)
    _at_least(c, "", ("validation.num_tasks",), 0)
    if c.split == "validation" and c.validation.num_tasks < 1:
        raise _fail("split", c.split, "needs config.validation.num_tasks > 0 (the slice of the train split)")
    if c.validation.num_tasks and not benchmarks.get(c.env).train_split:
        raise _fail("validation.num_tasks", c.validation.num_tasks, f"{c.env} has no train split to slice")
    if c.model.policy == "scripted-gold" and as_list(c.stages) != ["eval"]:
        raise _fail("stages", c.stages, "model.policy=scripted-gold plays the gold script: set stages=eval")
    if c.rl_schedule and c.rl_schedule not in SCHEDULES:
        raise _fail("rl_schedule", c.rl_schedule, f"'' or one of {', '.join(SCHEDULES)}")
    _at_least(c, "", ("eval.trials", "eval.batch_size", "eval.env_workers"), 1)
    _at_least(c, "", ("eval.reflector_rows",), 0)
    _at_least(c, "", ("model.min_new_tokens", "eval.num_tasks", "eval.start_task", "eval.max_steps",
                      "eval.planner_max_tokens",
                      "eval.reflector_max_tokens", "eval.num_examples", "eval.temperature",
                      "eval.reflector_temperature"), 0)
    _at_least(c, "", ("eval.memory_last",), -1)
    if c.eval.env_backend:
        _choice(c, "", "eval.env_backend", BACKENDS)
    for k in as_list(c.eval.compare):
        if k not in COMPARE:
            raise _fail("eval.compare", c.eval.compare, f"a comma list of {', '.join(COMPARE)} ('' none)")
        untrained = [n for n in names if not methods_lib.get(n).il_roles]   # IL is every training's start
        if untrained:
            raise _fail("eval.compare", c.eval.compare, f"{', '.join(untrained)} trains no model: "
                        f"nothing to compare with {k!r}")
        if k == "il" and any(not methods_lib.get(n).rl for n in names):
            raise _fail("eval.compare", c.eval.compare, "'il' needs methods with an RL stage (without "
                        "one the trained model is the IL one)")


def _packaged_model(c: Any, key: str) -> None:
    """A packaged model's name (models/embedded.py) needs its PyPI packages: say how to install them."""
    from retroact_jax.models import embedded
    source = str(_get(c, key))
    if not embedded.is_packaged(source):
        return
    try:
        embedded.check_installed(source)
    except embedded.EmbeddedModelError as e:
        raise ConfigError(f"config.{key}={source!r}: {e}") from None


def optimizer(o: Any, prefix: str) -> None:
    """Name, kwargs (against the optax function's signature) and schedule, by building it."""
    from retroact_jax import optim
    cfg = o.to_dict()
    cfg["total_steps"] = int(cfg.get("total_steps") or 0) or int(cfg.get("warmup_steps", 0)) + 2
    try:
        optim.make_optimizer(cfg)
    except optim.OptimizerConfigError as e:
        raise ConfigError(f"config.{prefix}{e}") from None


def loss(lc: Any, prefix: str) -> None:
    from retroact_jax import losses
    try:
        losses.LossConfig.from_mapping(lc.to_dict())
    except (losses.LossConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"config.{prefix}loss: {e}") from None


def model(mc: Any, prefix: str) -> None:
    if mc.lora:
        _at_least(mc, prefix, ("lora_rank",), 1)
        if not 0.0 <= mc.lora_dropout < 1.0:
            raise _fail(f"{prefix}lora_dropout", mc.lora_dropout, "must be in [0, 1)")
        if not as_list(mc.lora_targets):
            raise _fail(f"{prefix}lora_targets", mc.lora_targets, "a comma list of module names")


def released(d: Any, prefix: str) -> None:
    from retroact_jax import released_data
    for name in as_list(d.released):
        if name not in released_data.FILES or released_data.FILES[name][2] != "il":
            il_files = [k for k, v in released_data.FILES.items() if v[2] == "il"]
            raise _fail(f"{prefix}released", d.released, f"a comma list of {', '.join(il_files)}")


def il_data(d: Any, prefix: str, roles: Iterable[str]) -> None:
    for env in as_list(d.expert_envs):
        if env not in benchmarks.NAMES or not benchmarks.get(env).train_split:
            ok = [n for n in benchmarks.NAMES if benchmarks.get(n).train_split]
            raise _fail(f"{prefix}expert_envs", d.expert_envs, f"a comma list of {', '.join(ok)}")
    for f in as_list(d.files):
        if not pathlib.Path(f).is_file():
            raise _fail(f"{prefix}files", d.files, f"{f} is not a file")
    if roles and not (as_list(d.released) or as_list(d.expert_envs) or as_list(d.files)):
        raise ConfigError(f"config.{prefix.rstrip('.')}: no IL data for this env (released, expert_envs "
                          "and files are all empty)")
    if not 0.0 <= d.expert_reflect_fraction <= 1.0:
        raise _fail(f"{prefix}expert_reflect_fraction", d.expert_reflect_fraction, "must be in [0, 1]")
    _at_least(d, prefix, ("expert_batch_size", "expert_env_workers"), 1)
    _at_least(d, prefix, ("expert_tasks",), -1)
    _at_least(d, prefix, ("expert_trials",), 0)
    _choice(d, prefix, "empty_reflections", ("keep", "skip"))


def il_stage(sc: Any) -> None:
    p = "il."
    model(sc.model, p + "model.")
    il_data(sc.data, p + "data.", as_list(sc.data.roles))
    _choice(sc, p, "data.long_rows", ("truncate", "drop"))
    _choice(sc, p, "train.observations", ("trained", "masked"))
    _at_least(sc, p, ("data.max_tokens", "train.epochs", "train.log_every", "train.keep_checkpoints"), 1)
    _at_least(sc, p, ("data.eval_rows", "data.max_rows_per_role", "train.max_steps", "train.eval_every",
                      "train.checkpoint_every", "train.max_update_ratio"), 0)
    _at_least(sc, p, tuple(f"train.rows_{r}" for r in as_list(sc.data.roles)), 1)
    _buckets(sc, p, "train.buckets")
    _choice(sc, p, "train.pack", (True, False))
    _at_least(sc, p, ("train.pack_len",), 0)
    if sc.train.pack and sc.loss.il_normalization != "tokens":
        raise _fail(f"{p}train.pack", sc.train.pack, "needs loss.il_normalization='tokens' (a packed row "
                    "would weight its samples differently under 'positions'); set it False")
    if sc.train.pack_len > max(int(b) for b in as_list(sc.train.buckets)):
        raise _fail(f"{p}train.pack_len", sc.train.pack_len, "must fit the largest bucket (0: that bucket)")
    o = sc.optimizer
    steps = int(o.total_steps) or int(sc.train.max_steps)
    if o.schedule != "constant" and 0 < steps <= o.warmup_steps:
        raise _fail(f"{p}optimizer.warmup_steps", o.warmup_steps,
                    f"must be below the stage's {steps} steps (or optimizer.schedule=constant)")


def rl_stage(sc: Any) -> None:
    p = "rl."
    model(sc.model, p + "model.")
    _at_least(sc, p, ("train.iterations", "train.epochs", "train.rows_planner", "train.rows_reflector",
                      "train.log_every", "train.keep_checkpoints", "collect.trials", "collect.batch_size",
                      "collect.env_workers", "collect.score_rows", "eval.num_tasks", "eval.trials",
                      "eval.batch_size"), 1)
    _at_least(sc, p, ("train.il_rows_planner", "train.il_rows_reflector", "train.checkpoint_every",
                      "collect.tasks_per_iteration", "collect.max_steps", "collect.planner_max_tokens",
                      "collect.reflector_max_tokens", "collect.temperature", "collect.reflector_temperature",
                      "eval.every", "eval.temperature", "train.max_update_ratio",
                      "collect.reflector_rows"), 0)
    if not 0.0 < sc.collect.top_p <= 1.0:
        raise _fail(f"{p}collect.top_p", sc.collect.top_p, "must be in (0, 1]")
    if sc.train.alpha <= 0:
        raise _fail(f"{p}train.alpha", sc.train.alpha, "must be > 0")
    _choice(sc, p, "train.observations", ("trained", "masked"))
    _choice(sc, p, "train.reflector_reward", ("delta_scaled", "delta"))
    if sc.collect.env_backend:
        _choice(sc, p, "collect.env_backend", BACKENDS)
    _buckets(sc, p, "train.buckets")
    for k in ("batch_buckets", "chunk_buckets", "cache_buckets", "new_token_buckets", "score_buckets"):
        _buckets(sc, p, f"collect.{k}", allow_empty=True)
    _at_least(sc, p, ("replay.capacity", "replay.max_age", "replay.max_chars", "replay.max_tokens"), 0)
    if uses_il_data(sc):
        il_data(sc.il_data, p + "il_data.", ["planner"])
    if sc.eval.every and sc.eval.split == "validation" and not sc.get("validation"):
        raise _fail(f"{p}eval.split", sc.eval.split, "needs config.validation.num_tasks > 0")


def uses_il_data(sc: Any) -> bool:
    return bool(sc.loss.il_coef and (sc.train.il_rows_planner or sc.train.il_rows_reflector)
                and sc.method != "sft_ei")


def expert(d: Any, prefix: str) -> None:
    """A model expert (``expert`` = a model source) only where it is built for the env."""
    if d.expert == "gold" or not as_list(d.expert_envs):
        return
    from retroact_jax.stages import expert as expert_lib
    try:
        expert_lib.check(as_list(d.expert_envs), expert_lib.ExpertConfig(expert=str(d.expert)))
    except expert_lib.ExpertError as e:
        raise ConfigError(f"config.{prefix}expert={d.expert!r}: {e}") from None


def libraries(sc: Any, stage: str) -> None:
    """The checks that need the library (loss names, optimizer signature, released files, expert)."""
    p = f"{stage}."
    if stage == "il" or uses_il_data(sc):
        d, dp = (sc.data, p + "data.") if stage == "il" else (sc.il_data, p + "il_data.")
        released(d, dp)
        expert(d, dp)
    loss(sc.loss, p)
    optimizer(sc.optimizer, p)


def validate(c: Any) -> None:
    """The whole run's config, every stage of every method, before anything runs."""
    from retroact_jax.stages import pipeline
    top_level(c)
    configs = []
    for name in pipeline.method_names(c):
        m = methods_lib.get(name)
        for stage in pipeline.stages_of(c, m):
            if stage in ("il", "rl"):
                sc = pipeline.stage_config(c, stage, m)
                (il_stage if stage == "il" else rl_stage)(sc)
                configs.append((sc, stage))
    for sc, stage in configs:
        libraries(sc, stage)
