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
