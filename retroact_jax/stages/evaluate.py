"""The eval stage: K trials of the method's agent on the test tasks, IR / FR / AR, Table 2 outputs.

The planner (and the reflector where the method has one) come from the newest export of the
method's run directory (RL > IL) or, with none, from ``config.model``. The reflector is what the
method says (``methods.Method.reflector``): trained (its export), prompted (the base model with
few-shot exemplars, Reflexion) or absent (one trial; the score carries over to trial K, so
IR = FR = AR). ``model.policy = "scripted-gold"`` plays the benchmark's gold script instead (an
end-to-end check of env, loop and metrics). Outputs in ``<method dir>/eval/``: trajectories.jsonl
(resumable), results.json, results.md, metrics.png. Several processes (README "Several hosts"):
each plays task ``i mod N`` of the list in ``eval/process-<p>-of-<N>/`` (resumable), the records
are gathered and process 0 writes trajectories.jsonl (all of them) and the results.

``config.eval.compare`` evaluates earlier models of the same run on the same tasks as well, each
with the method's agent: ``base`` (``config.model``, untrained) and ``il`` (the IL exports), in
``<method dir>/eval_<name>/``; ``compare.md`` puts them beside the trained one (valid-action rate,
IR / FR of each metric: does training change the agent?).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

from retroact_jax import benchmarks, distributed, evaluation
from retroact_jax.stages import StageError
from retroact_jax.stages import holdout, methods as methods_lib
from retroact_jax.stages.configs import as_list

log = logging.getLogger(__name__)


def exports(stage_dir: pathlib.Path, stage: str) -> dict[str, str]:
    """{name: hf dir} a finished ``stage`` (il | rl) exported in ``stage_dir`` ({} if none)."""
    f = stage_dir / f"{stage}_summary.json"
    return dict(json.loads(f.read_text()).get("export") or {}) if f.exists() else {}


def role_sources(exported: dict, fallback: tuple[str, str]) -> tuple[str, str]:
    """(planner source, reflector source) from a stage's exports, else ``fallback``."""
    if "shared" in exported:
        return exported["shared"], exported["shared"]
    return exported.get("planner", fallback[0]), exported.get("reflector", fallback[1])


def trained_sources(c: Any, method_dir: pathlib.Path, il_dir: pathlib.Path) -> tuple[str, str]:
    """The newest trained (planner, reflector) sources of a method's run: RL > IL > config.model."""
    base = (c.model.planner, c.model.reflector or c.model.planner)
    got = role_sources(exports(il_dir, "il"), base)
    return role_sources(exports(method_dir / "rl", "rl"), got)


def _policy(source: str, lora: str, c: Any, cache: dict, hold_cache: bool = True):
    """An LMPolicy over (model source, LoRA adapter); one model per distinct pair (``hold_cache``:
    lm_policy.py; False for the reflector)."""
    from retroact_jax import sampling
    from retroact_jax.agent.lm_policy import LMPolicy
    from retroact_jax.stages import setup
    if (source, lora) not in cache:
        model, tok, _ = setup.load_one(source, c.model.param_dtype, 0)
        from retroact_jax.models.decoder import set_memory_options
        set_memory_options(model, attention=c.model.attention)
        from retroact_jax.models import lora as lora_lib
        for adapter in as_list(lora):      # merged in turn, as the stages' exports (IL, then RL on it)
            lora_lib.load_lora(model, adapter)
            lora_lib.merge_lora(model)
        pad = tok.pad_id if tok.pad_id is not None else 0
        kw = {name: tuple(int(x) for x in as_list(c.eval[k]))
              for name, k in (("length_buckets", "cache_buckets"), ("chunk_buckets", "chunk_buckets"))}
        cache[(source, lora)] = (sampling.Sampler(model, pad_id=pad, eos_ids=tok.eos_ids,
                                                  **{n: v for n, v in kw.items() if v}), tok)
    sampler, tok = cache[(source, lora)]
    return LMPolicy(sampler, tok, incremental=bool(c.model.incremental),
                    min_new_tokens=int(c.model.min_new_tokens), hold_cache=hold_cache)


def model_sources(c: Any, model: str, method_dir: pathlib.Path, il_dir: pathlib.Path) -> tuple[str, str]:
    """(planner, reflector) sources of ``model``: trained (the newest: RL > IL > base) | il | base."""
    base = (c.model.planner, c.model.reflector or c.model.planner)
    if model == "base":
        return base
    return role_sources(exports(il_dir, "il"), base) if model == "il" else trained_sources(c, method_dir, il_dir)


def policies(c: Any, m: methods_lib.Method, method_dir: pathlib.Path, il_dir: pathlib.Path, tasks: dict,
             model: str = "trained"):
    """(planner, reflector or None) of the method, with the models of ``model_sources``."""
    wants_reflector = m.reflector != methods_lib.NONE
    if c.model.policy == "scripted-gold":
        from retroact_jax.agent import gold
        pol = gold.gold_policy(tasks)
        return pol, (pol if wants_reflector else None)
    planner_src, reflector_src = model_sources(c, model, method_dir, il_dir)
    trained = planner_src != c.model.planner
    if trained:
        log.info("eval: planner %s, reflector %s", planner_src, reflector_src if wants_reflector else "none")
    cache: dict = {}
    planner = _policy(planner_src, "" if trained else c.model.planner_lora, c, cache)
    if not wants_reflector:
        return planner, None
    if m.reflector == methods_lib.PROMPTED:
        reflector_src = c.model.reflector or c.model.planner
    lora = "" if reflector_src != (c.model.reflector or c.model.planner) else c.model.reflector_lora
    return planner, _policy(reflector_src, lora, c, cache, hold_cache=False)


def backbone_name(c: Any) -> str:
    """The Table 2 backbone label: ``config.backbone``, else the planner source's name."""
    if c.backbone:
        return c.backbone
    from retroact_jax.models import embedded
    src = str(c.model.planner)
    if embedded.is_packaged(src):
        return embedded.get(src).label
    return pathlib.Path(src.rstrip("/")).name or src


def eval_tasks(c: Any) -> tuple[str, list[int]]:
    """(env split, task indices) evaluated: ``eval.num_tasks`` from ``eval.start_task`` of ``config.split``
    (the paper's split by default); ``split = "validation"`` = the validation slice of the train split
    (``holdout.py``: for tuning, never trained on in the same run)."""
    import envs
    bench = benchmarks.get(c.env)
    split = c.split or bench.eval_split
    num_tasks = int(c.eval.num_tasks) or bench.eval_tasks
    if split == holdout.SPLIT:
        held = holdout.Slice(c.env, int(c.validation.num_tasks), int(c.validation.seed))
        pool, split = held.indices, held.train_split
    else:
        probe = envs.make(c.env, split)
        try:
            pool = list(range(len(probe.tasks)))
        finally:
            probe.close()
    if c.eval.start_task >= len(pool):
        raise StageError(f"config.eval.start_task={c.eval.start_task} but {c.env}/{c.split or split} has "
                         f"{len(pool)} tasks")
    return split, pool[c.eval.start_task: c.eval.start_task + num_tasks]


def run_eval(c: Any, m: methods_lib.Method, method_dir: pathlib.Path, il_dir: pathlib.Path,
             multi_agent: bool = True, model: str = "trained") -> dict:
    """Run (or resume) the evaluation of method ``m`` with ``model`` (``model_sources``) in
    ``eval_dir(method_dir, model, c.split)``; returns its results (results.json)."""
    import envs
    from retroact_jax.agent import loop, rollout
    bench = benchmarks.get(c.env)
    split, indices = eval_tasks(c)
    probe = envs.make(c.env, split)
    try:
        tasks = {i: probe.task_at(i) for i in indices}
    finally:
        probe.close()
    planner, reflector = policies(c, m, method_dir, il_dir, tasks, model)
    p_ex = r_ex = None
    if m.few_shot:
        from retroact_jax.agent import fewshot
        p_ex = fewshot.planner_examples(c.env, c.eval.num_examples)
        if m.reflector == methods_lib.PROMPTED:
            r_ex = fewshot.reflector_examples(c.env, c.eval.num_examples)
    cfg = loop.AgentConfig(
        trials=m.eval_trials(int(c.eval.trials)), batch_size=c.eval.batch_size,
        temperature=c.eval.temperature, reflector_temperature=c.eval.reflector_temperature,
        seed=c.eval.seed, env_workers=c.eval.env_workers, max_steps=c.eval.max_steps or None,
        planner_max_tokens=c.eval.planner_max_tokens or None,
        reflector_max_tokens=c.eval.reflector_max_tokens or None,
        memory_last="default" if c.eval.memory_last < 0 else c.eval.memory_last,
        reflector_rows=int(c.eval.reflector_rows))
    out = eval_dir(method_dir, model, c.split)
    out.mkdir(parents=True, exist_ok=True)
    # several processes: each plays its share of the tasks (in out/process-<p>-of-<N>/), the records
    # are gathered and process 0 writes them in (task, trial) order with the results
    recs, summary = rollout.evaluate_shared(
        c.env, split, indices, planner, reflector, cfg, out, summary_trials=int(c.eval.trials),
        env_backend=c.eval.env_backend or bench.env_backend, planner_examples=p_ex,
        reflector_examples=r_ex, show_progress=c.eval.progress)
    stats = _gathered_stats({role: dict(p.stats) for role, p in (("planner", planner), ("reflector", reflector))
                             if p is not None and hasattr(p, "stats")})
    peaks = {role: p.memory.peak for role, p in (("planner", planner), ("reflector", reflector))
             if p is not None and getattr(p, "memory", None) is not None and p.memory.peak}
    extra = {"run": m.run_name(multi_agent), "policy_stats": stats, "memory_peak": peaks, "reflector": m.reflector,
             "trials_per_task": cfg.trials, "model": model, "sources": _sources(c, m, model, method_dir, il_dir)}
    if distributed.is_main():
        if distributed.count() > 1:
            _write_records(out / "trajectories.jsonl", recs)
        evaluation.write_outputs(out, summary, backbone_name(c), m.row_label(multi_agent), extra)
    log.info("%s (%s model): %s, valid actions %s", m.run_name(multi_agent), model, json.dumps(
        {k: {x: round(v[x], 2) for x in ("IR", "FR", "AR")} for k, v in summary["metrics"].items()}),
        summary["actions"]["valid_rate"])
    return json.loads(json.dumps(evaluation.results_row(summary, backbone_name(c), m.row_label(multi_agent), extra)))


def _gathered_stats(stats: dict) -> dict:
    """The sampler counters of every process, summed (this process's alone with one)."""
    parts = distributed.allgather_json(stats)
    return {role: {k: sum(p[role].get(k, 0) for p in parts) for k in sorted({k for p in parts for k in p[role]})}
            for role in parts[0]}


def _write_records(path: pathlib.Path, recs: list[dict]) -> None:
    """Every process's trial records as one trajectories.jsonl (written whole, then renamed)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    os.replace(tmp, path)


def _sources(c: Any, m: methods_lib.Method, model: str, method_dir: pathlib.Path, il_dir: pathlib.Path) -> dict:
    """The model sources the evaluation played, for results.json."""
    if c.model.policy == "scripted-gold":
        return {"planner": "scripted-gold"}
    planner, reflector = model_sources(c, model, method_dir, il_dir)
    if m.reflector == methods_lib.PROMPTED:
        reflector = c.model.reflector or c.model.planner
    return {"planner": planner, **({"reflector": reflector} if m.reflector != methods_lib.NONE else {})}


def eval_dir(method_dir: pathlib.Path, model: str = "trained", split: str = "") -> pathlib.Path:
    """``eval`` (the trained model), ``eval_<model>`` (base / il); a split other than the paper's
    (``config.split``, e.g. validation) gets its own ``..._<split>`` directory, so tuning runs and the
    test run share the trained stages of one run dir and never each other's trajectories."""
    name = "eval" if model == "trained" else f"eval_{model}"
    return method_dir / (f"{name}_{split}" if split else name)


def compare_label(m: methods_lib.Method, model: str) -> str:
    """base | IL | RL: what the model has been through (``trained`` = the method's last stage)."""
    if model == "trained":
        model = "rl" if m.rl else "il" if m.il_roles else "base"
    return {"base": "base (untrained)", "il": "IL", "rl": "IL + RL"}[model]
