"""metrics.StageMemory: a stage's peak RSS (reset per stage), compile counters from jax.monitoring."""
import jax
import jax.numpy as jnp
import numpy as np

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
