"""retroact-jax: RetroAct (retrospective language agents, joint policy gradient) in JAX / Flax NNX.

The public API, imported on first use (``import retroact_jax`` stays light):

    retroact_jax.run(config)                    # methods of Table 2 as whole pipelines, one table
    retroact_jax.validate(config)               # every stage's config, before anything runs
    retroact_jax.run_il / run_rl / run_eval     # one stage
    retroact_jax.METHODS, retroact_jax.benchmark("hotpotqa")
    retroact_jax.load_pretrained(source)        # (model, tokenizer, config)
    retroact_jax.Sampler, Learner, LMPolicy, summarize, table2
"""
__version__ = "0.1.0"

_API = {
    "run": ("retroact_jax.stages.pipeline", "run"),
    "validate": ("retroact_jax.stages.validate", "validate"),
    "run_il": ("retroact_jax.stages.il", "run_il"),
    "run_rl": ("retroact_jax.stages.rl", "run_rl"),
    "run_eval": ("retroact_jax.stages.evaluate", "run_eval"),
    "METHODS": ("retroact_jax.stages.methods", "METHODS"),
    "benchmark": ("retroact_jax.benchmarks", "get"),
    "load_pretrained": ("retroact_jax.models.hub", "load_pretrained"),
    "Sampler": ("retroact_jax.sampling", "Sampler"),
    "Learner": ("retroact_jax.train", "Learner"),
    "LMPolicy": ("retroact_jax.agent.lm_policy", "LMPolicy"),
    "summarize": ("retroact_jax.evaluation", "summarize"),
    "table2": ("retroact_jax.evaluation", "table2"),
}
__all__ = tuple(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'retroact_jax' has no attribute {name!r}")
    import importlib
    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)
