"""Multi-host pipeline (README "Several hosts"): ``python -m experiments.run`` of RetroAct on the tiny
random model (expert IL, one RL iteration, evaluation) run by 2 processes (``jax.distributed`` over
localhost, one CPU device each, mesh ``fsdp=2``) ends with the results (per-task scores, IR / FR)
and the final parameters of the same command run by 1 process with 2 CPU devices. The expert
rollouts run once (process 0), each process plays its share of the eval tasks, and process 0 alone
writes the shared files. Collection and evaluation play one task at a time (``batch_size=1``), so a
task's rollout does not depend on the process that plays it."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.test_multihost import TIMEOUT_S, _port, _wait

ROOT = pathlib.Path(__file__).resolve().parents[1]
ONE_TASK = dict(batch_size=1, env_workers=1, max_steps=1, planner_max_tokens=8, reflector_max_tokens=8)
FLAGS = {
    "method": "retroact", "model.planner": "tiny-random",
    **{f"eval.{k}": v for k, v in dict(ONE_TASK, num_tasks=3, trials=2, num_examples=1, progress=False,
                                        cache_buckets="4096").items()},
    **{f"il.data.{k}": v for k, v in dict(expert_tasks=3, expert_reflect_fraction=1.0, eval_rows=0,
                                           expert_batch_size=1, expert_env_workers=1).items()},
    **{f"il.train.{k}": v for k, v in dict(max_steps=2, buckets="2048", eval_every=0, progress=False,
                                            tensorboard=False, mesh="fsdp=-1", attention="default").items()},
    "il.optimizer.warmup_steps": 0, "il.optimizer.learning_rate": 1e-2,
    **{f"rl.collect.{k}": v for k, v in dict(ONE_TASK, tasks_per_iteration=2, trials=2, batch_buckets="1",
                                              cache_buckets="4096", new_token_buckets="8",
                                              score_buckets="2048", score_rows=1).items()},
    "rl.replay.drop_zero_reward": False, "rl.replay.max_chars": 0, "rl.replay.max_tokens": 0,
    **{f"rl.train.{k}": v for k, v in dict(buckets="2048", progress=False, tensorboard=False, checkpoint_every=0,
                                            mesh="fsdp=-1", attention="default", iterations=1, epochs=1).items()},
    "rl.optimizer.warmup_steps": 0, "rl.optimizer.learning_rate": 1e-2, "rl.optimizer.schedule": "constant",
}


def _launch(run_dir: pathlib.Path, n: int, devices: int) -> list[subprocess.Popen]:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, "-m", "experiments.run", "--config=experiments/configs/hotpotqa.py",
           f"--config.run_dir={run_dir}"] + [f"--config.{k}={v}" for k, v in FLAGS.items()]
    port = _port()
    multi = lambda p: ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",  # noqa: E731
                        f"--process_id={p}", f"--heartbeat_timeout_s={TIMEOUT_S}"] if n > 1 else [])
    return [subprocess.Popen(cmd + multi(p), cwd=ROOT, env=env, stdout=open(run_dir / f"log-{p}.txt", "w"),
                             stderr=subprocess.STDOUT) for p in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost_pipeline")
    one, two = tmp / "one", tmp / "two"
    procs = _launch(one, 1, 2) + _launch(two, 2, 1)      # both runs at once
    _wait(procs[:1], one)
    _wait(procs[1:], two)
    return one, two


def _scores(run: pathlib.Path) -> dict:
    recs = [json.loads(x) for x in (run / "retroact" / "eval" / "trajectories.jsonl").read_text().splitlines()]
    # the sampled text, not its log-probs (the parameters agree to float rounding, ~1e-7)
    return {(r["task_index"], r["trial"]): (r["score"], r["success"], (r.get("reflection") or {}).get("text"))
            for r in recs}


@pytest.mark.slow
def test_two_processes_end_with_the_results_and_parameters_of_one(runs):
    from retroact_jax.stages import setup
    one, two = runs
    res = [json.loads((d / "retroact" / "eval" / "results.json").read_text()) for d in (one, two)]
    assert res[1]["processes"] == 2 and res[0]["num_tasks"] == 3
    for k in ("metrics", "actions", "num_tasks", "trials_run"):
        assert res[0][k] == res[1][k], k
    assert [{r: v.replace(str(d), "") for r, v in x["sources"].items()} for x, d in zip(res, runs)] == \
        [{r: f"/retroact/rl/export/{r}/hf" for r in ("planner", "reflector")}] * 2
    for role in ("planner", "reflector"):     # summed over the processes (prompt-cache reuse differs)
        for k in ("calls", "new_tokens"):
            assert res[0]["policy_stats"][role][k] == res[1]["policy_stats"][role][k], (role, k)
    assert _scores(one) == _scores(two) and len(_scores(one)) == 6       # 3 tasks x 2 trials, per task
    table = [json.loads((d / "results.json").read_text()) for d in (one, two)]
    assert table[0] == table[1] and len(table[0]) == 1
    for stage in ("il_planner+reflector", "retroact/rl"):
        a, b = setup.trained_params(one / stage), setup.trained_params(two / stage)
        assert a.keys() == b.keys() and a
        for k in a:       # reductions in another order: equal up to float rounding
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=f"{stage} {k}")
    for stage in ("il_planner+reflector", "retroact/rl"):     # training moved them (LoRA B starts at 0)
        assert any(np.abs(v).max() > 0 for k, v in setup.trained_params(two / stage).items() if "lora_b" in k), stage


@pytest.mark.slow
def test_process_0_writes_the_shared_files_and_the_expert_runs_once(runs):
    _, two = runs
    ev = two / "retroact" / "eval"
    tasks = [sorted({json.loads(x)["task_index"] for x in
                     (ev / f"process-{p}-of-2" / "trajectories.jsonl").read_text().splitlines()}) for p in (0, 1)]
    assert len(tasks[0]) == 2 and len(tasks[1]) == 1 and not set(tasks[0]) & set(tasks[1])
    expert = two / "il_planner+reflector" / "expert" / "hotpotqa"
    lines = (expert / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 6                 # 3 tasks x 2 trials, written once
    assert not list(expert.glob("process-*"))
    stages = json.loads((two / "stages.json").read_text())
    assert {"il_planner+reflector", "retroact/rl", "retroact/eval"} <= set(stages)
    log1 = (two / "log-1.txt").read_text()
    assert "| tiny-random |" not in log1 and "Traceback" not in log1   # the table is printed by process 0
