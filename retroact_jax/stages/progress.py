"""A run directory's finished pieces, carried through git to another machine.

A Table 2 run takes longer than one session on a machine that may not be kept. ``save`` copies what
makes the run resumable into a directory you commit; ``restore`` puts it back into the run directory on
a fresh checkout, and the rerun command skips the finished stages and resumes the unfinished ones:

    save:     every file of the run directory except the merged HF exports (``export/<name>/hf/``,
              ~0.5 GB each), the checkpoints of finished stages and files over ``max_mb`` (listed in
              ``progress.json``): the stages' summaries, stage configs, metrics, LoRA exports, the
              unfinished stages' checkpoints, the expert's and the evals' trajectory files, stages.json
    restore:  copies the saved files that the run directory lacks (a file it has is newer: kept), then
              rebuilds each missing HF export from its stage's source model and LoRA adapters, IL
              stages before RL stages (an RL stage's source is its IL stage's export)

The rebuilt export is the original's bytes: the same base weights, the same float32 adapters, the
same merge (tests/test_table2.py checks it). Restore into the run directory the progress was saved
from (the stage summaries name their exports by that path).

    python -m experiments.table2 --save_progress --run_dir=runs/table2_cpu/hotpotqa \\
        --progress_dir=results/table2_cpu/hotpotqa/progress
    python -m experiments.table2 --restore_progress --run_dir=... --progress_dir=...
"""
from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Any

from retroact_jax.stages import StageError

log = logging.getLogger(__name__)
MANIFEST = "progress.json"


def _exported(path: pathlib.Path, run: pathlib.Path) -> bool:
    """A file of a merged HF export (``.../export/<name>/hf/...``): rebuilt on restore, never saved."""
    parts = path.relative_to(run).parts
    return any(parts[i] == "export" and parts[i + 2] == "hf" for i in range(len(parts) - 2))


def _finished_checkpoint(path: pathlib.Path, run: pathlib.Path) -> bool:
    """A checkpoint of a finished stage (its ``<stage>_summary.json`` exists): only an unfinished
    stage resumes from its checkpoints; a finished one is read through its summary and exports."""
    parts = path.relative_to(run).parts
    if "checkpoints" not in parts:
        return False
    stage_dir = run.joinpath(*parts[:parts.index("checkpoints")])
    return any((stage_dir / f"{s}_summary.json").exists() for s in ("il", "rl"))


def save(run_dir: str | pathlib.Path, progress_dir: str | pathlib.Path, max_mb: float = 20.0) -> dict:
    """Mirror the run directory's resumable files into ``progress_dir`` (replacing what it held);
    returns the manifest (also written as ``progress_dir/progress.json``)."""
    run, out = pathlib.Path(run_dir), pathlib.Path(progress_dir)
    if not run.is_dir():
        raise StageError(f"save progress: no run directory {run}")
    if out.exists():
        shutil.rmtree(out)
    files, skipped = [], []
    for f in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = f.relative_to(run)
        if _exported(f, run) or _finished_checkpoint(f, run) or f.suffix == ".tmp":
            continue
        if f.stat().st_size > max_mb * 2**20:
            skipped.append({"path": str(rel), "mb": round(f.stat().st_size / 2**20, 1)})
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out / rel)
        files.append(str(rel))
    manifest = {"run_dir": str(run), "files": len(files), "skipped_over_max_mb": skipped, "max_mb": max_mb}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def restore(progress_dir: str | pathlib.Path, run_dir: str | pathlib.Path) -> dict:
    """Copy the saved files the run directory lacks, then rebuild its missing HF exports; returns
    {"copied": n, "rebuilt": [hf dirs]}."""
    src, run = pathlib.Path(progress_dir), pathlib.Path(run_dir)
    if not (src / MANIFEST).is_file():
        raise StageError(f"restore progress: {src} has no {MANIFEST} (made by save_progress)")
    saved_from = json.loads((src / MANIFEST).read_text())["run_dir"]
    if pathlib.Path(saved_from) != run:
        raise StageError(f"restore progress: it was saved from run_dir={saved_from}, not {run}: its stage "
                         "summaries name their exports by that path; restore into it")
    copied = 0
    for f in sorted(p for p in src.rglob("*") if p.is_file() and p.name != MANIFEST):
        dst = run / f.relative_to(src)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
            copied += 1
    rebuilt = []
    for summary in sorted(run.rglob("il_summary.json")) + sorted(run.rglob("rl_summary.json")):
        rebuilt += rebuild_exports(summary.parent, summary.name.split("_")[0])
    return {"copied": copied, "rebuilt": rebuilt}


def _source(stage_cfg: dict, name: str) -> str:
    model = stage_cfg["model"]
    return model["reflector"] or model["planner"] if name == "reflector" else model["planner"]


def rebuild_exports(stage_dir: pathlib.Path, stage: str) -> list[str]:
    """The finished stage's HF exports that are missing, rebuilt from its source models + its LoRA
    exports; returns the rebuilt dirs."""
    from retroact_jax.stages import evaluate
    missing = {n: pathlib.Path(hf) for n, hf in evaluate.exports(stage_dir, stage).items()
               if not (pathlib.Path(hf) / "config.json").is_file()}
    if not missing:
        return []
    cfg_file = stage_dir / "stage_config.json"
    if not cfg_file.is_file():
        raise StageError(f"restore progress: {stage_dir} has a summary but no stage_config.json")
    sc = json.loads(cfg_file.read_text())
    from retroact_jax.models import lora as lora_lib
    from retroact_jax.stages import setup
    out = []
    for name, hf in missing.items():
        lora_dir = hf.parent / "lora"
        if not (lora_dir / lora_lib.ADAPTER_CONFIG).is_file():
            raise StageError(f"restore progress: {hf} is missing and {lora_dir} holds no adapters to rebuild it")
        source = _source(sc, name)
        model, tok, model_cfg = setup.load_one(source, sc["model"]["param_dtype"], int(sc.get("seed", 0)))
        lcfg = lora_lib.load_lora(model, lora_dir)
        out.append(setup.export_model(model, hf.parent, model_cfg, tok, lcfg, _export_dtype(sc),
                                      save_adapter=False))
        log.info("restore progress: rebuilt %s from %s + %s", hf, source, lora_dir)
    return out


def _export_dtype(sc: dict) -> Any:
    return (sc.get("export") or {}).get("dtype") or None
