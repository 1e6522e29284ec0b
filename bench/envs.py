"""Environment latency: reset and step times per env, and ALFWorld steps/s with 1 vs N worker
processes (``envs.pool.EnvPool``), in the same run. Prints ONE JSON object (progress on stderr).

    python -m bench.envs                                    # all four envs, 10 episodes each
    python -m bench.envs --envs hotpotqa,intercode_sql --episodes 20
    python -m bench.envs --envs alfworld --workers 2 --pool_games 8

Per env (``envs.make(name, split, max_steps=100)``): ``--episodes`` tasks spread evenly over the
split; each episode is reset, then takes the invalid actions listed below (malformed actions
the env must answer with its invalid-action observation), then plays the gold script to the end:
HotpotQA ``Search[title]`` of each supporting-fact title then ``Finish[answer]``; InterCode-SQL and
-Bash ``execute[gold]`` then ``submit``; ALFWorld the game's expert walkthrough. Latencies are
reported in ms (median, p90, max, count) per kind: ``reset``, ``step`` (gold steps but the last),
``final`` (the episode-ending step: Finish / submit / the walkthrough's last action, which for
InterCode scores the episode), ``invalid``. The first reset (which starts a back end: MariaDB, the
HotpotQA corpus, the ALFWorld PDDL) is reported apart as ``first_reset_s`` with ``make_s``. The
fraction of gold episodes that succeed is reported as a check that the episodes really ran.
An env whose back end is missing (alfworld not installed, no MariaDB, no bubblewrap) is skipped
with ``{"skipped": "<reason>"}``.

ALFWorld pool: the same ``--pool_games`` walkthroughs replayed in batches of ``--pool_batch``
concurrent episodes through ``EnvPool(workers=1)`` and ``EnvPool(workers=N)`` for each N of
``--workers``, plus in-process (no pool) as a reference; steps/s = walkthrough steps / wall time
of the ``step_many`` calls (resets and worker start-up reported apart). The machine has 2 cores
and is shared: note ``loadavg``; compare figures of one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))   # run from anywhere

SPLITS = {"hotpotqa": "test", "alfworld": "valid_unseen", "intercode_sql": "test",
          "intercode_bash": "test"}
INVALID = {
    "hotpotqa": ["Dance[around]", "search for the answer", ""],
    "intercode_sql": ["run[SELECT 1]", "SELECT 1", ""],
    "intercode_bash": ["run[ls]", "ls -la", ""],
    "alfworld": ["fly to the moon", "take unicorn 99 from drawer 99", ""],
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def stats_ms(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs) * 1e3
    return {"median_ms": round(float(np.median(a)), 3), "p90_ms": round(float(np.percentile(a, 90)), 3),
            "max_ms": round(float(a.max()), 3), "n": int(a.size)}


def gold_actions(task) -> list[str]:
    """The gold script of ``task`` as env actions (the last one ends the episode)."""
    if task.env == "hotpotqa":
        from retroact_jax.benchmarks.hotpotqa import titles as hotpot_titles
        return [f"Search[{t}]" for t in hotpot_titles(task)] + [f"Finish[{task.data['answer']}]"]
    if task.env in ("intercode_sql", "intercode_bash"):
        return [f"execute[{task.data['gold']}]", "submit"]
    if task.env == "alfworld":
        return list(task.data["walkthrough"])
    raise ValueError(f"no gold script for {task.env!r}")


def backend_missing(name: str) -> str | None:
    """Why the env's back end cannot run here, or None."""
    import shutil
    if name == "alfworld":
        try:
            import alfworld  # noqa: F401
            import textworld  # noqa: F401
        except ImportError as e:
            return f"alfworld / textworld not installed ({e}); pip install -e .[alfworld]"
    if name == "intercode_sql" and not (shutil.which("mariadbd") or shutil.which("mysqld")):
        return "no MariaDB server binary (mariadbd); experiments/setup.sh installs mariadb-server"
    if name == "intercode_bash" and not shutil.which("bwrap"):
        return "no bubblewrap (bwrap); experiments/setup.sh installs it"
    return None


def pick(n_tasks: int, k: int) -> list[int]:
    return sorted(set(np.linspace(0, n_tasks - 1, min(k, n_tasks)).round().astype(int).tolist()))


def bench_env(name: str, episodes: int) -> dict:
    import envs
    why = backend_missing(name)
    if why:
        return {"skipped": why}
    split = SPLITS[name]
    t = time.perf_counter()
    try:
        env = envs.make(name, split, max_steps=100)
        make_s = time.perf_counter() - t
        idx = pick(len(env.tasks), episodes)
        t = time.perf_counter()
        env.reset(env.task_at(idx[0]))
        first_reset_s = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - a back end that fails to start is reported, not fatal
        return {"skipped": f"back end failed to start: {type(e).__name__}: {str(e)[:300]}"}
    lat = {"reset": [], "step": [], "final": [], "invalid": []}
    wins, steps_total, invalid_flagged = 0, 0, 0
    try:
        for n, i in enumerate(idx):
            task = env.task_at(i)
            if n > 0:
                t = time.perf_counter()
                env.reset(task)
                lat["reset"].append(time.perf_counter() - t)
            for a in INVALID[name]:
                t = time.perf_counter()
                _, _, done, info = env.step(a)
                lat["invalid"].append(time.perf_counter() - t)
                invalid_flagged += bool(info.get("invalid"))
                if done:
                    raise RuntimeError(f"{name}: invalid action {a!r} ended the episode of {task.id}")
            gold = gold_actions(task)
            info = {}
            for k, a in enumerate(gold):
                t = time.perf_counter()
                _, _, done, info = env.step(a)
                lat["final" if k == len(gold) - 1 else "step"].append(time.perf_counter() - t)
                steps_total += 1
                if done:
                    break
            wins += bool(info.get("success"))
    finally:
        env.close()
    n_inv = len(lat["invalid"])
    return {"split": split, "episodes": len(idx), "make_s": round(make_s, 3),
            "first_reset_s": round(first_reset_s, 3),
            **{k: stats_ms(v) for k, v in lat.items()},
            "gold_steps": steps_total, "gold_success_rate": round(wins / len(idx), 3),
            "invalid_actions_flagged": f"{invalid_flagged}/{n_inv}",
            "invalid_actions": INVALID[name]}


# ---------------------------------------------------------------------------------- ALFWorld pool
def replay_in_process(tasks) -> dict:
    import envs
    env = envs.make("alfworld", SPLITS["alfworld"], max_steps=100)
    t_reset = t_step = 0.0
    steps = wins = 0
    try:
        for task in tasks:
            t = time.perf_counter()
            env.reset(task)
            t_reset += time.perf_counter() - t
            t = time.perf_counter()
            info = {}
            for a in task.data["walkthrough"]:
                _, _, done, info = env.step(a)
                steps += 1
            t_step += time.perf_counter() - t
            wins += bool(info.get("success"))
    finally:
        env.close()
    return {"steps": steps, "step_wall_s": round(t_step, 3), "steps_per_s": round(steps / t_step, 2),
            "reset_wall_s": round(t_reset, 3), "won": wins}


def replay_pool(tasks, workers: int, batch: int) -> dict:
    from envs.pool import EnvPool
    t_reset = t_step = 0.0
    steps = wins = 0
    t = time.perf_counter()
    with EnvPool("alfworld", SPLITS["alfworld"], workers=workers, env_kwargs={"max_steps": 100}) as pool:
        pool.ping()
        start_s = time.perf_counter() - t
        for b in range(0, len(tasks), batch):
            chunk = tasks[b:b + batch]
            t = time.perf_counter()
            pool.reset_many(chunk)
            t_reset += time.perf_counter() - t
            walks = [list(x.data["walkthrough"]) for x in chunk]
            last = [None] * len(chunk)
            t = time.perf_counter()
            for k in range(max(map(len, walks))):
                acts = [w[k] if k < len(w) else None for w in walks]
                for j, r in enumerate(pool.step_many(acts)):
                    if r is not None:
                        last[j] = r
                steps += sum(a is not None for a in acts)
            t_step += time.perf_counter() - t
            wins += sum(bool(r and r[3].get("success")) for r in last)
    return {"workers": workers, "batch": batch, "start_s": round(start_s, 3), "steps": steps,
            "step_wall_s": round(t_step, 3), "steps_per_s": round(steps / t_step, 2),
            "reset_wall_s": round(t_reset, 3), "won": wins}


def bench_pool(games: int, workers: list[int], batch: int) -> dict:
    why = backend_missing("alfworld")
    if why:
        return {"skipped": why}
    try:
        import envs.pool  # noqa: F401
    except ImportError as e:
        return {"skipped": f"envs/pool.py not available: {e}"}
    import envs
    probe = envs.make("alfworld", SPLITS["alfworld"])
    tasks = [probe.task_at(i) for i in pick(len(probe.tasks), games)]
    probe.close()
    out = {"games": len(tasks), "cores": len(os.sched_getaffinity(0))}
    log("[pool] in-process")
    out["in_process"] = replay_in_process(tasks)
    for w in sorted(set([1] + workers)):
        log(f"[pool] {w} worker(s)")
        out[f"workers_{w}"] = replay_pool(tasks, w, batch)
    base = out["workers_1"]["steps_per_s"]
    out["speedup_vs_1_worker"] = {f"workers_{w}": round(out[f"workers_{w}"]["steps_per_s"] / base, 3)
                                  for w in sorted(set(workers)) if w != 1}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--envs", default="hotpotqa,alfworld,intercode_sql,intercode_bash")
    ap.add_argument("--episodes", type=int, default=10, help="episodes per env")
    ap.add_argument("--workers", default="2", help="comma list of pool sizes compared with 1 worker")
    ap.add_argument("--pool_games", type=int, default=8, help="ALFWorld games replayed per pool size")
    ap.add_argument("--pool_batch", type=int, default=4, help="concurrent episodes per step_many")
    ap.add_argument("--no_pool", action="store_true", help="skip the ALFWorld pool comparison")
    a = ap.parse_args(argv)
    names = [n for n in a.envs.split(",") if n]
    bad = [n for n in names if n not in SPLITS]
    if bad:
        raise SystemExit(f"--envs: unknown {bad}; known: {sorted(SPLITS)}")
    workers = [int(w) for w in a.workers.split(",") if w]
    if a.episodes < 1 or a.pool_games < 1 or a.pool_batch < 1 or any(w < 1 for w in workers):
        raise SystemExit("--episodes, --pool_games, --pool_batch and --workers must be >= 1")
    out = {"bench": "envs", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "loadavg_start": list(os.getloadavg()), "args": vars(a), "envs": {}}
    for n in names:
        log(f"[{n}] {a.episodes} episodes")
        out["envs"][n] = bench_env(n, a.episodes)
    if "alfworld" in names and not a.no_pool:
        out["alfworld_pool"] = bench_pool(a.pool_games, workers, a.pool_batch)
    out["loadavg_end"] = list(os.getloadavg())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
