"""Training metrics: a JSONL + TensorBoard writer, throughput (tokens/s) and MFU, and metrics
fetched one step late so the host never blocks the device.

* ``MetricsWriter(dir)`` appends one JSON object per call to ``dir/metrics.jsonl``
  (``{"step", "split", "time", <name>: value}``) and writes the same scalars to TensorBoard
  (``dir/tb``, tensorboardX) as ``<split>/<name>``. ``start_step``: a resumed run first drops the
  JSONL lines of steps after its checkpoint (the killed run may have logged past it), so the file
  reads as one uninterrupted run.
* ``flops_per_token``: training FLOPs per token, nanoGPT / PaLM style: ``6 N`` for full fine-tuning
  (forward 2N, backward 4N) or ``4 N`` with frozen base weights (LoRA: no weight gradients, the
  activation gradients are still computed), plus attention ``12 L H d_head T`` (QK^T and AV, forward and
  backward; T = the padded row length, causal masking not subtracted).
* ``Throughput``: real (trained-row) tokens over wall time between metric fetches, and MFU =
  achieved FLOP/s / (``peak_flops`` per device x devices). ``peak_flops_per_device`` knows a few
  accelerators' dense bf16 peaks; elsewhere (CPU) MFU is reported only when a peak is configured.
* ``Lagged``: holds step n's device metrics and fetches them after step n+1 has been dispatched
  (nanodo's pattern): the device never waits for the host's logging.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

# dense bf16 peak FLOP/s per device (vendor datasheets); matched against jax's device_kind
_PEAKS = (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("a800", 312e12), ("l4", 121e12),
          ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v4", 275e12), ("v6", 918e12))


class MetricsError(ValueError):
    pass


def peak_flops_per_device(device: Any = None) -> float | None:
    """Dense bf16 peak of a known accelerator, else None (CPU peaks depend on the host: configure)."""
    device = device or jax.devices()[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    for name, peak in _PEAKS:
        if name in kind:
            return peak
    return None


def flops_per_token(n_params: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int,
                    frozen_base: bool = False) -> float:
    """Training FLOPs per token (see the module docstring)."""
    dense = (4.0 if frozen_base else 6.0) * n_params
    return dense + 12.0 * num_layers * num_heads * head_dim * seq_len


class Throughput:
    """tokens/s and MFU between ``update`` calls."""

    def __init__(self, peak_flops: float | None = None, n_devices: int = 1,
                 clock: Callable[[], float] = time.perf_counter):
        self.peak = float(peak_flops) * n_devices if peak_flops else None
        self.clock = clock
        self._t = clock()

    def restart(self) -> None:
        self._t = self.clock()

    def update(self, tokens: int, flops: float) -> dict[str, float]:
        now = self.clock()
        dt, self._t = max(now - self._t, 1e-9), now
        out = {"tokens_per_s": tokens / dt, "step_time_s": dt}
        if self.peak:
            out["mfu"] = flops / dt / self.peak
        return out


class Lagged:
    """``push(step, device_metrics, host)`` returns the previous push fetched to host floats."""

    def __init__(self, fetch: Callable[[Mapping[str, Any], int], dict[str, float]]):
        self.fetch = fetch
        self._pending: tuple[int, Mapping[str, Any], dict] | None = None

    def push(self, step: int, device_metrics: Mapping[str, Any], host: Mapping[str, Any]):
        prev, self._pending = self._pending, (step, device_metrics, dict(host))
        return self._resolve(prev)

    def flush(self):
        prev, self._pending = self._pending, None
        return self._resolve(prev)

    def _resolve(self, item):
        if item is None:
            return None
        step, dev, host = item
        out = self.fetch(dev, step)
        out.update(host)
        return step, out


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray)) and np.ndim(v) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)          # JSON has no NaN/inf; keep them readable
    return v


class MetricsWriter:
    def __init__(self, directory: str | os.PathLike, tensorboard: bool = True,
                 start_step: int | None = None):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if start_step is not None:
            self._truncate_after(int(start_step))
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.dir / "tb"))

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:     # a line torn by a kill
                continue
            if isinstance(rec, dict) and int(rec.get("step", -1)) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        rec = {"step": int(step), "split": split, "time": time.time()}
        for k, v in metrics.items():
            if k in rec:
                raise MetricsError(f"metric name {k!r} is reserved")
            rec[k] = _jsonable(v)
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NullWriter:
    """``MetricsWriter``'s interface, writing nothing (processes other than 0 of a multi-host run)."""

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        pass

    def close(self) -> None:
        pass


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


# ------------------------------------------------------------------------ memory and compile time
_COMPILE = {"compile_s": 0.0, "compiles": 0, "cache_hits": 0, "cache_misses": 0}
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_listening = False


def _on_duration(event: str, secs: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _COMPILE["compile_s"] += float(secs)
        if event == _COMPILE_EVENTS[-1]:
            _COMPILE["compiles"] += 1
            # XLA:CPU's compiler frees GBs of small heap blocks that glibc keeps (fragmented); the
            # executable's temp buffer is a fresh mapping on top of them: hand them back first
            _release_free_heap()


def _on_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _COMPILE["cache_hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        _COMPILE["cache_misses"] += 1


def compile_counters() -> dict:
    """Seconds spent tracing, lowering and compiling (or reading the persistent cache) since the
    first call (which starts listening; each compile then ends with ``malloc_trim``), the number of executables built (compiled or read from the persistent
    cache), persistent-cache hits and misses."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _listening = True
    return dict(_COMPILE)


def live_array_gb() -> float:
    """GB of the JAX arrays alive now (``jax.live_arrays``): after a stage, what it left behind."""
    return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted()) / 1e9


def rss_gb() -> tuple[float, float]:
    """(current RSS, peak RSS since the last ``reset_peak_rss``) of this process in GB (Linux; zeros
    where ``/proc`` is missing)."""
    vals = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    vals[line[:5]] = int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return vals.get("VmRSS", 0.0), vals.get("VmHWM", 0.0)


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """glibc ``malloc_trim(0)``: hand freed heap pages (a stage's executables' temp buffers) back to
    the OS so the next stage starts from what is live; a no-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------ compiled code's share of memory
# Every executable stays in JAX's caches with its traces for the life of the process: ~47 MB of RSS
# per sampler shape of SmolLM2-135M (30 layers, unrolled: ~1 MB a layer; bench/README.md). The Table
# 2 RetroAct eval (112 executables, most of them small helpers) ended with 2.85 GB of RSS and no live
# array. ``bound_compiled`` drops them all (``jax.clear_caches``) at a safe point once they pass a
# budget; the functions used next are retraced and read back from the persistent compilation cache
# (2/3 of a compile's time; counted in ``compile_s``: backend_compile_duration wraps the cache read).
_COMPILED = {"budget_gb": 0.0, "floor_gb": 0.0, "releases": 0, "released_gb": 0.0}


def set_compiled_budget(gb: float) -> None:
    """Let compiled code (RSS not held by live arrays, above its level now or after the last release)
    grow to ``gb`` before ``bound_compiled`` releases it; 0 = never (the library's default)."""
    if not gb >= 0:
        raise ValueError(f"compiled budget must be >= 0 GB, got {gb}")
    _COMPILED["budget_gb"] = float(gb)
    _COMPILED["floor_gb"] = _unheld_gb()


def _host_array_gb() -> float:
    """GB of live array shards this process holds in host memory (CPU devices; a replicated array
    counts once per device, a sharded one by this process's shards). Accelerator memory is not RSS."""
    total = 0
    for a in jax.live_arrays():
        if not a.is_deleted():
            total += sum(s.data.nbytes for s in a.addressable_shards if s.device.platform == "cpu")
    return total / 1e9


def _unheld_gb() -> float:
    """GB of this process's RSS that no live host array accounts for: the runtime, host data, and
    compiled executables with their traces."""
    return rss_gb()[0] - _host_array_gb()


def release_compiled() -> float:
    """Drop every compiled executable and JAX's trace / lowering caches (``jax.clear_caches``) and
    hand the freed heap back; returns the GB of RSS freed. Only between jitted calls."""
    before = rss_gb()[0]
    jax.clear_caches()
    gc.collect()
    _release_free_heap()
    freed = max(0.0, before - rss_gb()[0])
    _COMPILED["releases"] += 1
    _COMPILED["released_gb"] += freed
    _COMPILED["floor_gb"] = _unheld_gb()
    return freed


def bound_compiled() -> bool:
    """At a safe point (no trace in progress): ``release_compiled`` when the RSS that no live array
    holds exceeds its floor by more than the budget. True when it released."""
    budget = _COMPILED["budget_gb"]
    if budget <= 0 or rss_gb()[0] <= _COMPILED["floor_gb"] + budget:   # cheap test first
        return False
    if _unheld_gb() <= _COMPILED["floor_gb"] + budget:
        return False
    release_compiled()
    return True


def compiled_counters() -> dict:
    """Releases of compiled code so far and the GB they freed."""
    return {"releases": _COMPILED["releases"], "released_gb": _COMPILED["released_gb"]}


class PeakWatch:
    """Where a stage's peak RSS happens, among one component's phases: ``with watch.phase("decode",
    context_fn): ...`` keeps, in ``watch.peak``, the last of its phases during which the process peak
    (VmHWM, reset per stage) rose, with ``context_fn()`` (shapes, cache GB) and the GB of live arrays,
    both read after the phase. When its ``peak_rss_gb`` is below the stage's (stages.json), the peak
    came elsewhere (another component, scoring, env steps). Two /proc reads a phase."""

    def __init__(self):
        self.peak: dict = {}

    @contextlib.contextmanager
    def phase(self, name: str, context_fn: Callable[[], Mapping[str, Any]] = dict):
        before = rss_gb()[1]
        yield
        after = rss_gb()[1]
        if after > before + 0.005 and after >= self.peak.get("peak_rss_gb", 0.0):
            self.peak = {"peak_rss_gb": round(after, 2), "phase": name,
                         "live_arrays_gb": round(live_array_gb(), 2), **context_fn()}


class StageMemory:
    """``with StageMemory("il") as m: ...`` -> ``m.summary``: the stage's peak and end RSS (GB; end after
    ``malloc_trim`` and ``bound_compiled``), wall seconds, compile seconds (persistent-cache reads
    included), backend compiles, persistent-cache hits / misses, and the releases of compiled code
    (``compiled_releases``, ``compiled_released_gb``) during the stage; ``line()`` is the one-line
    report the run prints."""

    def __init__(self, stage: str):
        self.stage, self.summary = stage, {}

    def __enter__(self):
        self._exact = reset_peak_rss()
        self._c0, self._t0, self._r0 = compile_counters(), time.time(), compiled_counters()
        return self

    def __exit__(self, *exc):
        c1 = compile_counters()
        gc.collect()                  # the stage's models / learner / caches, if nothing holds them
        _release_free_heap()
        bound_compiled()
        r1 = compiled_counters()
        rss, peak = rss_gb()
        self.summary = {"peak_rss_gb": round(peak, 2), "end_rss_gb": round(rss, 2),
                        "live_arrays_gb": round(live_array_gb(), 3),
                        "peak_is_process_peak": not self._exact,
                        "wall_s": round(time.time() - self._t0, 1),
                        **{k: round(c1[k] - self._c0[k], 1) if k == "compile_s" else c1[k] - self._c0[k]
                           for k in c1},
                        "compiled_releases": r1["releases"] - self._r0["releases"],
                        "compiled_released_gb": round(r1["released_gb"] - self._r0["released_gb"], 2)}
        return False

    def line(self) -> str:
        s = self.summary
        return (f"stage {self.stage}: peak RSS {s['peak_rss_gb']:.2f} GB (end {s['end_rss_gb']:.2f}, "
                f"live arrays {s['live_arrays_gb']:.2f}), "
                f"wall {s['wall_s']:.0f} s, compile {s['compile_s']:.0f} s ({s['compiles']} compiles, "
                f"persistent cache {s['cache_hits']} hits / {s['cache_misses']} misses; "
                f"compiled code released {s['compiled_releases']}x, {s['compiled_released_gb']:.2f} GB)")
