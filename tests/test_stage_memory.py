"""metrics.StageMemory: a stage's peak RSS (reset per stage), compile counters from jax.monitoring."""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retroact_jax import metrics


def test_stage_peak_rss_is_per_stage_and_compiles_are_counted():
    with metrics.StageMemory("big") as big:
        a = np.ones(40_000_000)          # 320 MB touched, then freed
        del a
        jax.jit(lambda x: x * 3 + 1)(jnp.ones(7)).block_until_ready()   # a new function: one compile
    with metrics.StageMemory("small") as small:
        pass
    assert big.summary["peak_rss_gb"] >= big.summary["end_rss_gb"] + 0.25
    assert big.summary["compiles"] >= 1 and big.summary["compile_s"] >= 0
    if not small.summary["peak_is_process_peak"]:      # /proc/self/clear_refs was writable
        assert small.summary["peak_rss_gb"] < big.summary["peak_rss_gb"] - 0.25
    assert small.summary["compiles"] == 0
    assert small.line().startswith("stage small: peak RSS ")


def test_stage_reports_the_arrays_it_leaves_alive():
    """``live_arrays_gb``: what a stage leaves behind (a leak shows here, freed arrays do not)."""
    with metrics.StageMemory("frees") as frees:
        x = jnp.ones((1000, 1000), jnp.float32) + 1      # 4 MB, dropped before the stage ends
        del x
    kept = []
    with metrics.StageMemory("keeps") as keeps:
        kept.append(jnp.ones((2000, 1000), jnp.float32) + 1)   # 8 MB still referenced
    assert keeps.summary["live_arrays_gb"] >= frees.summary["live_arrays_gb"] + 0.007
    assert "live arrays" in keeps.line()


def test_compiled_code_is_released_past_its_budget_and_results_do_not_change(monkeypatch):
    """``bound_compiled``: releases (``jax.clear_caches``) once the RSS no live array holds passes
    its floor + budget, not before, not again right after, never with budget 0; functions retrace."""
    traces = []

    @jax.jit
    def f(x):
        traces.append(1)
        return jnp.cumsum(x * 2) + 1

    x = jnp.arange(5.0)
    want = np.asarray(f(x))
    unheld = {"gb": 1.0}
    monkeypatch.setattr(metrics, "_unheld_gb", lambda: unheld["gb"])
    monkeypatch.setattr(metrics, "rss_gb", lambda: (unheld["gb"] + 0.5, 9.0))
    for k, v in (("releases", 0), ("released_gb", 0.0), ("budget_gb", 0.0), ("floor_gb", 0.0)):
        monkeypatch.setitem(metrics._COMPILED, k, v)    # restored whatever happens below
    metrics.set_compiled_budget(0.5)                    # floor 1.0
    with metrics.StageMemory("bounded") as stage:
        unheld["gb"] = 1.4
        assert not metrics.bound_compiled()
        unheld["gb"] = 1.6
        assert metrics.bound_compiled()
        assert not metrics.bound_compiled()             # the floor is now 1.6
        np.testing.assert_array_equal(np.asarray(f(x)), want)
    assert len(traces) == 2                             # traced again after the release
    assert stage.summary["compiled_releases"] == 1 and "compiled code released 1x" in stage.line()
    metrics.set_compiled_budget(0.0)
    unheld["gb"] = 50.0
    assert not metrics.bound_compiled()
    with pytest.raises(ValueError, match="compiled budget"):
        metrics.set_compiled_budget(-1.0)


def test_the_unheld_share_subtracts_this_process_host_arrays_only():
    """``_unheld_gb`` = RSS minus the live arrays' CPU shards: a new 80 MB array does not change it."""
    base = metrics._host_array_gb()
    x = jnp.ones((20_000_000,), jnp.float32) + 1         # 80 MB on the CPU device
    assert abs(metrics._host_array_gb() - base - 0.08) < 0.002
    del x


def test_merge_segments_adds_times_and_keeps_the_larger_peak():
    from retroact_jax.stages import pipeline
    first = {"peak_rss_gb": 7.9, "end_rss_gb": 2.0, "peak_is_process_peak": True, "wall_s": 4662.0,
             "compile_s": 39.0, "compiles": 49, "cache_hits": 3, "cache_misses": 1, "compiled_releases": 0,
             "compiled_released_gb": 0.0}
    resume = {"peak_rss_gb": 0.98, "end_rss_gb": 0.9, "peak_is_process_peak": False, "wall_s": 5.0,
              "compile_s": 2.0, "compiles": 0, "cache_hits": 2, "cache_misses": 0, "compiled_releases": 1,
              "compiled_released_gb": 0.5}
    got = pipeline.merge_segments(first, resume)
    assert got["wall_s"] == 4667.0 and got["compile_s"] == 41.0 and got["compiles"] == 49
    assert got["cache_hits"] == 5 and got["compiled_releases"] == 1 and got["compiled_released_gb"] == 0.5
    assert got["peak_rss_gb"] == 7.9 and got["peak_is_process_peak"] is True and got["end_rss_gb"] == 0.9
    assert got["segments"] == 2 and pipeline.merge_segments(got, resume)["segments"] == 3
    assert pipeline.merge_segments(resume, first)["peak_rss_gb"] == 7.9     # the later one larger


def test_a_resumed_stage_sums_its_segments_in_stages_json(tmp_path):
    import types
    from retroact_jax.stages import pipeline
    c = types.SimpleNamespace(run_dir=str(tmp_path))
    pipeline._measured(c, "m/eval", time.sleep, 0.2)
    pipeline._measured(c, "m/eval", time.sleep, 0.1, resumed=True)
    got = json.loads((tmp_path / "stages.json").read_text())["m/eval"]
    assert got["segments"] == 2 and got["wall_s"] >= 0.3
    pipeline._measured(c, "m/eval", time.sleep, 0.0)           # a fresh run replaces the figures
    fresh = json.loads((tmp_path / "stages.json").read_text())["m/eval"]
    assert "segments" not in fresh and fresh["wall_s"] <= got["wall_s"] - 0.2
