"""Command-line plumbing of ``experiments/run.py``: user errors as one line, optimizer kwargs
free from the command line, multi-host start, the compilation cache, quiet checkpoint logs.

* ``parse_flags`` (absl ``flags_parser``): ``--config.<stage>.optimizer.kwargs.<name>=<value>``
  is taken out before absl parses (the locked config would refuse a new key) and applied after,
  any value Python can read (``0.8``, ``True``, ``(0.9, 0.95)``); ``optimizer.name`` may change
  freely: a default ``weight_decay`` the new optimizer does not take is dropped, one given on the
  command line stays and is checked with the other kwargs against the optax signature.
* ``user_errors``: a bad flag, a missing config file, an unknown key, a wrong type, an invalid
  value (``ConfigError`` and friends) or a stage that cannot run as configured (``StageError``)
  print ``error: ...`` on one line and exit 2; ``--verbose`` keeps the traceback.
"""
from __future__ import annotations

import ast
import contextlib
import inspect
import os
import pathlib
import re
import sys
from typing import Any

_KWARG = re.compile(r"^--config\.((?:\w+\.)*)optimizer\.kwargs\.(\w+)=(.*)$")
_taken: list[tuple[str, str, Any]] = []


class UserError(Exception):
    """Raised for what the user typed; printed as one line."""


def die(msg: str) -> None:
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(2)


def verbose(argv=None) -> bool:
    return "--verbose" in (sys.argv if argv is None else argv)


def parse_flags(argv: list[str]) -> list[str]:
    from absl import flags
    keep = []
    for a in argv:
        m = _KWARG.match(a)
        if m:
            try:
                value = ast.literal_eval(m.group(3))
            except (ValueError, SyntaxError):
                value = m.group(3)
            _taken.append((m.group(1).rstrip("."), m.group(2), value))
        else:
            keep.append(a)
    cfg = next((a.split("=", 1)[1] for a in keep if a.startswith("--config=")), None)
    if cfg is not None and not pathlib.Path(cfg.split(":", 1)[0]).is_file():
        die(f"--config={cfg}: no such config file")
    if argv is sys.argv or argv == sys.argv:
        sys.argv[:] = keep             # config_flags reads the overrides from sys.argv too
    try:
        return flags.FLAGS(keep)
    except flags.Error as e:
        if verbose(argv):
            raise
        die(e)
    except (AttributeError, KeyError) as e:      # an override of a key the config lacks
        if verbose(argv):
            raise
        die(f"{_override_of(str(e).strip(chr(34) + chr(39)), keep)}: unknown config key")


def _override_of(key: str, argv: list[str]) -> str:
    given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and f".{key}" in a]
    return given[0] if given else key


def load_config(flag) -> Any:
    """The parsed config (unknown keys named), with the optimizer kwargs applied."""
    try:
        c = flag.value
    except (AttributeError, KeyError) as e:
        die(f"{_override_of(str(e).strip(chr(34) + chr(39)), sys.argv)}: unknown config key")
    if c is None:
        die("--config=experiments/configs/<name>.py is required")
    for path, name, value in _taken:
        block = c
        for part in path.split(".") if path else ():
            if part not in block:
                die(f"--config.{path}.optimizer.kwargs.{name}: unknown config key {part!r}")
            block = block[part]
        if "optimizer" not in block:
            die(f"--config.{path}.optimizer.kwargs.{name}: {path or 'the config'} has no optimizer")
        with block.optimizer.unlocked():
            block.optimizer.kwargs[name] = value
    _drop_default_weight_decay(c)
    return c


def _drop_default_weight_decay(c: Any) -> None:
    explicit = {(p, n) for p, n, _ in _taken}
    for path in ("il", "rl"):
        if path not in c or (path, "weight_decay") in explicit or c[path].optimizer.name == "adamw":
            continue                       # adamw (the default) takes it; optax loads only if needed
        import optax
        o = c[path].optimizer
        fn = getattr(optax, o.name, None)
        if fn is not None and "weight_decay" in o.kwargs and \
                "weight_decay" not in inspect.signature(fn).parameters:
            with o.unlocked():
                del o.kwargs["weight_decay"]


@contextlib.contextmanager
def user_errors():
    """One line for the user's mistakes (``--verbose``: the traceback)."""
    from retroact_jax import benchmarks
    from retroact_jax.stages import StageError, methods, validate
    try:
        yield
    except Exception as e:   # noqa: BLE001 - re-raised unless it is one of the user-facing errors
        if verbose() or not isinstance(e, (UserError, validate.ConfigError, methods.MethodError,
                                           benchmarks.BenchmarkError, StageError) + _run_errors()):
            raise
        die(e)


# errors a run stops with that name what to do (a damaged checkpoint with no intact step, a bad weights
# directory, a diverged run, a trajectory log of another env / split): one line too; looked up only when their module is loaded (no JAX import)
_RUN_ERRORS = (("retroact_jax.checkpoint", "CheckpointError"), ("retroact_jax.train", "TrainError"),
               ("retroact_jax.models.convert", "CheckpointError"),
               ("retroact_jax.models.safetensors_io", "CheckpointError"),
               ("retroact_jax.models.embedded", "EmbeddedModelError"),
               ("retroact_jax.evaluation", "TrajectoryError"))


def _run_errors() -> tuple:
    return tuple(getattr(sys.modules[m], n) for m, n in _RUN_ERRORS if m in sys.modules)


def init_jax(coordinator: str | None, num_processes: int | None, process_id: int | None,
             compile_cache: str, heartbeat_timeout_s: int = 100) -> None:
    """Multi-host start (when asked) and the persistent compilation cache. CPU processes talk
    through gloo (XLA:CPU has no cross-process collectives otherwise; accelerators use their own).
    A process silent for ``heartbeat_timeout_s`` (jax's default 100 s) stops every process."""
    import jax
    from absl import logging
    if coordinator:
        if num_processes is None or process_id is None:
            die("--coordinator_address needs --num_processes and --process_id")
        if not 0 <= process_id < num_processes:
            die(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
        if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)
        logging.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(),
                     jax.process_count(), jax.device_count())
    if compile_cache:
        path = os.path.expanduser(compile_cache)
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class QuietLibraries:
    """Drops the INFO lines of checkpointing libraries (Orbax logs every save at INFO through
    absl); their warnings and errors, and all of ours, still show. ``--verbosity=1`` keeps all."""
    NOISY = ("/orbax/",)

    def filter(self, record) -> bool:
        from absl import logging
        return (record.levelno > 20 or logging.get_verbosity() > 0
                or not any(n in record.pathname for n in self.NOISY))
