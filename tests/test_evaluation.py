"""Evaluation: IR/FR/AR arithmetic, output files, resume after an interruption, the entry point."""
import json
import subprocess
import sys

import pytest

import envs
from retroact_jax import evaluation
from retroact_jax.agent import gold, loop, rollout


def _rec(task, trial, score, success):
    return {"task_index": task, "trial": trial, "score": score, "success": success}


def test_summarize_carries_solved_scores_forward():
    recs = [_rec(0, 1, 1.0, True),                                     # solved at once
            _rec(1, 1, 0.5, False), _rec(1, 2, 1.0, True),              # solved at trial 2
            _rec(2, 1, 0.0, False), _rec(2, 2, 0.2, False), _rec(2, 3, 0.4, False)]
    s = evaluation.summarize("intercode_sql", recs, trials=3)
    reward = s["metrics"]["reward"]
    assert reward["per_trial"] == pytest.approx([100 * 1.5 / 3, 100 * 2.2 / 3, 100 * 2.4 / 3])
    assert reward["IR"] == pytest.approx(50.0) and reward["FR"] == pytest.approx(80.0)
    assert reward["AR"] == pytest.approx(100 * (1.5 + 2.2 + 2.4) / 9)
    sr = s["metrics"]["success_rate"]["per_trial"]
    assert sr == pytest.approx([100 / 3, 200 / 3, 200 / 3])
    assert s["num_tasks"] == 3 and s["trials_run"] == 6
    hp = evaluation.summarize("hotpotqa", recs, trials=3)
    assert set(hp["metrics"]) == {"f1", "em"}
    with pytest.raises(ValueError):
        evaluation.summarize("alfworld", [], 3)


def test_table2_layout():
    s = evaluation.summarize("alfworld", [_rec(0, 1, 0.0, False), _rec(0, 2, 1.0, True)], 2)
    md = evaluation.table2([("Llama-2-7B", "RetroAct", {"alfworld": s})])
    row = [ln for ln in md.splitlines() if ln.startswith("| Llama-2-7B")][0]
    assert row == "| Llama-2-7B | RetroAct | 0.00 | 100.00 | 50.00 | 50.00 |"
    assert "ALFWorld success_rate IR" in md


class Interrupt(RuntimeError):
    pass


class Flaky:
    """Wraps a policy and raises after ``n`` generate() calls (a crash mid-evaluation)."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def generate(self, *a, **k):
        if self.n <= 0:
            raise Interrupt("simulated crash")
        self.n -= 1
        return self.inner.generate(*a, **k)

    def release(self, keys):
        self.inner.release(keys)

    def count_tokens(self, text):
        return self.inner.count_tokens(text)


def _eval(run_dir, n_calls=None):
    indices = [0, 1, 2, 3, 4]
    probe = envs.make("hotpotqa", "test")
    tasks = {i: probe.task_at(i) for i in indices}
    pol = gold.gold_policy(tasks, fail_trials=1)
    if n_calls is not None:
        pol = Flaky(pol, n_calls)
    cfg = loop.AgentConfig(trials=3, batch_size=2, env_workers=2)
    return rollout.evaluate("hotpotqa", "test", indices, pol, pol, cfg, run_dir, show_progress=False)


def _lines(path):
    return [json.loads(x) for x in (path / "trajectories.jsonl").read_text().splitlines()]


def test_interrupted_evaluation_resumes_to_identical_results(tmp_path):
    ref = _eval(tmp_path / "ref")
    for n in (7, 23):
        d = tmp_path / f"cut{n}"
        with pytest.raises(Interrupt):
            _eval(d, n_calls=n)
        partial = len(_lines(d))
        assert 0 < partial < len(_lines(tmp_path / "ref"))
        with open(d / "trajectories.jsonl", "a") as f:     # a torn line from the crash
            f.write('{"task_index": 4, "trial"')
        got = _eval(d)
        assert got["metrics"] == ref["metrics"]
        a, b = _lines(tmp_path / "ref"), _lines(d)
        keys = [(r["task_index"], r["trial"]) for r in b]
        assert len(keys) == len(set(keys)) == len(a)
        strip = lambda r: {k: v for k, v in r.items()}
        assert sorted(map(json.dumps, map(strip, a))) == sorted(map(json.dumps, map(strip, b)))
        # a third run finds everything done and runs nothing
        assert _eval(d)["metrics"] == ref["metrics"] and len(_lines(d)) == len(a)


def test_outputs_are_well_formed(tmp_path):
    s = _eval(tmp_path)
    evaluation.write_outputs(tmp_path, s, "scripted", "retroact")
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["env"] == "hotpotqa" and res["method"] == "retroact"
    assert len(res["metrics"]["f1"]["per_trial"]) == 3
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "results.md").read_text()
    assert "| scripted | retroact |" in md
    for r in _lines(tmp_path):
        assert {"task_id", "trial", "memory", "score", "success", "planner", "steps",
                "reflection"} <= set(r)
        text = "".join(s["text"] for s in r["planner"]["spans"])
        for st in r["steps"]:
            assert st["action"] in text
        gen = [s for s in r["planner"]["spans"] if s["role"] == "generated"]
        assert len(gen) == sum(not c["discarded"] for c in r["planner"]["calls"])


def test_entry_point_rejects_unknown_keys_and_runs_scripted(tmp_path):
    base = [sys.executable, "-m", "experiments.run", "--config=experiments/configs/hotpotqa.py"]
    bad = subprocess.run(base + ["--config.eval.no_such_key=1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no_such_key" in bad.stderr
    bad = subprocess.run(base + ["--config.stages=eval,xyz"], capture_output=True, text=True)
    assert bad.returncode != 0 and "xyz" in bad.stderr
    ok = subprocess.run(base + ["--config.model.policy=scripted-gold", "--config.eval.num_tasks=2",
                                "--config.stages=eval",
                                "--config.eval.trials=2", f"--config.run_dir={tmp_path}",
                                "--config.eval.progress=False"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    res = json.loads((tmp_path / "retroact" / "eval" / "results.json").read_text())
    assert res["metrics"]["f1"]["IR"] == pytest.approx(100.0) and res["num_tasks"] == 2
    table = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in table] == ["RetroAct"] and table[0]["metrics"] == res["metrics"]
