"""Methods run as whole pipelines, several methods of one env merged into one table.

    results = pipeline.run(config)          # experiments/run.py: validate, then this

For each method of ``config.methods`` (or ``config.method``) the pipeline runs the method's stages
(``methods.Method.stages``, or the ``config.stages`` subset) in its directory and evaluates it:

    <run_dir>/il_<roles>[_single]/     the IL stage; methods with the same IL roles share it
    <run_dir>/<method>[_single]/rl/    the RL stage, from the IL exports
    <run_dir>/<method>[_single]/eval/  trajectories, results.{json,md}, metrics.png
    <run_dir>/results.{json,md}, metrics.png   every evaluated method in one Table 2 layout

A stage that finished with the same stage config is skipped on a rerun (its summary and
``stage_config.json`` say so); an unfinished one resumes from its checkpoints and trajectory files.
Several processes (README "Several hosts"): every process runs every stage (the stages divide their
work), process 0 alone writes the pipeline's files (config.json, stages.json, stage_config.json,
compare.md, results.*), every decision to skip is process 0's, and the processes wait for each other
after each stage, so the next one reads what the last one wrote.
The run-time fields of each stage's config are derived here from the top-level config
(``stage_config``): model sources, roles, the RL method, the IL data of the env.
"""
from __future__ import annotations

import copy
import json
import logging
import pathlib
from typing import Any, Mapping

import ml_collections as mlc

from retroact_jax import benchmarks, distributed, evaluation
from retroact_jax.stages import StageError, evaluate, methods as methods_lib
from retroact_jax.stages.configs import apply_schedule, as_list

log = logging.getLogger(__name__)
MODEL_FIELDS = ("planner", "reflector", "multi_agent", "param_dtype")   # set per run, not per stage


def resolve(c: Any) -> None:
    """The top-level fields derived from the env: the run directory."""
    if not c.run_dir:
        c.run_dir = f"runs/{c.env}"
    if c.env in benchmarks.NAMES and not c.model.min_new_tokens:
        c.model.min_new_tokens = benchmarks.get(c.env).min_new_tokens


def method_names(c: Any) -> list[str]:
    return as_list(c.methods) or [c.method]


def stages_of(c: Any, m: methods_lib.Method) -> list[str]:
    chosen = as_list(c.stages)
    return [s for s in m.stages if not chosen or s in chosen]


def il_dir(c: Any, m: methods_lib.Method) -> pathlib.Path:
    single = "_single" if not m.multi_agent(c.multi_agent) and len(m.il_roles) > 1 else ""
    return pathlib.Path(c.run_dir) / f"il_{'+'.join(m.il_roles)}{single}"


def method_dir(c: Any, m: methods_lib.Method) -> pathlib.Path:
    return pathlib.Path(c.run_dir) / m.run_name(m.multi_agent(c.multi_agent))


def _il_data(c: Any, data: Any) -> None:
    """``auto`` IL sources of the env: RetroAct's released file, else the expert on the train split."""
    bench = benchmarks.get(c.env)
    if data.released == "auto":
        data.released = bench.released_il
    if data.expert_envs == "auto":
        data.expert_envs = c.env if not data.released and bench.train_split else ""


def stage_config(c: Any, stage: str, m: methods_lib.Method) -> mlc.ConfigDict:
    """The IL or RL stage's own config, with its run-time fields derived from ``c``."""
    sc = mlc.ConfigDict(c[stage].to_dict())
    sc.model.multi_agent = m.multi_agent(c.multi_agent)
    sc.model.param_dtype = c.model.param_dtype
    if c.validation.num_tasks > 0:          # held out of the expert, the released rows and RL collection
        sc.validation = {"env": c.env, "num_tasks": int(c.validation.num_tasks), "seed": int(c.validation.seed)}
    if stage == "il":
        sc.model.planner, sc.model.reflector = c.model.planner, c.model.reflector
        sc.data.roles = ",".join(m.il_roles)
        _il_data(c, sc.data)
        return sc
    base = (c.model.planner, c.model.reflector or c.model.planner)
    planner, reflector = evaluate.role_sources(evaluate.exports(il_dir(c, m), "il"), base)
    sc.model.planner, sc.model.reflector = planner, ("" if reflector == planner else reflector)
    sc.env, sc.method = c.env, m.rl
    if not sc.collect.min_new_tokens:
        sc.collect.min_new_tokens = c.model.min_new_tokens
    if sc.il_data.expert_envs == "auto":      # the IL stage's expert rollouts, read from its cache
        sc.il_data.expert_workdir = str(il_dir(c, m))
        for k in ("expert", "expert_tasks", "expert_trials", "expert_reflect_fraction", "expert_batch_size",
                  "expert_env_workers"):
            sc.il_data[k] = c.il.data[k]
    _il_data(c, sc.il_data)
    if c.rl_schedule:
        apply_schedule(sc, c.rl_schedule)
    return sc


# How a stage runs: a finished stage or eval whose config differs from the current one only in these
# settings is not redone (rows per scoring / reflector call, a progress bar). They change no greedy
# output beyond float rounding; sampled draws (temperature > 0: RL collection) depend on a call's
# rows, as on the batch's composition already, and are as reproducible.
EXECUTION_ONLY = ("collect.score_rows", "collect.reflector_rows", "eval.reflector_rows", "eval.progress")


def _what(cfg: dict) -> dict:
    """``cfg`` without its ``EXECUTION_ONLY`` settings."""
    out = copy.deepcopy(cfg)
    for key in EXECUTION_ONLY:
        section, name = key.split(".")
        if isinstance(out.get(section), dict):
            out[section].pop(name, None)
    return out


def _same(f: pathlib.Path, cfg: dict) -> bool:
    return f.exists() and _what(json.loads(f.read_text())) == _what(cfg)


def _finished(d: pathlib.Path, name: str, cfg: dict) -> bool:
    return distributed.agree((d / f"{name}_summary.json").exists() and _same(d / "stage_config.json", cfg))


def _write(path: pathlib.Path, text: str) -> None:
    if distributed.is_main():
        path.write_text(text)


_SUMMED_COUNTS = ("compiles", "cache_hits", "cache_misses", "compiled_releases")   # StageMemory.summary
_SUMMED_AMOUNTS = ("wall_s", "compile_s", "compiled_released_gb")


def merge_segments(before: Mapping, after: Mapping) -> dict:
    """One stage run in segments (killed, then resumed from its checkpoint or trajectories): the
    stage's figures over both. Times and counts add up, the peak is the larger one (with its
    ``peak_is_process_peak``), the end figures are the last segment's; ``segments`` counts them."""
    out = dict(after)
    for k in _SUMMED_AMOUNTS + _SUMMED_COUNTS:
        if k in before or k in after:
            total = float(before.get(k, 0) or 0) + float(after.get(k, 0) or 0)
            out[k] = int(total) if k in _SUMMED_COUNTS else round(total, 2)
    if float(before.get("peak_rss_gb", 0) or 0) > float(after.get("peak_rss_gb", 0) or 0):
        out["peak_rss_gb"] = before["peak_rss_gb"]
        out["peak_is_process_peak"] = before.get("peak_is_process_peak", False)
    out["segments"] = int(before.get("segments", 1)) + int(after.get("segments", 1))
    return out


def _measured(c: Any, name: str, fn, *args, resumed: bool = False, **kw):
    """``fn`` under ``metrics.StageMemory``: its peak RSS / time / compiles logged and added to
    ``<run_dir>/stages.json`` as ``name``. ``resumed`` (the stage goes on from what an earlier run left:
    checkpoints, trajectories): merged with that run's figures (``merge_segments``), so a
    resume that only finishes the last pieces does not replace the stage's hours by its seconds."""
    from retroact_jax import metrics
    with metrics.StageMemory(name) as mem:
        out = fn(*args, **kw)
    log.info("%s", mem.line())
    path = pathlib.Path(c.run_dir) / "stages.json"      # process 0's figures
    if distributed.is_main():
        old = json.loads(path.read_text()) if path.exists() else {}
        old[name] = merge_segments(old[name], mem.summary) if resumed and name in old else mem.summary
        path.write_text(json.dumps(old, indent=2) + "\n")
    return out


def run_training(c: Any, stage: str, m: methods_lib.Method) -> None:
    """The IL or RL stage of method ``m``, skipped when it already finished with this config."""
    from retroact_jax.stages import il, rl
    sc = stage_config(c, stage, m)
    d = il_dir(c, m) if stage == "il" else method_dir(c, m) / "rl"
    cfg = sc.to_dict()
    if _finished(d, stage, cfg):
        log.info("%s: %s finished in %s, skipped", m.name, stage, d)
        return
    resumed = d.is_dir() and any(d.iterdir())
    d.mkdir(parents=True, exist_ok=True)
    summary = _measured(c, f"{d.relative_to(c.run_dir)}", il.run_il if stage == "il" else rl.run_rl, sc, d,
                        resumed=resumed)
    _write(d / "stage_config.json", json.dumps(cfg, indent=2, default=str) + "\n")
    distributed.barrier(f"{d} finished")          # its summary and exports are on disk for all
    log.info("%s: %s", stage, json.dumps({k: summary.get(k) for k in ("steps", "iterations", "export")}))


def eval_config(c: Any) -> dict:
    ev = {k: v for k, v in c.eval.to_dict().items() if k != "compare"}   # which models: not how
    out = {"env": c.env, "split": c.split, "model": c.model.to_dict(), "eval": ev, "backbone": c.backbone}
    if c.split == "validation":
        out["validation"] = c.validation.to_dict()
    return out


def run_eval(c: Any, m: methods_lib.Method, model: str = "trained") -> dict:
    """The eval stage with ``model`` (trained | il | base), skipped when it finished with this config."""
    d = method_dir(c, m)
    out = evaluate.eval_dir(d, model, c.split)
    f = out / "stage_config.json"
    if distributed.agree((out / "results.json").exists() and _same(f, eval_config(c))):
        log.info("%s: eval finished in %s, skipped", m.name, out)
        return distributed.agree(json.loads((out / "results.json").read_text()) if distributed.is_main() else None)
    got = _measured(c, f"{m.run_name(m.multi_agent(c.multi_agent))}/{out.name}", evaluate.run_eval, c, m, d,
                    il_dir(c, m), multi_agent=m.multi_agent(c.multi_agent), model=model,
                    resumed=(out / "trajectories.jsonl").exists())
    _write(f, json.dumps(eval_config(c), indent=2) + "\n")
    distributed.barrier(f"{out} finished")
    return got


def compare(c: Any, m: methods_lib.Method, results: dict) -> str:
    """``<method dir>/compare.md``: the models of ``config.eval.compare`` beside the trained one."""
    rows = [(evaluate.compare_label(m, k), results[k]) for k in ("base", "il", "trained") if k in results]
    s = rows[-1][1]
    head = (f"{m.row_label(m.multi_agent(c.multi_agent))} on {s['env']} ({s['num_tasks']} tasks x {s['trials']} "
            f"trials): the same agent with each model, x100\n\n")
    text = head + evaluation.compare_table(rows)
    _write(method_dir(c, m) / "compare.md", text)
    return text


def run_method(c: Any, m: methods_lib.Method) -> dict | None:
    """The method's stages; its results when it was evaluated (now or by an earlier run)."""
    d = method_dir(c, m)
    for stage in stages_of(c, m):
        if stage != "eval":
            run_training(c, stage, m)
            continue
        got = {k: run_eval(c, m, k) for k in ["trained"] + as_list(c.eval.compare)}
        if len(got) > 1:
            print(compare(c, m, got))
    res = evaluate.eval_dir(d, "trained", c.split) / "results.json"
    return distributed.agree(json.loads(res.read_text()) if distributed.is_main() and res.exists() else None)


def _check_meshes(c: Any) -> None:
    """Several processes train one model together: each training stage needs a mesh over them."""
    if distributed.count() == 1:
        return
    for name in method_names(c):
        for stage in stages_of(c, methods_lib.get(name)):
            if stage != "eval" and not c[stage].train.mesh:
                raise StageError(
                    f"config.{stage}.train.mesh is '' (one device) but {distributed.count()} processes "
                    f"run: set one over all of them, e.g. --config.{stage}.train.mesh=fsdp=-1")


def run(c: Any) -> list[dict]:
    """Every configured method; the evaluated ones merged into ``<run_dir>/results.*``."""
    run_dir = pathlib.Path(c.run_dir)
    _check_meshes(c)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write(run_dir / "config.json", c.to_json_best_effort(indent=2) + "\n")
    results = []
    for name in method_names(c):
        log.info("method %s", name)
        got = run_method(c, methods_lib.get(name))
        if got is not None:
            results.append(got)
    if results and distributed.is_main():
        evaluation.write_table(run_dir, results)
        print((run_dir / "results.md").read_text())
    if results and c.publish and distributed.is_main():
        from retroact_jax.stages import publish
        log.info("published the table's artifacts in %s", publish.publish(c, results))
    return results
