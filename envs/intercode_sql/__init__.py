"""InterCode-SQL: Spider dev tasks on a project-owned MariaDB (server.py), run in isolation (session.py),
scored with InterCode's reward (reward.py), stepped with RetroAct's action rules (env.py).

Names are imported lazily, so that ``python -m envs.intercode_sql.server`` does not import itself twice.
"""
import importlib

_EXPORTS = {"InterCodeSQLEnv": "env", "format_observation": "env", "parse_action": "env", "split_tasks": "env",
            "kendall_tau_b": "reward", "sql_reward": "reward"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"envs.intercode_sql.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'envs.intercode_sql' has no attribute {name!r}")
