"""Evaluation of retrospective agents: IR / FR / AR per environment, tables, plots, trajectories.

Metrics (docs/paper.md §5): for every task and trial k = 1..K the task's score after trial k, where a
task solved at trial j keeps trial j's score for every k > j (trials stop once solved):

  IR = mean over tasks of the trial-1 score, FR = trial K, AR = mean over k of the trial-k mean.

Per env (``benchmarks.get(env).metrics``): HotpotQA ``f1`` (the env's score) and ``em`` (solved);
ALFWorld ``success_rate``; InterCode ``reward`` (InterCode IoU reward) and ``success_rate``
(reward == 1). The Table 2 metric is the first of each. Values are reported x100.

Outputs in the run dir: ``trajectories.jsonl`` (one line per finished trial: prompts as spans,
completions, observations, rewards, reflection, behaviour log-probs), ``results.json``,
``results.md`` (Table 2 layout), ``metrics.png`` (each metric against the trial number, one line
per method when several methods share a table: ``write_table``).
``TrajectoryLog`` appends and fsyncs one line per trial; on restart it reads the finished trials
back (dropping a torn last line) so the evaluation resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable, Mapping, Sequence

from retroact_jax import benchmarks


class TrajectoryError(ValueError):
    """A trajectory log that cannot be resumed as asked (corrupt, another env / split / task)."""


class TrajectoryLog:
    """Append-only JSONL of trial records, keyed by (task_index, trial)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> list[dict]:
        """Records already written; a torn (partial) last line is cut off the file."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        records, good = [], 0
        seen = set()
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrajectoryError(f"{self.path}: corrupt line {len(records) + 1}: {e}") from None
            k = (rec["task_index"], rec["trial"])
            if k in seen:
                raise TrajectoryError(f"{self.path}: duplicate record for task {k[0]} trial {k[1]}")
            seen.add(k)
            records.append(rec)
            good += len(line)
        if good < len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return records

    def append(self, record: Mapping) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def task_curves(records: Sequence[Mapping], trials: int) -> dict[str, list[float]]:
    """One task's per-trial ``score`` and ``success`` (carried forward after its last trial)."""
    rs = sorted(records, key=lambda r: r["trial"])
    score, success = [], []
    for k in range(1, trials + 1):
        r = rs[min(k, len(rs)) - 1]
        score.append(float(r["score"]))
        success.append(1.0 if r["success"] else 0.0)
    return {"score": score, "success": success}


def summarize(env: str, records: Iterable[Mapping], trials: int) -> dict:
    """IR / FR / AR (x100) and per-trial curves of every metric of ``env``."""
    by_task: dict[int, list] = {}
    for r in records:
        by_task.setdefault(int(r["task_index"]), []).append(r)
    if not by_task:
        raise ValueError(f"{env}: no trajectories to summarise")
    curves = [task_curves(v, trials) for _, v in sorted(by_task.items())]
    source = {"f1": "score", "reward": "score", "em": "success", "success_rate": "success"}
    bench = benchmarks.get(env)
    out = {"env": env, "num_tasks": len(curves), "trials": trials, "primary": bench.primary,
           "metrics": {}}
    for m in bench.metrics:
        per_trial = [100.0 * sum(c[source[m]][k] for c in curves) / len(curves) for k in range(trials)]
        out["metrics"][m] = {"IR": per_trial[0], "FR": per_trial[-1],
                             "AR": sum(per_trial) / trials, "per_trial": per_trial}
    out["trials_run"] = sum(len(v) for v in by_task.values())
    out["actions"] = action_validity(r for v in by_task.values() for r in v)
    return out


def action_validity(records: Iterable[Mapping]) -> dict:
    """How many of the agent's actions the env parsed as an action (``info["invalid"]`` False):
    ``{"actions", "valid", "valid_rate"}`` over every step of the records, the rate x100
    (None without actions). An empty or free-text action is invalid (HotpotQA: not
    ``Search[..]`` / ``Finish[..]``; InterCode: no ``execute[..]`` / ``submit``)."""
    flags = [not bool((s.get("info") or {}).get("invalid", False))
             for r in records for s in (r.get("steps") or [])]
    rate = 100.0 * sum(flags) / len(flags) if flags else None
    return {"actions": len(flags), "valid": sum(flags), "valid_rate": rate}


def table2(rows: Sequence[tuple[str, str, Mapping[str, dict]]]) -> str:
    """Markdown in the layout of the paper's Table 2. ``rows``: (backbone, method, {env: summary}).

    Columns: per env (in the paper's order) IR / FR / AR of its primary metric, then Avg of all
    numbers in the row. Secondary metrics (HotpotQA EM, InterCode success rate) follow in a
    second table of the same layout."""
    envs = [benchmarks.get(e) for e in benchmarks.NAMES if any(e in s for _, _, s in rows)]
    lines = []
    for title, primary in (("primary", True), ("secondary", False)):
        cols = []
        for b in envs:
            ms = b.metrics[:1] if primary else b.metrics[1:]
            cols += [(b.name, m) for m in ms]
        if not cols:
            continue
        head = ["Backbone", "Method"] + [f"{benchmarks.get(e).label} {m} {x}" for e, m in cols
                                         for x in ("IR", "FR", "AR")] + ["Avg"]
        lines += [f"**{title} metrics** (x100)", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for backbone, method, s in rows:
            vals = []
            for e, m in cols:
                mm = s.get(e, {}).get("metrics", {}).get(m)
                vals += [mm[x] if mm else None for x in ("IR", "FR", "AR")]
            nums = [v for v in vals if v is not None]
            avg = sum(nums) / len(nums) if nums else None
            cells = ["-" if v is None else f"{v:.2f}" for v in vals + [avg]]
            lines.append("| " + " | ".join([backbone, method] + cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(curves: Sequence[tuple[str, Mapping]], path: str | os.PathLike) -> None:
    """Each metric against the trial number, one line per (label, summary) (PNG, matplotlib Agg).
    All summaries are of one env."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    env = curves[0][1]["env"]
    ms = list(curves[0][1]["metrics"])
    fig, axes = plt.subplots(1, len(ms), figsize=(4.5 * len(ms), 3.5), squeeze=False)
    for ax, m in zip(axes[0], ms):
        for label, summary in curves:
            v = summary["metrics"][m]["per_trial"]
            ks = list(range(1, len(v) + 1))
            ax.plot(ks, v, marker="o", label=label)
            ax.set_xticks(ks)
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{m} (x100)")
        ax.set_title(f"{benchmarks.get(env).label}: {m}")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_row(summary: Mapping, backbone: str, method: str, extra: Mapping | None = None) -> dict:
    """What ``write_outputs`` writes to results.json."""
    return {**summary, "backbone": backbone, "method": method, **(extra or {})}


def write_outputs(run_dir: str | os.PathLike, summary: Mapping, backbone: str, method: str,
                  extra: Mapping | None = None) -> None:
    """One method's results: results.json, results.md, metrics.png."""
    d = pathlib.Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    res = results_row(summary, backbone, method, extra)
    (d / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (d / "results.md").write_text(table2([(backbone, method, {summary["env"]: summary})]) + "\n")
    plot([(method, summary)], d / "metrics.png")


def write_table(out_dir: str | os.PathLike, results: Sequence[Mapping]) -> None:
    """Several methods' ``results.json`` contents (one env) merged: results.json (a list of rows),
    results.md (one Table 2), metrics.png (one line per method)."""
    d = pathlib.Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    rows = [{k: r[k] for k in ("backbone", "method", "env", "num_tasks", "trials", "primary",
                               "metrics")} for r in results]
    (d / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (d / "results.md").write_text(table2([(r["backbone"], r["method"], {r["env"]: r})
                                          for r in results]) + "\n")
    plot([(r["method"], r) for r in results], d / "metrics.png")


def compare_table(rows: Sequence[tuple[str, Mapping]]) -> str:
    """Markdown: one row per evaluated model of one run (e.g. base / IL / RL on the same tasks):
    its valid-action rate, then IR and FR of each metric (x100). ``rows``: (label, summary)."""
    metrics = list(rows[0][1]["metrics"])
    head = ["Model", "valid actions"] + [f"{m} {x}" for m in metrics for x in ("IR", "FR")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in rows:
        act = s.get("actions") or {}
        rate = act.get("valid_rate")
        cells = [label, "-" if rate is None else f"{rate:.1f}% ({act['valid']}/{act['actions']})"]
        cells += [f"{s['metrics'][m][x]:.2f}" for m in metrics for x in ("IR", "FR")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
