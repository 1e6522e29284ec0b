"""Re-evaluate a published Table 2 (``results/table2_cpu/<env>/``): every fine-tuned method from the base
model + its committed LoRA adapters (IL, then RL, merged in turn), greedy, on the published tasks;
the per-task scores must equal the published ``results.json`` (exit 1 otherwise).

    python -m experiments.table2 --published=results/table2_cpu/hotpotqa [--methods=sft,retroact]

The table itself is made by ``python -m experiments.run --config=experiments/configs/table2_cpu.py
--config.env=<env>`` (its ``config.publish`` step writes the directory).
"""
from __future__ import annotations

import json
import sys

from absl import app, flags

from retroact_jax import cli

_PUBLISHED = flags.DEFINE_string("published", None, "a published table's directory (results/table2_cpu/<env>)")
_RUN_DIR = flags.DEFINE_string("run_dir", "", "where the re-evaluation runs ('' = runs/reeval/<env>)")
_METHODS = flags.DEFINE_list("methods", [], "runs to re-evaluate (default: every published adapter set)")


def main(argv) -> None:
    if len(argv) > 1:
        cli.die(f"unexpected arguments: {argv[1:]}")
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


if __name__ == "__main__":
    app.run(main)
