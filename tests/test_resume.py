"""Resume for real: the IL stage runs in a subprocess, is killed with SIGKILL once a checkpoint
exists, is restarted with the same command, and must end with the parameters of an uninterrupted
run (tiny random models, both roles, LoRA with dropout so the RNG state must be restored too)."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from retroact_jax import batching
from retroact_jax.stages import il as il_stage
from retroact_jax.stages import samples as S

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_data(path: pathlib.Path, n_planner=48, n_reflector=20) -> None:
    rows = []
    for i in range(n_planner):
        rows.append(batching.Sample("planner", (
            ("prompt", f"Question: what is {i} plus {i % 7}?"), ("observation", "\nThought 1:"),
            ("generated", f" add them: {i + i % 7}.\n"), ("observation", "Observation 1: ok"),
            ("generated", f"\nFinish[{i + i % 7}]\n"))))
    for i in range(n_reflector):
        rows.append(batching.Sample("reflector", (
            ("prompt", f"Trial on {i} failed.\n\nNew plan:"),
            ("generated", f" I should compute {i} carefully{'!' * (i % 5)}.\n"))))
    path.write_text("".join(json.dumps(S.sample_to_json(s)) + "\n" for s in rows))


def overrides(data: pathlib.Path, **extra) -> dict:
    o = {"model.planner": "tiny-random", "model.lora_dropout": 0.1, "data.released": "",
         "data.files": str(data), "data.eval_rows": 4, "train.epochs": 4, "train.buckets": "48",
         "train.rows_planner": 2, "train.rows_reflector": 1, "train.eval_every": 0,
         "train.checkpoint_every": 8, "train.keep_checkpoints": 3, "train.log_every": 1,
         "train.progress": False, "train.tensorboard": False, "export.enabled": False,
         "optimizer.warmup_steps": 4, "optimizer.learning_rate": 1e-2,
         "train.pack": True}   # packed epochs resume exactly too
    o.update(extra)
    return o


def _cmd(workdir, over_file):
    return [sys.executable, "-m", "retroact_jax.stages.il", str(workdir), str(over_file)]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)          # both runs: the same single-device setup
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _steps(ckdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in ckdir.glob("*") if p.is_dir() and p.name.isdigit()) \
        if ckdir.exists() else []


@pytest.mark.slow
def test_sigkill_and_restart_ends_with_the_uninterrupted_parameters(tmp_path):
    data = tmp_path / "data.jsonl"
    write_data(data)
    over = tmp_path / "over.json"
    over.write_text(json.dumps(overrides(data)))
    full, killed = tmp_path / "full", tmp_path / "killed"

    subprocess.run(_cmd(full, over), env=_env(), cwd=ROOT, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cmd(killed, over), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not _steps(killed / "checkpoints") and proc.poll() is None and time.time() - t0 < 600:
        time.sleep(0.01)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, "the run ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    total = json.loads((full / "il_summary.json").read_text())["steps"]
    at_kill = _steps(killed / "checkpoints")
    assert at_kill and max(at_kill) < total

    out = subprocess.run(_cmd(killed, over), env=_env(), cwd=ROOT, check=True, capture_output=True,
                         text=True, timeout=600)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0 < summary["resumed_from"] < total and summary["steps"] == total

    a, b = il_stage.trained_params(full), il_stage.trained_params(killed)
    assert a.keys() == b.keys() and any("planner" in k for k in a) and any("reflector" in k for k in a)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    assert any(np.any(v != 0) for k, v in a.items() if "lora_b" in k)     # training happened

    # the resumed run's log reads as one run: every train step once, in order
    steps = [r["step"] for r in il_stage.metrics_lib.read_jsonl(killed / "metrics.jsonl")
             if r["split"] == "train"]
    assert steps == list(range(1, total + 1))
