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
           "--config.eval.progress=False", "--config.stages=eval"]   # the base model, no training
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "retroact" / "eval"
    res = json.loads((run / "results.json").read_text())
    assert res["num_tasks"] == 2 and len(res["metrics"][res["primary"]]["per_trial"]) == 2
    recs = [json.loads(x) for x in (run / "trajectories.jsonl").read_text().splitlines()]
    assert {r["task_index"] for r in recs} == {0, 1}
    for r in recs:
        # generated spans carry the sampled ids and log-probs; only InterCode's action fallback keeps
        # a text-only span (the first line of a completion that wrote no "Action n: ")
        gen = [s for s in r["planner"]["spans"] if s["role"] == "generated"]
        sampled = [s for s in gen if "token_ids" in s]
        assert sampled and all(len(s["logprobs"]) == len(s["token_ids"]) > 0 for s in sampled)
        assert all(lp <= 0.0 for s in sampled for lp in s["logprobs"])
        assert env.startswith("intercode") or len(sampled) == len(gen)
        if r["trial"] == 2:
            first = next(x for x in recs if x["task_index"] == r["task_index"] and x["trial"] == 1)
            assert r["memory"] == [first["reflection"]["text"]]
    stats = res["policy_stats"]["planner"]
    assert stats["reused_tokens"] > 0      # the KV cache was extended, not re-prefilled
