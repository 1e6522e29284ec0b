"""Gold replay over the InterCode-Bash tasks: how many golds reach reward 1 in our environment.

For each task: reset (fresh sandbox), ``execute[gold]``, ``submit`` (which runs the gold again
in a second fresh sandbox and scores the two). A gold that does not reach 1 points to
nondeterminism (dates, racy background jobs, timing) or to a defect of the environment.
Prints one JSON object: counts, the failures with their reward parts, and timings.

    python bench/intercode_bash_gold.py [--limit N] [--reward_mode intercode|strict]
                                        [--limits_mode auto|cgroup|rlimit] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import envs  # noqa: E402
from envs.intercode_bash.sandbox import check_available  # noqa: E402


def replay(limit: int | None, reward_mode: str, limits_mode: str = "auto") -> dict:
    env = envs.make("intercode_bash", split="test", reward_mode=reward_mode, limits_mode=limits_mode)
    n = len(env.tasks) if limit is None else min(limit, len(env.tasks))
    rows, t_all = [], time.perf_counter()
    for i in range(n):
        task = env.task_at(i)
        t0 = time.perf_counter()
        env.reset(i)
        t1 = time.perf_counter()
        obs, _, _, info_exec = env.step(f"execute[{task.data['gold']}]")
        t2 = time.perf_counter()
        _, reward, done, info = env.step("submit")
        t3 = time.perf_counter()
        d = info.get("reward_details", {})
        rows.append({"index": i, "id": task.id, "reward": reward, "success": info["success"],
                     "exit_code": info_exec.get("exit_code"), "reset_s": t1 - t0, "execute_s": t2 - t1,
                     "submit_s": t3 - t2,
                     "parts": {k: d.get(k) for k in ("file_diff", "file_changes", "answer_similarity")},
                     "diff_miss": d.get("diff_miss"), "diff_extra": d.get("diff_extra"),
                     "sandbox_error": info.get("sandbox_error"), "sandbox_limits": info.get("sandbox_limits"),
                     "agent_obs": obs[:300], "gold_obs": (info.get("gold_observation") or "")[:300]})
    env.close()
    ok = [r for r in rows if r["success"]]
    per = [r["reset_s"] + r["execute_s"] + r["submit_s"] for r in rows]
    return {"bench": "intercode_bash_gold", "reward_mode": reward_mode,
            "sandbox_limits": sorted({r["sandbox_limits"] for r in rows if r["sandbox_limits"]}), "tasks": n,
            "reward_1": len(ok), "mean_reward": statistics.fmean(r["reward"] for r in rows),
            "gold_exit_0": sum(r["exit_code"] == 0 for r in rows),
            "gold_exit_nonzero": {r["id"]: r["exit_code"] for r in rows if r["exit_code"] != 0},
            "wall_s": time.perf_counter() - t_all,
            "per_task_s": {"median": statistics.median(per), "max": max(per)},
            "median_s": {k: statistics.median(r[k] for r in rows) for k in ("reset_s", "execute_s", "submit_s")},
            "failures": [r for r in rows if not r["success"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--reward_mode", default="intercode", choices=("intercode", "strict"))
    ap.add_argument("--limits_mode", default="auto", choices=("auto", "cgroup", "rlimit"),
                    help="episode caps: a cgroup when possible (auto), required, or per-process only")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()
    why = check_available()
    if why is not None:
        sys.exit(f"cannot run: {why}")
    res = replay(a.limit, a.reward_mode, a.limits_mode)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        pathlib.Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
