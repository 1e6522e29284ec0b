"""InterCode-Bash: the 200 NL2Bash tasks in per-episode bubblewrap sandboxes (see env.py)."""
from envs.intercode_bash.env import InterCodeBashEnv, parse_action

__all__ = ["InterCodeBashEnv", "parse_action"]
