"""Every stage of a RetroAct run, one module each, over the setup they share (``setup``):

* ``il``: imitation learning of the planner / reflector on expert or released data (Alg. 1, 1-2);
* ``rl``: the off-policy joint policy gradient, Algorithm 1 read top to bottom (collect, score,
  update, evaluate), with ``collect``, ``replay``, ``samples`` and ``expert`` beside it;
* ``evaluate``: trials of the trained (or prompted) agent on the test split, Table 2 outputs;
* ``methods`` / ``pipeline``: each method of the paper as a whole pipeline of these stages, and
  several methods into one table;
* ``configs`` / ``validate``: the default configs and the checks of a whole run's config, both
  importable without JAX (so a mistake is reported in a moment).
"""


class StageError(RuntimeError):
    """A stage cannot run as configured (named with the config key), or its workdir disagrees."""


__all__ = ("StageError",)
