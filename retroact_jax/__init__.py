"""retroact-jax: RetroAct (retrospective language agents, joint policy gradient) in JAX / Flax NNX."""
__version__ = "0.1.0"
