"""The entry point's handling of user mistakes: one ``error:`` line before any work, for a bad
value, an unknown env, an unknown key, a missing config file and a wrong type; optimizer kwargs
and names free from the command line (checked against the optax signature)."""
import json
import subprocess
import sys

import pytest

BASE = [sys.executable, "-m", "experiments.run", "--config=experiments/configs/quickstart.py"]
# the quickstart's IL on the tiny random model: its byte-level rows are long (2048 tokens, truncated);
# no base / IL comparison runs
TINY_IL = ("--config.il.data.long_rows=truncate", "--config.il.data.max_tokens=2048", "--config.eval.compare=")


def _run(*args):
    return subprocess.run(BASE[:3] + list(args), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, names", [
    ((BASE[3], "--config.eval.trials=-1"), "config.eval.trials=-1"),
    ((BASE[3], "--config.env=foo"), "config.env='foo'"),
    ((BASE[3], "--config.eval.no_such_key=1"), "--config.eval.no_such_key"),
    (("--config=experiments/configs/no_such_file.py",), "no_such_file.py"),
    ((BASE[3], "--config.eval.trials=many"), "--config.eval.trials=many"),
    ((BASE[3], "--config.rl.collect.top_p=0"), "config.rl.collect.top_p=0"),
    ((BASE[3], "--config.il.optimizer.name=sgd", "--config.il.optimizer.kwargs.b1=0.8"), "optax.sgd"),
    ((BASE[3], "--config.il.optimizer.kwargs.nope=1"), "['nope']"),
    ((BASE[3], "--config.method=sft", "--config.multi_agent=False"), "config.multi_agent=False"),
    ((BASE[3], "--config.il.train.max_steps=1", "--config.il.optimizer.schedule=linear"),
     "config.il.optimizer.warmup_steps="),
    ((BASE[3], "--compiled_budget_gb=-1"), "--compiled_budget_gb must be >= 0"),
    ((BASE[3], "--compiled_budget_gb=2", "--compilation_cache="), "needs --compilation_cache"),
])
def test_user_errors_are_one_line(args, names):
    r = _run(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("error: ") and names in lines[0]
    assert "Traceback" not in r.stderr


def test_verbose_keeps_the_traceback():
    r = _run(BASE[3], "--config.eval.trials=-1", "--verbose")
    assert r.returncode != 0 and "Traceback" in r.stderr and "eval.trials" in r.stderr


def test_optimizer_kwargs_and_name_from_the_command_line(tmp_path):
    r = _run(BASE[3], f"--config.run_dir={tmp_path}", "--config.model.planner=tiny-random",
             "--config.method=sft", "--config.stages=il", "--config.il.data.expert_tasks=2", "--config.il.train.max_steps=2",
             "--config.il.train.buckets=2048", "--config.il.data.eval_rows=0",
             "--config.il.train.progress=False", "--config.il.train.tensorboard=False",
             *TINY_IL, "--config.il.optimizer.name=sgd", "--config.il.optimizer.kwargs.momentum=0.9",
             "--config.rl.optimizer.kwargs.b1=0.8")
    assert r.returncode == 0, r.stderr[-3000:]
    il = json.loads((tmp_path / "il_planner" / "stage_config.json").read_text())
    assert il["optimizer"]["name"] == "sgd" and il["optimizer"]["kwargs"] == {"momentum": 0.9}
    top = json.loads((tmp_path / "config.json").read_text())
    assert top["rl"]["optimizer"]["kwargs"] == {"weight_decay": 0.0, "b1": 0.8}
    assert (tmp_path / "il_planner" / "il_summary.json").exists()


def test_a_diverged_run_stops_with_one_line(tmp_path):
    """The divergence guard's error (LoRA at an absurd learning rate) reaches the user as one line."""
    r = _run(BASE[3], f"--config.run_dir={tmp_path}", "--config.model.planner=tiny-random",
             "--config.method=sft", "--config.stages=il", "--config.il.data.expert_tasks=2",
             "--config.il.train.max_steps=3", "--config.il.train.buckets=2048", "--config.il.data.eval_rows=0",
             "--config.il.train.progress=False", "--config.il.train.tensorboard=False",
             *TINY_IL, "--config.il.optimizer.learning_rate=1e30", "--config.il.optimizer.warmup_steps=0")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines and lines[-1].startswith("error: "), r.stderr[-3000:]
    assert "step" in lines[-1] and "Traceback" not in r.stderr


def test_a_trajectory_log_of_another_env_stops_with_one_line(tmp_path):
    """Resuming an eval whose run dir holds another env's trajectories: one line naming the file,
    before any episode runs, and the file is left as it was."""
    log = tmp_path / "react" / "eval" / "trajectories.jsonl"
    log.parent.mkdir(parents=True)
    rec = {"env": "intercode_sql", "split": "test", "task_index": 0, "trial": 0, "task_id": "x"}
    log.write_text(json.dumps(rec) + "\n")
    r = _run(BASE[3], f"--config.run_dir={tmp_path}", "--config.model.planner=tiny-random",
             "--config.method=react", "--config.eval.num_tasks=1", "--config.eval.compare=")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines and lines[-1].startswith("error: "), r.stderr[-3000:]
    assert "trajectories.jsonl" in lines[-1] and "intercode_sql/test" in lines[-1]
    assert "Traceback" not in r.stderr
    assert log.read_text() == json.dumps(rec) + "\n"
