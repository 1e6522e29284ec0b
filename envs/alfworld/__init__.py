"""ALFWorld text games (classic ReAct/Reflexion grammar) behind the ``Env`` protocol."""
from envs.alfworld.env import ALFWorldEnv
from envs.alfworld.games import ALIASES, GAME_COUNTS, TASK_TYPES, canonical_split

__all__ = ["ALFWorldEnv", "ALIASES", "GAME_COUNTS", "TASK_TYPES", "canonical_split"]
