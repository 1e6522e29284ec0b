"""Entry point: ``python -m experiments.run --config=experiments/configs/<env>.py [--config.x=y]``.

One command runs a method of the paper as its whole pipeline (``--config.method=react | reflexion
| sft | sft_ei | sft_rl | retroact``, ``--config.multi_agent=False`` for single-agent RetroAct) or
several into one table (``--config.methods=react,sft,retroact``); see README's methods table and
``retroact_jax/stages/pipeline.py``. The whole config is validated before the first stage starts;
mistakes print one ``error:`` line (``--verbose``: the traceback). Finished pieces are skipped on a
rerun, unfinished ones resume.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from retroact_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_bool("verbose", False, "tracebacks for configuration errors too")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-host: host:port of process 0 (jax.distributed.initialize); "
    "unset on a single host")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "multi-host: a process silent this long stops every process")
_COMPILE_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/retroact_jax/xla",
    "persistent XLA compilation cache directory ('' = off): later runs skip recompiling")
_COMPILED_BUDGET = flags.DEFINE_float(
    "compiled_budget_gb", 0.0, "GB of compiled executables (RSS no live host array holds) kept "
    "before all are released between model calls and reread from --compilation_cache (0 = keep all; "
    "a host-memory budget: on accelerators it counts the host's share only)")


def main(argv) -> None:
    logging.get_absl_handler().addFilter(cli.QuietLibraries())
    if len(argv) > 1:
        cli.die(f"unexpected arguments: {argv[1:]}")
    if not _COMPILED_BUDGET.value >= 0:
        cli.die(f"--compiled_budget_gb must be >= 0, got {_COMPILED_BUDGET.value}")
    if _COMPILED_BUDGET.value > 0 and not _COMPILE_CACHE.value:
        cli.die("--compiled_budget_gb > 0 needs --compilation_cache: every release would recompile")
    from retroact_jax.stages import pipeline, validate
    with cli.user_errors():
        c = cli.load_config(_CONFIG)
        pipeline.resolve(c)
        validate.validate(c)
    cli.init_jax(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _COMPILE_CACHE.value,
                 heartbeat_timeout_s=_HEARTBEAT.value)
    from retroact_jax import metrics
    metrics.compile_counters()          # count compile time from before the first stage
    metrics.set_compiled_budget(_COMPILED_BUDGET.value)
    with cli.user_errors():
        pipeline.run(c)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cli.parse_flags))
