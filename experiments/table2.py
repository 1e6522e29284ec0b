"""Re-evaluate a published Table 2 (``results/table2_cpu/<env>/``): every fine-tuned method from the base
model + its committed LoRA adapters (IL, then RL, merged in turn), greedy, on the published tasks;
the per-task scores must equal the published ``results.json`` (exit 1 otherwise).

    python -m experiments.table2 --published=results/table2_cpu/hotpotqa [--methods=sft,retroact]

A run's finished pieces, carried to another machine through git (``retroact_jax/stages/progress.py``):

    python -m experiments.table2 --save_progress --run_dir=runs/table2_cpu/hotpotqa \\
        --progress_dir=results/table2_cpu/hotpotqa/progress          # then commit that directory
    python -m experiments.table2 --restore_progress --run_dir=runs/table2_cpu/hotpotqa \\
        --progress_dir=results/table2_cpu/hotpotqa/progress          # then rerun the table's command

The table itself is made by ``python -m experiments.run --config=experiments/configs/table2_cpu.py
--config.env=<env>`` (its ``config.publish`` step writes the directory).
"""
from __future__ import annotations

import json
import sys

from absl import app, flags

from retroact_jax import cli

_PUBLISHED = flags.DEFINE_string("published", None, "a published table's directory (results/table2_cpu/<env>)")
_RUN_DIR = flags.DEFINE_string("run_dir", "", "where the re-evaluation runs ('' = runs/reeval/<env>); the run "
                               "directory to save / restore")
_METHODS = flags.DEFINE_list("methods", [], "runs to re-evaluate (default: every published adapter set)")
_SAVE = flags.DEFINE_bool("save_progress", False, "copy --run_dir's resumable files into --progress_dir")
_RESTORE = flags.DEFINE_bool("restore_progress", False, "put --progress_dir back into --run_dir, rebuilding exports")
_PROGRESS = flags.DEFINE_string("progress_dir", "", "a committed progress directory (save / restore)")


def main(argv) -> None:
    if len(argv) > 1:
        cli.die(f"unexpected arguments: {argv[1:]}")
    if _SAVE.value or _RESTORE.value:
        return _progress()
    import pathlib
    pub = pathlib.Path(_PUBLISHED.value or "")
    if not (pub / "adapters.json").is_file():
        cli.die(f"--published={_PUBLISHED.value}: no adapters.json there (a published table's directory)")
    cli.init_jax(None, None, None, "~/.cache/retroact_jax/xla")
    from retroact_jax.stages import publish
    env = json.loads((pub / "results.json").read_text())["env"]
    with cli.user_errors():
        got = publish.reevaluate(pub, _RUN_DIR.value or f"runs/reeval/{env}", _METHODS.value)
    for run, r in got.items():
        print(f"{run}: {r['tasks']} tasks, {len(r['mismatches'])} trial scores differ"
              + (f": {r['mismatches'][:5]}" if r["mismatches"] else ""))
    sys.exit(1 if any(r["mismatches"] for r in got.values()) else 0)


def _progress() -> None:
    if _SAVE.value == _RESTORE.value or not _PROGRESS.value or not _RUN_DIR.value:
        cli.die("progress: give one of --save_progress / --restore_progress, with --run_dir and --progress_dir")
    from retroact_jax.stages import progress
    with cli.user_errors():
        if _SAVE.value:
            got = progress.save(_RUN_DIR.value, _PROGRESS.value)
            print(f"saved {got['files']} files of {_RUN_DIR.value} into {_PROGRESS.value}"
                  + (f"; over {got['max_mb']} MB, not saved: {got['skipped_over_max_mb']}" if got["skipped_over_max_mb"] else ""))
            return
        cli.init_jax(None, None, None, "~/.cache/retroact_jax/xla")
        got = progress.restore(_PROGRESS.value, _RUN_DIR.value)
        print(f"restored {got['copied']} files into {_RUN_DIR.value}; rebuilt exports: {got['rebuilt']}")


if __name__ == "__main__":
    app.run(main)
