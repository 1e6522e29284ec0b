"""InterCode-SQL: Spider dev tasks on a project-owned MariaDB (server.py), run in isolation (session.py),
scored with InterCode's reward (reward.py), stepped with RetroAct's action rules (env.py)."""
from envs.intercode_sql.env import InterCodeSQLEnv, format_observation, parse_action, split_tasks
from envs.intercode_sql.reward import kendall_tau_b, sql_reward

__all__ = ["InterCodeSQLEnv", "format_observation", "parse_action", "split_tasks", "kendall_tau_b", "sql_reward"]
