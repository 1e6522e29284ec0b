"""Gold replay of InterCode-SQL through the env, as one JSON object.

For every task of the split: ``reset`` -> ``execute[gold]`` -> ``submit``. Reports how many get reward 1,
which do not (expected: the 6 golds that are SQL errors, data/intercode/README.md), which golds the env
flagged as failing, on which session the golds ran (``reset``: the episode's connection; ``fresh``), how
many test tasks the session hacks of issue 10 win (``SET ...``, an empty SELECT, ``submit``: expected
exactly the tasks whose gold result is empty), the latency of
reset / execute step / submit (p50, p90, p99, max in ms), the server start time, and as the reference
the same golds run bare over one admin connection (pymysql, no isolation), measured in the same run.

    python bench/intercode_sql_gold.py [--split all|test|train]
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

import numpy as np


def _pct_ms(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1e3
    return {k: round(float(v), 3) for k, v in
            {"p50": np.percentile(a, 50), "p90": np.percentile(a, 90), "p99": np.percentile(a, 99), "max": a.max()}.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="all", choices=["all", "test", "train"])
    a = ap.parse_args()

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run from anywhere
    import pymysql
    import envs
    from envs.intercode_sql import server as srv

    t0 = time.perf_counter()
    info, started = srv.start()
    start_s = time.perf_counter() - t0

    env = envs.make("intercode_sql", a.split)
    t_reset, t_exec, t_submit, failed, rewards, gold_errors = [], [], [], [], [], []
    sessions = collections.Counter()
    t_all = time.perf_counter()
    for task in env.tasks:
        t = time.perf_counter()
        env.reset(task)
        t_reset.append(time.perf_counter() - t)
        t = time.perf_counter()
        env.step(f"execute[{task.data['gold']}]")
        t_exec.append(time.perf_counter() - t)
        t = time.perf_counter()
        _, r, _, step_info = env.step("submit")
        t_submit.append(time.perf_counter() - t)
        rewards.append(r)
        sessions[step_info["gold_session"]] += 1
        if step_info["gold_error"] is not None:
            gold_errors.append(task.data["ic_index"])
        if r != 1.0:
            failed.append(task.data["ic_index"])
    replay_s = time.perf_counter() - t_all
    env.close()

    test_env = envs.make("intercode_sql", "test")
    empty_gold = sum(test_env.gold_result(t)[0] == [] and test_env.gold_result(t)[1] is None for t in test_env.tasks)
    hacks = {}
    for setting in ("SET SESSION max_join_size=1", "SET SESSION sql_mode='ANSI_QUOTES'", None):
        wins = 0
        for task in test_env.tasks:
            test_env.reset(task)
            if setting:
                test_env.step(f"execute[{setting}]")
            test_env.step("execute[SELECT 1 FROM DUAL WHERE 1=0]")
            wins += test_env.step("submit")[1] == 1.0
        hacks[setting or "(none)"] = wins
    test_env.close()

    # reference: the golds bare, one admin connection, as InterCode's single cursor would run them
    cnx = pymysql.connect(**info.admin(), ssl_disabled=True)
    n_err, n_empty = 0, 0
    t = time.perf_counter()
    with cnx.cursor() as cur:
        for task in env.tasks:
            try:
                cur.execute(f"USE `{task.data['db']}`")
                cur.execute(task.data["gold"])
                n_empty += len(cur.fetchall()) == 0
            except pymysql.err.MySQLError:
                n_err += 1
    ref_s = time.perf_counter() - t
    cnx.close()

    print(json.dumps({
        "bench": "intercode_sql_gold", "split": a.split, "tasks": len(rewards),
        "reward_1": sum(r == 1.0 for r in rewards), "failed_ids": failed, "gold_error_ids": gold_errors,
        "gold_sessions": dict(sessions),
        "session_hack_wins_test": {"then_empty_select": hacks, "tasks_with_empty_gold": empty_gold},
        "server": {"started_here": started, "start_s": round(start_s, 3), "port": info.port},
        "env_replay_s": round(replay_s, 3),
        "latency_ms": {"reset": _pct_ms(t_reset), "execute_step": _pct_ms(t_exec), "submit_step": _pct_ms(t_submit)},
        "reference_bare_pymysql": {"s": round(ref_s, 3), "gold_errors": n_err, "empty_results": n_empty},
    }))


if __name__ == "__main__":
    main()
