"""Replay every expert walkthrough of an ALFWorld split through ``ALFWorldEnv``; print one JSON.

    python bench/alfworld_replay.py                       # all 134 valid_unseen games, in-process
    python bench/alfworld_replay.py --workers 2           # through envs.pool.EnvPool, 2 processes
    python bench/alfworld_replay.py --split valid_seen --limit 20

Reports the games won (every walkthrough should win), and timings: total wall time, the wall
time spent in resets and in steps, game steps per second (walkthrough steps are all real game
steps), resets per second, this process's and the workers' CPU seconds, and the load average (the
machine is shared: compare figures of one run, or runs at similar load).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import envs  # noqa: E402
from envs.pool import EnvPool  # noqa: E402


def replay_in_process(tasks, split):
    env = envs.make("alfworld", split)
    won, t_reset, t_step, steps = [], 0.0, 0.0, 0
    for task in tasks:
        t0 = time.perf_counter()
        env.reset(task)
        t1 = time.perf_counter()
        info = {}
        for a in task.data["walkthrough"]:
            _, _, done, info = env.step(a)
            steps += 1
        t_step += time.perf_counter() - t1
        t_reset += t1 - t0
        won.append(bool(info.get("success")))
    env.close()
    return won, t_reset, t_step, steps


def replay_pool(tasks, split, workers, batch):
    won, t_reset, t_step, steps = [], 0.0, 0.0, 0
    with EnvPool("alfworld", split, workers=workers) as pool:
        t0 = time.perf_counter()
        pool.ping()  # workers started and importing envs: spawn time reported apart
        start_s = time.perf_counter() - t0
        for b in range(0, len(tasks), batch):
            chunk = tasks[b:b + batch]
            t0 = time.perf_counter()
            pool.reset_many(chunk)
            t_reset += time.perf_counter() - t0
            wts = [list(t.data["walkthrough"]) for t in chunk]
            ok = [False] * len(chunk)
            t0 = time.perf_counter()
            for k in range(max(map(len, wts))):
                res = pool.step_many([wt[k] if k < len(wt) else None for wt in wts])
                for i, r in enumerate(res):
                    if r is not None:
                        steps += 1
                        ok[i] = r[3]["success"]
            t_step += time.perf_counter() - t0
            won.extend(ok)
    return won, t_reset, t_step, steps, start_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="valid_unseen")
    ap.add_argument("--workers", type=int, default=0, help="0: in this process; N: an EnvPool of N")
    ap.add_argument("--batch", type=int, default=32, help="episodes per pool batch")
    ap.add_argument("--limit", type=int, default=0, help="replay only the first N games")
    args = ap.parse_args(argv)

    tasks = list(envs.make("alfworld", args.split).tasks)
    if args.limit:
        tasks = tasks[:args.limit]
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), os.times()
    start_s = 0.0
    if args.workers == 0:
        won, t_reset, t_step, steps = replay_in_process(tasks, args.split)
    else:
        won, t_reset, t_step, steps, start_s = replay_pool(tasks, args.split, args.workers, args.batch)
    wall = time.perf_counter() - t0
    c1 = os.times()
    out = {
        "split": envs.make("alfworld", args.split).split, "workers": args.workers,
        "won": sum(won), "total": len(tasks),
        "not_won": [t.id for t, w in zip(tasks, won) if not w],
        "wall_s": round(wall, 2), "pool_start_s": round(start_s, 2),
        "reset_wall_s": round(t_reset, 2), "step_wall_s": round(t_step, 2), "steps": steps,
        "steps_per_s": round(steps / t_step, 2) if t_step else None,
        "resets_per_s": round(len(tasks) / t_reset, 3) if t_reset else None,
        "cpu_s_self": round(c1.user + c1.system - c0.user - c0.system, 2),
        "cpu_s_children": round(c1.children_user + c1.children_system
                                - c0.children_user - c0.children_system, 2),
        "loadavg_1min_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out))
    return 0 if out["won"] == out["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
