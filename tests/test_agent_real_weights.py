"""End to end with the embedded SmolLM2-135M-Instruct: 2 tasks x 2 trials on each environment
through experiments.run (LM planner + LM reflector, incremental KV cache)."""
import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]

ENVS = [pytest.param("hotpotqa", id="hotpotqa"),
        pytest.param("intercode_sql", id="intercode_sql", marks=pytest.mark.mariadb),
        pytest.param("alfworld", id="alfworld", marks=pytest.mark.alfworld),
        pytest.param("intercode_bash", id="intercode_bash", marks=pytest.mark.bwrap)]


@pytest.mark.parametrize("env", ENVS)
def test_smollm2_two_tasks_two_trials(env, tmp_path):
    cmd = [sys.executable, "-m", "experiments.run", f"--config=experiments/configs/{env}.py",
           "--config.eval.num_tasks=2", "--config.eval.trials=2", "--config.eval.batch_size=2",
           "--config.eval.max_steps=3", "--config.eval.planner_max_tokens=48",
           "--config.eval.reflector_max_tokens=48", "--config.eval.env_backend=threads",
           "--config.eval.env_workers=1", f"--config.run_dir={tmp_path}",
           "--config.eval.progress=False"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["num_tasks"] == 2 and len(res["metrics"][res["primary"]]["per_trial"]) == 2
    recs = [json.loads(x) for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert {r["task_index"] for r in recs} == {0, 1}
    for r in recs:
        gen = [s for s in r["planner"]["spans"] if s["role"] == "generated"]
        assert gen and all(s["token_ids"] and len(s["logprobs"]) == len(s["token_ids"]) for s in gen)
        assert all(lp <= 0.0 for s in gen for lp in s["logprobs"])
        if r["trial"] == 2:
            first = next(x for x in recs if x["task_index"] == r["task_index"] and x["trial"] == 1)
            assert r["memory"] == [first["reflection"]["text"]]
    stats = res["policy_stats"]["planner"]
    assert stats["reused_tokens"] > 0      # the KV cache was extended, not re-prefilled
