"""metrics.StageMemory: a stage's peak RSS (reset per stage), compile counters from jax.monitoring."""
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
