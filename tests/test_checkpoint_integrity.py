"""Sealed checkpoints: a truncated, byte-flipped or torn latest step (arrays, orbax metadata, the
meta JSON, a save killed before its seal) is skipped with a warning naming the step and why; the
run resumes from the newest intact step and ends with the uninterrupted run's parameters; the
damaged step is moved aside, never overwritten; no intact step is an error, never a fresh start;
leftover temporary folders of killed saves are removed (real Orbax, tiny random models)."""
import json
import logging
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from retroact_jax import checkpoint as C
from retroact_jax.stages import il as il_stage
from retroact_jax.stages import setup
from tests.test_resume import overrides, write_data


def _tree(x: float):
    return {"leaves": {"00000": jnp.arange(600, dtype=jnp.float32) * x, "00001": jnp.full((3, 4), x)}}


def _largest(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != C.SEAL),
               key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x01
    path.write_bytes(bytes(b))


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _torn_json(path: pathlib.Path) -> None:      # same size, no longer JSON: only the hash notices
    n = path.stat().st_size
    path.write_bytes((b"{\"stage\": " + b"x" * n)[:n])


DAMAGE = {
    "truncated_array": (lambda d: _truncate(_largest(d / "state")), "truncated"),
    "flipped_byte": (lambda d: _flip(_largest(d / "state")), "corrupted"),
    "torn_meta_json": (lambda d: _torn_json(d / "meta" / "metadata"), "corrupted"),
    "truncated_orbax_metadata": (lambda d: _truncate(d / "_CHECKPOINT_METADATA"), "truncated"),
    "unsealed": (lambda d: (d / C.SEAL).unlink(), f"no {C.SEAL}"),
    "no_commit_file": (lambda d: (d / "commit_success.txt").unlink(), "missing"),
    "garbled_seal": (lambda d: (d / C.SEAL).write_text("{\"files\": ["), "unreadable"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_newest_intact(tmp_path, caplog, kind):
    ck = C.Checkpointer(tmp_path / "ck", max_to_keep=3)
    for s in (1, 2, 3):
        ck.save(s, _tree(float(s)), {"step": s})
    ck.close()
    DAMAGE[kind][0](tmp_path / "ck" / "3")
    ck = C.Checkpointer(tmp_path / "ck", max_to_keep=3)
    with caplog.at_level(logging.WARNING, logger="retroact_jax.checkpoint"):
        state, meta = ck.restore(C.abstract_like(_tree(0.0)))
    assert meta == {"step": 2} and float(state["leaves"]["00001"][0, 0]) == 2.0
    lines = [r.getMessage() for r in caplog.records]
    assert any("step 3" in m and DAMAGE[kind][1] in m and "\n" not in m for m in lines), lines
    with pytest.raises(C.CheckpointError, match="step 3 .* damaged"):
        ck.restore(C.abstract_like(_tree(0.0)), step=3)      # asked for by number: refused
    # the next save of step 3 moves the damaged one aside (kept, not overwritten)
    ck.save(3, _tree(30.0), {"step": 30})
    aside = list((tmp_path / "ck" / C.SET_ASIDE).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("3-") and C.damage(aside[0]) is not None
    assert ck.latest_step == 3 and ck.restore(C.abstract_like(_tree(0.0)))[1] == {"step": 30}
    ck.close()


def test_the_seal_is_inside_the_step_when_it_appears(tmp_path, monkeypatch):
    """Sealed before orbax's rename: no moment exists where the step is there without its seal."""
    seen = []
    real = C.ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

    async def spy(self):
        if pathlib.Path(self.get_final()).name == "1":
            seen.append(sorted(p.name for p in pathlib.Path(self.get()).iterdir()))
        await real(self)
    monkeypatch.setattr(C.ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", spy)
    ck = C.Checkpointer(tmp_path / "ck")
    ck.save(1, _tree(1.0), {"step": 1})
    assert seen and C.SEAL in seen[0]
    listed = json.loads((tmp_path / "ck" / "1" / C.SEAL).read_text())["files"]
    assert "meta/metadata" in listed and any(n.startswith("state/") for n in listed)
    assert C.damage(tmp_path / "ck" / "1") is None
    ck.close()


def test_no_intact_step_is_an_error_not_a_fresh_start(tmp_path):
    ck = C.Checkpointer(tmp_path / "ck")
    for s in (1, 2):
        ck.save(s, _tree(float(s)), {"step": s})
    ck.close()
    _flip(_largest(tmp_path / "ck" / "1" / "state"))
    _truncate(_largest(tmp_path / "ck" / "2" / "state"))
    ck = C.Checkpointer(tmp_path / "ck")
    with pytest.raises(C.CheckpointError,
                       match="no intact checkpoint .*step 2: .*truncated.*step 1: .*corrupted"):
        ck.latest_step
    with pytest.raises(C.CheckpointError, match="no intact checkpoint"):
        ck.restore(C.abstract_like(_tree(0.0)))


def test_leftover_temporary_folder_is_removed_at_start(tmp_path, caplog):
    ck = C.Checkpointer(tmp_path / "ck")
    ck.save(1, _tree(1.0), {"step": 1})
    ck.close()
    left = tmp_path / "ck" / f"2{C._TMP_MARK}-1765000000"        # what a save killed mid-write leaves
    shutil.copytree(tmp_path / "ck" / "1", left)
    ck = C.Checkpointer(tmp_path / "ck")
    assert left.exists() and ck.latest_step == 1                  # readers never remove it
    with caplog.at_level(logging.WARNING, logger="retroact_jax.checkpoint"):
        assert ck.clean_leftovers() == [left]
    assert not left.exists() and "interrupted checkpoint save" in caplog.text


def test_another_structure_is_one_line(tmp_path):
    ck = C.Checkpointer(tmp_path / "ck")
    ck.save(1, _tree(1.0), {"step": 1})
    other = {"leaves": {"00000": jnp.zeros((7,)), "00001": jnp.zeros((3, 4))}}
    with pytest.raises(C.CheckpointError) as e:
        ck.restore(C.abstract_like(other))
    assert "step 1" in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 600
    ck.close()


# ---------------------------------------------------------------------------------- a whole run
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted IL run (LoRA with dropout, both roles) with every checkpoint kept."""
    tmp = tmp_path_factory.mktemp("il")
    data = tmp / "data.jsonl"
    write_data(data, 16, 8)
    c = il_stage.default_config()
    c.update_from_flattened_dict(overrides(data, **{"train.epochs": 2, "train.checkpoint_every": 4,
                                                    "train.keep_checkpoints": 5}))
    s = il_stage.run_il(c, tmp / "run")
    return c, tmp / "run", s["steps"], il_stage.trained_params(tmp / "run")


@pytest.mark.parametrize("kind", ["truncated_array", "flipped_byte", "torn_meta_json"])
def test_run_resumes_from_the_intact_step_to_the_uninterrupted_parameters(
        finished_run, tmp_path, caplog, kind):
    c, src, total, expected = finished_run
    wd = tmp_path / "run"
    shutil.copytree(src, wd)
    DAMAGE[kind][0](wd / "checkpoints" / str(total))
    with caplog.at_level(logging.WARNING, logger="retroact_jax.checkpoint"):
        s = il_stage.run_il(c, wd)
    assert s["resumed_from"] == total - 4 and s["steps"] == total
    assert f"checkpoint step {total} " in caplog.text and DAMAGE[kind][1] in caplog.text
    got = il_stage.trained_params(wd)
    assert got.keys() == expected.keys()
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-6, err_msg=k)
    assert [p.name.split("-")[0] for p in (wd / "checkpoints" / C.SET_ASIDE).iterdir()] == [str(total)]
    steps = [r["step"] for r in il_stage.metrics_lib.read_jsonl(wd / "metrics.jsonl")
             if r["split"] == "train"]
    assert steps == list(range(1, total + 1))


def test_run_with_no_intact_checkpoint_stops_before_training(finished_run, tmp_path):
    c, src, total, _ = finished_run
    wd = tmp_path / "run"
    shutil.copytree(src, wd)
    for d in (wd / "checkpoints").iterdir():
        if d.name.isdigit():
            (d / C.SEAL).unlink()
    with pytest.raises(C.CheckpointError, match="no intact checkpoint"):
        il_stage.run_il(c, wd)
    assert not (wd / "checkpoints" / C.SET_ASIDE).exists()      # nothing moved, nothing trained


def test_stage_reader_never_moves_or_cleans(finished_run, tmp_path):
    _, src, total, expected = finished_run
    wd = tmp_path / "run"
    shutil.copytree(src, wd)
    _flip(_largest(wd / "checkpoints" / str(total) / "state"))
    left = wd / "checkpoints" / f"{total + 4}{C._TMP_MARK}-1"
    left.mkdir()
    ck = setup.TrainCheckpoints(wd / "checkpoints")
    flat, meta = ck.read()
    ck.close()
    assert meta["step"] == total - 4 and left.exists() and (wd / "checkpoints" / str(total)).exists()
