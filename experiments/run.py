"""Entry point: ``python -m experiments.run --config=experiments/configs/<env>.py [--config.x=y]``.

The config (ml_collections, locked: an unknown key fails with its name) names the stages to run in
order (``--config.stages=eval``). Each stage is a function ``stage(config) -> None`` registered in
``STAGES``; the training stages (``il``, ``rl``) register themselves there when they land.
"""
from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-host: host:port of process 0 (jax.distributed.initialize); "
    "unset on a single host")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_COMPILE_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/retroact_jax/xla",
    "persistent XLA compilation cache directory ('' = off): later runs skip recompiling")

METHODS = ("retroact", "reflexion", "react")
POLICIES = ("lm", "scripted-gold")


class ConfigError(ValueError):
    """A config value that cannot work, named with the key."""


def _check(c) -> None:
    import envs
    if c.env not in envs.REGISTRY:
        raise ConfigError(f"config.env={c.env!r}: known envs are {sorted(envs.REGISTRY)}")
    if c.method not in METHODS:
        raise ConfigError(f"config.method={c.method!r}: choose one of {METHODS}")
    if c.model.policy not in POLICIES:
        raise ConfigError(f"config.model.policy={c.model.policy!r}: choose one of {POLICIES}")
    for k in ("num_tasks", "trials", "batch_size", "env_workers"):
        if int(c.eval[k]) < 1:
            raise ConfigError(f"config.eval.{k} must be >= 1, got {c.eval[k]}")
    if c.eval.start_task < 0:
        raise ConfigError(f"config.eval.start_task must be >= 0, got {c.eval.start_task}")


def _lm_policy(source: str, lora: str, c, cache: dict):
    """An LMPolicy over (model source, LoRA); models are shared between roles when identical."""
    from retroact_jax import sampling
    from retroact_jax.agent.lm_policy import LMPolicy
    key = (source, lora)
    if key not in cache:
        from retroact_jax.models import hub
        model, tok, _ = hub.load_pretrained(source, param_dtype=c.model.param_dtype)
        from retroact_jax.models.decoder import set_memory_options
        set_memory_options(model, attention=c.model.attention)
        if lora:
            from retroact_jax.models import lora as lora_lib
            lora_lib.load_lora(model, lora)
        pad = tok.pad_id if tok.pad_id is not None else 0
        kw = {name: tuple(int(x) for x in str(c.eval[k]).split(",") if x.strip())
              for name, k in (("length_buckets", "cache_buckets"), ("chunk_buckets", "chunk_buckets"))}
        kw = {name: v for name, v in kw.items() if v}
        cache[key] = (sampling.Sampler(model, pad_id=pad, eos_ids=tok.eos_ids, **kw), tok)
    sampler, tok = cache[key]
    return LMPolicy(sampler, tok, incremental=bool(c.model.incremental),
                    min_new_tokens=int(c.model.min_new_tokens))


def build_policies(c, tasks_by_index):
    """(planner, reflector or None) for the config's method and policy kind."""
    wants_reflector = c.method != "react"
    if c.model.policy == "scripted-gold":
        from retroact_jax.agent import gold
        pol = gold.gold_policy(tasks_by_index)
        return pol, (pol if wants_reflector else None)
    cache: dict = {}
    planner = _lm_policy(c.model.planner, c.model.planner_lora, c, cache)
    if not wants_reflector:
        return planner, None
    reflector = _lm_policy(c.model.reflector or c.model.planner, c.model.reflector_lora, c, cache)
    return planner, reflector


def stage_eval(c) -> None:
    import envs
    from retroact_jax import evaluation
    from retroact_jax.agent import loop, rollout
    _check(c)
    probe = envs.make(c.env, c.split)
    try:
        n_all = len(probe.tasks)
        hi = min(n_all, c.eval.start_task + c.eval.num_tasks)
        if c.eval.start_task >= n_all:
            raise ConfigError(f"config.eval.start_task={c.eval.start_task} but {c.env}/{c.split} has "
                              f"{n_all} tasks")
        indices = list(range(c.eval.start_task, hi))
        tasks = {i: probe.task_at(i) for i in indices}
    finally:
        probe.close()
    planner, reflector = build_policies(c, tasks)
    p_ex = r_ex = None
    if c.method in ("react", "reflexion"):
        from retroact_jax.agent import fewshot
        p_ex = fewshot.planner_examples(c.env, c.eval.num_examples)
        if c.method == "reflexion":
            r_ex = fewshot.reflector_examples(c.env, c.eval.num_examples)
    trials = 1 if c.method == "react" else int(c.eval.trials)
    cfg = loop.AgentConfig(
        trials=trials, batch_size=c.eval.batch_size, temperature=c.eval.temperature,
        reflector_temperature=c.eval.reflector_temperature, seed=c.eval.seed,
        env_workers=c.eval.env_workers, max_steps=c.eval.max_steps or None,
        planner_max_tokens=c.eval.planner_max_tokens or None,
        reflector_max_tokens=c.eval.reflector_max_tokens or None,
        memory_last="default" if c.eval.memory_last < 0 else c.eval.memory_last)
    run_dir = pathlib.Path(c.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(c.to_json_best_effort(indent=2) + "\n")
    summary = rollout.evaluate(
        c.env, c.split, indices, planner, reflector, cfg, run_dir,
        summary_trials=int(c.eval.trials), env_backend=c.eval.env_backend,
        planner_examples=p_ex, reflector_examples=r_ex, show_progress=c.eval.progress)
    backbone = c.backbone or c.model.planner
    stats = {}
    for role, pol in (("planner", planner), ("reflector", reflector)):
        if pol is not None and hasattr(pol, "stats"):
            stats[role] = dict(pol.stats)
    evaluation.write_outputs(run_dir, summary, backbone, c.method, {"policy_stats": stats})
    logging.info("results: %s", json.dumps({m: {k: round(v[k], 2) for k in ("IR", "FR", "AR")}
                                            for m, v in summary["metrics"].items()}))
    print((run_dir / "results.md").read_text())


def _stage_dir(c, stage: str) -> pathlib.Path:
    return pathlib.Path(c.run_dir) / stage


def _exports(c, stage: str) -> dict:
    """{name: hf dir} a finished stage exported in this run_dir ({} if none)."""
    f = _stage_dir(c, stage) / f"{stage}_summary.json"
    if not f.exists():
        return {}
    return dict(json.loads(f.read_text()).get("export") or {})


def _role_sources(exported: dict, fallback: tuple[str, str]) -> tuple[str, str]:
    """(planner source, reflector source) from a stage's exports, else ``fallback``."""
    if "shared" in exported:
        return exported["shared"], ""
    planner = exported.get("planner", fallback[0])
    reflector = exported.get("reflector", fallback[1] or fallback[0])
    return planner, ("" if reflector == planner else reflector)


def stage_il(c) -> None:
    from retroact_jax.rl import il_stage
    il = c.il
    il.model.planner, il.model.reflector = c.model.planner, c.model.reflector
    summary = il_stage.run_il(il, _stage_dir(c, "il"))
    logging.info("il: %s", json.dumps({k: summary.get(k) for k in ("steps", "eval", "export")}))


def stage_rl(c) -> None:
    from retroact_jax.rl import rl_stage
    rl = c.rl
    rl.env = c.env
    rl.model.planner, rl.model.reflector = _role_sources(
        _exports(c, "il"), (c.model.planner, c.model.reflector))
    expert = _stage_dir(c, "il") / "expert" / c.env / "il_samples.jsonl"
    if expert.exists() and str(expert) not in rl.il_data.files:
        rl.il_data.files = ",".join(x for x in (rl.il_data.files, str(expert)) if x)
    summary = rl_stage.run_rl(rl, _stage_dir(c, "rl"))
    logging.info("rl: %s", json.dumps({k: summary.get(k) for k in ("iterations", "export")}))


def stage_eval_trained(c) -> None:
    """Evaluation of the newest trained models of this run_dir (rl > il > c.model)."""
    base = (c.model.planner, c.model.reflector)
    il = _role_sources(_exports(c, "il"), base)
    rl_exp = _exports(c, "rl")
    planner, reflector = _role_sources(rl_exp, il) if rl_exp else il
    if (planner, reflector) != base:
        logging.info("eval: planner %s, reflector %s", planner, reflector or "(planner's)")
        c.model.planner, c.model.reflector = planner, reflector
        c.model.planner_lora = c.model.reflector_lora = ""
        if not c.backbone:
            c.backbone = "trained"
    stage_eval(c)


STAGES = {"il": stage_il, "rl": stage_rl, "eval": stage_eval_trained}


def _init_jax() -> None:
    """Multi-host start (when the flags say so) and the persistent compilation cache."""
    import os

    import jax
    if _COORDINATOR.value:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
        logging.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(),
                     jax.process_count(), jax.device_count())
    if _COMPILE_CACHE.value:
        path = os.path.expanduser(_COMPILE_CACHE.value)
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class _QuietLibraries:
    """Drops the INFO lines of checkpointing libraries (Orbax logs every save at INFO through
    absl); their warnings and errors, and all of ours, still show. ``--verbosity=1`` keeps all."""
    NOISY = ("/orbax/",)

    def filter(self, record) -> bool:
        return (record.levelno > 20 or logging.get_verbosity() > 0
                or not any(n in record.pathname for n in self.NOISY))


def main(argv) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    c = _CONFIG.value
    if c is None:
        raise app.UsageError("--config=experiments/configs/<name>.py is required")
    _init_jax()
    stages = [s.strip() for s in str(c.stages).split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"config.stages: unknown stage(s) {unknown}; available: {sorted(STAGES)}")
    from retroact_jax import metrics
    metrics.compile_counters()          # start counting compile time before the first stage
    for s in stages:
        logging.info("stage %s", s)
        with metrics.StageMemory(s) as mem:
            STAGES[s](c)
        logging.info("%s", mem.line())
        _record_stage(c, s, mem.summary)


def _record_stage(c, stage: str, summary: dict) -> None:
    """Add a stage's memory / time figures to ``<run_dir>/stages.json`` ({stage: figures})."""
    path = pathlib.Path(c.run_dir) / "stages.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    old[stage] = summary
    path.write_text(json.dumps(old, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(app.run(main))
