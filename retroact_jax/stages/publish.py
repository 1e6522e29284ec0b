"""A finished table's committed artifacts (``config.publish``, e.g. ``results/table2_cpu/<env>/``):

    results.md        Table 2 (IR / FR / AR and Avg per method, backbone named) + sanity figures
    results.json      per method: metrics, sanity figures, and per task and trial: score, success, steps
    metrics.png       each metric against the trial number, one line per method
    rl_curve.png      the RL stages' eval-hook reward per RL iteration (rl_curve in results.json)
    RUN.md            the command, the commit, wall time and peak RSS of every stage (stages.json)
    config.json       the run's whole config (the re-evaluation rebuilds it: experiments/table2.py)
    adapters/<run>/<il|rl>/<planner|reflector|shared>/   PEFT LoRA adapters of the fine-tuned methods
    adapters.json     {run: {planner: [adapter dirs in order], reflector: [...]}}: base model + each
                      adapter merged in turn = the evaluated model (IL, then RL on the merged IL weights)

Sanity figures per method: the valid-action rate; how often a reflection changes the next trial's
first action; for RL methods the fraction of clipped ratios (``clip_fraction``: RL tokens outside
[1 - eps, 1 + eps], mean over update steps) and the share of update steps with any clipped token.
Imports no JAX.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
from typing import Any, Mapping, Sequence

from retroact_jax import benchmarks, evaluation
from retroact_jax.stages import evaluate, methods as methods_lib


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def per_task(records: Sequence[Mapping]) -> list[dict]:
    """[{task_index, task_id, trials: [{trial, score, success, steps}]}] sorted by task and trial."""
    by: dict[int, dict] = {}
    for r in sorted(records, key=lambda r: (int(r["task_index"]), int(r["trial"]))):
        t = by.setdefault(int(r["task_index"]), {"task_index": int(r["task_index"]), "task_id": r["task_id"],
                                                 "trials": []})
        t["trials"].append({"trial": int(r["trial"]), "score": float(r["score"]), "success": bool(r["success"]),
                            "steps": int(r.get("num_steps", len(r.get("steps") or [])))})
    return [by[k] for k in sorted(by)]


def reflection_changes(records: Sequence[Mapping]) -> dict:
    """Of the reflections followed by a next trial: how often that trial's first action differs."""
    by = {(int(r["task_index"]), int(r["trial"])): r for r in records}
    pairs = changed = 0
    for (task, trial), r in by.items():
        nxt = by.get((task, trial + 1))
        if not r.get("reflection") or nxt is None:
            continue
        first = [str((x.get("steps") or [{}])[0].get("action", "")).strip() for x in (r, nxt)]
        pairs += 1
        changed += first[0] != first[1]
    return {"pairs": pairs, "changed": changed, "rate": 100.0 * changed / pairs if pairs else None}


def rl_figures(rl_dir: pathlib.Path) -> dict:
    """The RL stage's learning curve (eval-hook metrics per iteration) and clipping figures."""
    rows = _read_jsonl(rl_dir / "metrics.jsonl")
    curve = [{k: v for k, v in r.items() if k not in ("split", "step", "time")} for r in rows
             if r.get("split") == "eval"]
    clip = [float(v) for r in rows if r.get("split") == "train" for k, v in r.items()
            if k.startswith("clip_fraction") and isinstance(v, (int, float))]
    return {"curve": curve, "logged_updates": len(clip),
            "clip_fraction_mean": 100.0 * sum(clip) / len(clip) if clip else None,
            "updates_clipped": 100.0 * sum(x > 0 for x in clip) / len(clip) if clip else None}


def adapter_chain(run_dir: pathlib.Path, il_dir: pathlib.Path, method_dir: pathlib.Path) -> dict:
    """{role: [(stage, export name, lora dir)]}: the adapters that make each trained role's model."""
    chains: dict[str, list] = {}
    for stage, d in (("il", il_dir), ("rl", method_dir / "rl")):
        got = evaluate.exports(d, stage)
        for role in ("planner", "reflector"):
            name = "shared" if "shared" in got else role
            if name in got and (pathlib.Path(got[name]).parent / "lora").is_dir():
                chains.setdefault(role, []).append((stage, name, pathlib.Path(got[name]).parent / "lora"))
    return chains


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _fmt(v: Any, pct: bool = True) -> str:
    return "-" if v is None else (f"{v:.1f}%" if pct else f"{v:.2f}")


def sanity_table(rows: Sequence[Mapping]) -> str:
    head = ["Method", "valid actions", "reflection changes 1st action", "RL clipped ratios (mean)",
            "RL updates with clipping"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        a, ch, rl = r["actions"], r["reflection_changes"], r.get("rl") or {}
        valid = "-" if a.get("valid_rate") is None else f"{a['valid_rate']:.1f}% ({a['valid']}/{a['actions']})"
        refl = "-" if ch["rate"] is None else f"{ch['rate']:.1f}% ({ch['changed']}/{ch['pairs']})"
        out.append("| " + " | ".join([r["method"], valid, refl, _fmt(rl.get("clip_fraction_mean")),
                                      _fmt(rl.get("updates_clipped"))]) + " |")
    return "\n".join(out) + "\n"


def plot_curves(curves: Mapping[str, list], metric: str, path: pathlib.Path) -> bool:
    """The RL learning curves: ``metric`` against the RL iteration, one line per method."""
    pts = {m: [(int(p["iteration"]), p[metric]) for p in c if metric in p and "iteration" in p]
           for m, c in curves.items()}
    pts = {m: p for m, p in pts.items() if p}
    if not pts:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, p in pts.items():
        ax.plot([x for x, _ in p], [y for _, y in p], marker="o", label=m)
    ax.set_xlabel("RL iteration")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_md(c: Any, command: str, stages: Mapping[str, Mapping], commit: str) -> str:
    lines = [f"# {c.env}: how this table was made", "", f"Commit: `{commit}`", "",
             "Command (rerunning it skips finished stages and resumes unfinished ones):", "", "```sh",
             command, "```", "",
             "Re-evaluate the published adapters (greedy; per-task scores must equal results.json):", "",
             "```sh", f"python3 -m experiments.table2 --published={c.publish}", "```", "",
             "| stage | wall s | peak RSS GB | compile s | compiles | note |", "|---|---|---|---|---|---|"]
    total = 0.0
    for name, s in stages.items():
        wall = float(s.get("wall_s", 0.0) or 0.0)
        total += wall
        rss = s.get("peak_rss_gb", "-")
        seg = f" ({s['segments']} segments)" if s.get("segments", 1) > 1 else ""
        lines.append(f"| {name}{seg} | {wall:.0f} | {rss} | {float(s.get('compile_s', 0) or 0):.0f} | "
                     f"{s.get('compiles', '-')} | {s.get('note', '')} |")
    lines += ["", f"Total wall of the stages: {total / 3600:.2f} h. A stage killed and resumed sums its "
              "finished segments (a segment that was killed before its end recorded nothing).", ""]
    return "\n".join(lines)


def publish(c: Any, results: Sequence[Mapping], command: str | None = None) -> pathlib.Path:
    """Write the artifacts of the run ``c`` (its methods' ``results``) into ``c.publish``."""
    from retroact_jax.stages import pipeline
    out = pathlib.Path(c.publish)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = pathlib.Path(c.run_dir)
    rows, curves, adapters = [], {}, {}
    for name in pipeline.method_names(c):
        m = methods_lib.get(name)
        mdir, il = pipeline.method_dir(c, m), pipeline.il_dir(c, m)
        ev = evaluate.eval_dir(mdir, "trained", c.split)
        res_f = ev / "results.json"
        if not res_f.exists():
            continue
        res = json.loads(res_f.read_text())
        recs = evaluation.TrajectoryLog(ev / "trajectories.jsonl").load()
        row = {k: res[k] for k in ("backbone", "method", "env", "num_tasks", "trials", "primary", "metrics",
                                   "actions")}
        row.update(run=res["run"], reflection_changes=reflection_changes(recs), tasks=per_task(recs))
        if "rl" in m.stages:
            row["rl"] = rl_figures(mdir / "rl")
            curves[res["method"]] = row["rl"]["curve"]
        chain = adapter_chain(run_dir, il, mdir) if m.il_roles else {}
        if chain:
            adapters[res["run"]] = {}
            for role, links in chain.items():
                dirs = []
                for stage, ename, src in links:
                    dst = out / "adapters" / res["run"] / stage / ename
                    if dst.exists():
                        shutil.rmtree(dst)
                    shutil.copytree(src, dst)
                    dirs.append(str(dst.relative_to(out)))
                adapters[res["run"]][role] = dirs
        rows.append(row)
    commit = git_commit()
    for row in rows:
        row["commit"] = commit
    split = c.split or benchmarks.get(c.env).eval_split
    stages = json.loads((run_dir / "stages.json").read_text()) if (run_dir / "stages.json").exists() else {}
    rows, stages = keep_published(out, c.env, split, rows, adapters, curves, stages)
    meta = {"env": c.env, "backbone": rows[0]["backbone"] if rows else "", "commit": commit, "split": split,
            "validation": c.validation.to_dict()}
    (out / "results.json").write_text(json.dumps({**meta, "methods": rows, "adapters": adapters, "stages": stages},
                                                 indent=2) + "\n")
    (out / "adapters.json").write_text(json.dumps(adapters, indent=2) + "\n")
    (out / "config.json").write_text(c.to_json_best_effort(indent=2) + "\n")
    table = evaluation.table2([(r["backbone"], r["method"], {r["env"]: r}) for r in rows])
    if rows:
        evaluation.plot([(r["method"], r) for r in rows], out / "metrics.png")
    prim = rows[0]["primary"] if rows else ""
    has_curve = plot_curves(curves, f"{prim}_FR", out / "rl_curve.png") if rows else False
    k = max((r["trials"] for r in rows), default=0)
    n = max((r["num_tasks"] for r in rows), default=0)
    commits = {r["method"]: r["commit"] for r in rows}
    made = (f"Commit `{commit}`." if set(commits.values()) <= {commit} else
            "Commits: " + "; ".join(f"{m} `{x}`" for m, x in commits.items()) + ".")
    md = [f"# Table 2 at CPU scale: {c.env}, {meta['backbone']}", "",
          f"{n} tasks of split `{meta['split']}`, K = {k} trials (methods without a reflector run one trial: "
          "IR = FR = AR). Greedy decoding. " + made, "", table, "## Sanity figures", "",
          sanity_table(rows), "![per-trial](metrics.png)", ""]
    if has_curve:
        md += [f"![RL learning curve: {prim} FR per RL iteration](rl_curve.png)", ""]
    (out / "results.md").write_text("\n".join(md))
    cmd = command or "python3 -m experiments.run " + " ".join(sys.argv[1:])
    (out / "RUN.md").write_text(run_md(c, cmd, stages, commit))
    merge_envs(out.parent)
    return out


def keep_published(out: pathlib.Path, env: str, split: str, rows: list, adapters: dict, curves: dict,
                   stages: Mapping) -> tuple[list, dict]:
    """The rows of the table already published in ``out`` (same env and split) whose evals this run
    directory does not hold (another machine made them, or an earlier run directory), kept as published
    with their adapters, RL curves and stage figures; the rows in the methods' order, and the stages
    (this run's figures over the published ones)."""
    f = out / "results.json"
    old = json.loads(f.read_text()) if f.exists() else {}
    if old.get("env") != env or old.get("split") != split:
        return rows, dict(stages)
    have = {r["run"] for r in rows}
    for r in old.get("methods", []):
        if r["run"] in have:
            continue
        rows.append({**r, "commit": r.get("commit") or old.get("commit", "")})
        if r["run"] in old.get("adapters", {}):
            adapters[r["run"]] = old["adapters"][r["run"]]
        if "rl" in r:
            curves[r["method"]] = r["rl"]["curve"]
    order = list(methods_lib.METHODS)
    rows.sort(key=lambda r: order.index(r["run"]) if r["run"] in order else
              order.index(r["run"].removesuffix("_single")) + 0.5)     # retroact run single-agent by a flag
    return rows, {**old.get("stages", {}), **stages}


# The paper's Table 2, Llama-2-7B-chat rows (PAPER §5.1; x100: HotpotQA F1, ALFWorld success, InterCode
# reward), typed in for the comparison: (IR, FR, AR) per env
PAPER_7B = {
    "ReAct": ((39.7, 39.7, 39.7), (8.96, 8.96, 8.96), (14.24, 14.24, 14.24)),
    "Reflexion": ((39.7, 58.49, 54.39), (8.96, 21.64, 18.28), (14.24, 32.16, 28.40)),
    "SFT": ((55.58, 55.58, 55.58), (72.39, 72.39, 72.39), (30.67, 30.67, 30.67)),
    "SFT+EI": ((58.22, 58.22, 58.22), (68.66, 68.66, 68.66), (34.86, 34.86, 34.86)),
    "SFT+RL": ((60.70, 60.70, 60.70), (80.60, 80.60, 80.60), (39.42, 39.42, 39.42)),
    "RetroAct": ((60.92, 71.51, 67.90), (82.84, 97.01, 93.28), (41.12, 54.17, 51.46)),
}
_PAPER_ENVS = (("hotpotqa", "f1"), ("alfworld", "success_rate"), ("intercode_sql", "reward"))


def paper_rows() -> list[tuple[str, str, dict]]:
    rows = []
    for method, per_env in PAPER_7B.items():
        envs = {e: {"metrics": {m: dict(zip(("IR", "FR", "AR"), v))}} for (e, m), v in zip(_PAPER_ENVS, per_env)}
        rows.append(("Llama-2-7B-chat (paper)", method, envs))
    return rows


def merge_envs(root: str | pathlib.Path) -> pathlib.Path:
    """``<root>/README.md``: every published env's table (``<root>/<env>/results.json``) as one Table 2,
    one row per method, beside the paper's Llama-2-7B rows."""
    root = pathlib.Path(root)
    ours: dict[tuple[str, str], dict] = {}
    found = []
    for f in sorted(root.glob("*/results.json")):
        res = json.loads(f.read_text())
        if not isinstance(res, dict) or "methods" not in res:     # not a published table
            continue
        found.append((res["env"], f.parent.name, res.get("commit", "")))
        for r in res["methods"]:
            ours.setdefault((r["backbone"], r["method"]), {})[r["env"]] = r
    rows = [(b, m, envs) for (b, m), envs in ours.items()] + paper_rows()
    lines = ["# Table 2 at CPU scale", "",
             "Our rows: `python -m experiments.run --config=experiments/configs/table2_cpu.py --config.env=<env>`;"
             " each env's directory has its table, per-task results, plots, RUN.md (commit, commands, time"
             " and memory per stage) and the LoRA adapters. The paper's rows are its Llama-2-7B-chat numbers"
             " (Table 2); the secondary metrics (HotpotQA EM, InterCode success) are not in the paper's table."
             " Avg = the mean of the row's numbers (the paper prints 21.15 / 30.14 / 52.65 for its ReAct /"
             " Reflexion / SFT rows, not the mean of its nine printed numbers).", "",
             "Environments: " + ", ".join(f"[{e}]({d}/results.md) (commit `{c[:12]}`)" for e, d, c in found), "",
             evaluation.table2(rows)]
    (root / "README.md").write_text("\n".join(lines))
    return root / "README.md"


def reevaluate(published: str | pathlib.Path, run_dir: str | pathlib.Path, methods: Sequence[str] = ()) -> dict:
    """Evaluate every published fine-tuned method again from the base model + its published adapters
    (the published config, ``stages=eval``, in ``run_dir``) and compare per-task scores with
    results.json: {run: {"tasks", "mismatches": [(task_index, trial, published, now)]}}."""
    import ml_collections as mlc
    from retroact_jax.stages import pipeline, validate
    pub = pathlib.Path(published)
    table = json.loads((pub / "results.json").read_text())
    adapters = json.loads((pub / "adapters.json").read_text())
    runs = {r["run"]: r for r in table["methods"]}
    out: dict = {}
    for run, chain in adapters.items():
        name = run if run in methods_lib.METHODS else run.removesuffix("_single")
        if methods and run not in methods:
            continue
        c = mlc.ConfigDict(json.loads((pub / "config.json").read_text()))
        c.methods, c.method, c.stages, c.publish = name, name, "eval", ""
        c.multi_agent = run == name          # retroact run single-agent by config.multi_agent=False
        c.run_dir = str(pathlib.Path(run_dir) / run)
        c.eval.compare, c.eval.progress = "", False
        c.model.planner_lora = ",".join(str(pub / d) for d in chain.get("planner", []))
        c.model.reflector_lora = ",".join(str(pub / d) for d in chain.get("reflector", []))
        pipeline.resolve(c)
        validate.validate(c)
        pipeline.run(c)
        m = methods_lib.get(name)
        recs = evaluation.TrajectoryLog(evaluate.eval_dir(pipeline.method_dir(c, m), "trained", c.split)
                                   / "trajectories.jsonl").load()
        now = {(t["task_index"], x["trial"]): x["score"] for t in per_task(recs) for x in t["trials"]}
        was = {(t["task_index"], x["trial"]): x["score"] for t in runs[run]["tasks"] for x in t["trials"]}
        bad = [(k[0], k[1], was.get(k), now.get(k)) for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        out[run] = {"tasks": len({k[0] for k in was}), "mismatches": bad}
    return out
