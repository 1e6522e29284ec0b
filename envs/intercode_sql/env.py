"""InterCode-SQL (Spider dev on MariaDB) with the actions and observations of the RetroAct agent.

Tasks: ``ic_spider_dev.json`` in file order; ``test`` = tasks 0-99 (the paper runs ``env.reset(z)``,
z = 0..99), ``train`` = 100-1033, ``all`` = 0-1033. ``Task.instruction`` is the NL question;
``Task.data``: db, gold, hardness, db_tables, ic_index (the position in the file).

``reset`` opens a fresh connection on the task's database (InterCode's preprocess ``use {db}``) and
returns the question (InterCode sets ``observation = query``; its ``use`` step then overwrites it with
``None``, and RetroAct builds its prompt from ``env.query``, so the question is what an agent needs).

``step(action)`` parses like RetroAct's ``sql_parser_react`` (after stripping outer whitespace, which
RetroAct's loop has already done): ``submit`` exactly, or the greedy ``execute\\[(.*)\\]`` (DOTALL) with
the SQL cut at its first ``;``; anything else gives ``Error executing query: Your last `execute` action
did not contain sql code`` with reward 0 and ``invalid``. An executed statement gives its rows as
``str(list of tuples)``, ``None`` for a statement without a result set, or ``Error executing query:
<MariaDB message>``. Like RetroAct, a string observation is cut to 350 characters and a row list to
25 rows before ``str``. ``submit`` ends the episode and returns the last executed statement's
observation (non-code actions never reach InterCode, so they do not count as "last") with InterCode's
reward of that result against the gold's; ``success`` is reward == 1. The gold runs on
the episode's own connection, right after the agent's statements, as in InterCode, because MariaDB
breaks ties of ``ORDER BY ... LIMIT`` / ``GROUP BY`` differently per connection (13-16 of the 1,034
golds give another row on a fresh connection, none on the same one); but first that connection is
reset to a fresh connection's state and put back on the task's database (``SqlRunner.run_gold``), so
nothing an agent set (``SET [SESSION|@@]`` sql_mode / character sets / max_join_size / time zone ...,
``USE``, user variables, prepared statements, transactions, XA) reaches the gold; when the reset cannot
be verified the gold gets a fresh connection (``info["gold_session"]`` says which). Unlike InterCode,
a gold that fails is not an empty result: the reward is 0 and ``info["gold_error"]`` holds the error
(the 6 broken golds, a timeout, a lost server). The per-task cache (``gold_result``, a clean
connection each) serves tools, never the reward. "A repeated action ends the trial" is the agent loop's
rule (its history), not the env's.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import re
from typing import Any, Sequence

from envs import data
from envs.base import Env, EnvError, StepResult, Task
from envs.intercode_sql import reward as rw
from envs.intercode_sql import server as srv
from envs.intercode_sql.session import SqlRunner, error_obs

TASKS_FILE = "intercode/ic_spider_dev.json"
N_TEST = 100
OBS_MAX_CHARS = 350
OBS_MAX_ROWS = 25
NOT_CODE = error_obs("Your last `execute` action did not contain sql code")
_EXECUTE = re.compile(r"execute\[(.*)\]", re.DOTALL)
_SPLITS = ("test", "train", "all")


@functools.lru_cache(maxsize=1)
def _records() -> tuple[dict, ...]:
    p = data.path(TASKS_FILE)
    recs = json.loads(p.read_text())
    if not isinstance(recs, list):
        raise data.DataError(f"{p}: expected a JSON list of tasks")
    for i, r in enumerate(recs):
        missing = {"db", "gold", "query", "hardness", "db_tables"} - set(r)
        if missing:
            raise data.DataError(f"{p}: task {i} lacks {sorted(missing)}")
    return tuple(recs)


@functools.lru_cache(maxsize=None)
def split_tasks(split: str) -> tuple[Task, ...]:
    if split not in _SPLITS:
        raise EnvError(f"intercode_sql: unknown split {split!r}; known: {list(_SPLITS)}")
    recs = _records()
    lo, hi = {"test": (0, N_TEST), "train": (N_TEST, len(recs)), "all": (0, len(recs))}[split]
    return tuple(Task(env="intercode_sql", split=split, index=i - lo, id=f"spider_dev/{i}", instruction=r["query"],
                      data={"db": r["db"], "gold": r["gold"], "hardness": r["hardness"],
                            "db_tables": r["db_tables"], "ic_index": i})
                 for i, r in enumerate(recs[lo:hi], start=lo))


def parse_action(action: str) -> tuple[str, bool]:
    """RetroAct's ``sql_parser_react`` on the stripped action: (sql or "submit", is_code)."""
    a = action.strip()
    if a == "submit":
        return a, True
    m = _EXECUTE.findall(a)
    if m:
        sql = m[0]
        return (sql[:sql.index(";")] if ";" in sql else sql), True
    return a, False


def format_observation(obs: Any) -> str:
    """RetroAct's cut (350 chars of a string, 25 rows of a list), then ``str``."""
    if isinstance(obs, str) and len(obs) > OBS_MAX_CHARS:
        obs = obs[:OBS_MAX_CHARS]
    elif isinstance(obs, list) and len(obs) > OBS_MAX_ROWS:
        obs = obs[:OBS_MAX_ROWS]
    return str(obs)


class InterCodeSQLEnv(Env):
    """One InterCode-SQL episode at a time; the MariaDB server is started on first use if needed."""

    name = "intercode_sql"
    default_max_steps = 10
    _gold_cache: dict[int, tuple[list, str | None]] = {}   # ic_index -> (rows, gold error), per process

    def __init__(self, split: str = "test", max_steps: int | None = None, port: int | None = None,
                 timeout_s: float | None = None):
        super().__init__(split=split, max_steps=max_steps)
        split_tasks(split)   # validates the split and the data now
        self._port, self._timeout_s = port, timeout_s
        self._runner: SqlRunner | None = None
        self._users_fd: int | None = None
        self._last: Any = None

    @property
    def tasks(self) -> Sequence[Task]:
        return split_tasks(self.split)

    # -- back end ---------------------------------------------------------------------------
    def _ensure_runner(self) -> SqlRunner:
        if self._runner is None:
            info, _ = srv.start(self._port)
            fd = os.open(info.state_dir / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)   # "in use": a polite stop() waits for close()
            self._users_fd = fd
            kw = {} if self._timeout_s is None else {"timeout_s": self._timeout_s}
            self._runner = SqlRunner(info, **kw)
        return self._runner

    def gold_result(self, task: Task) -> tuple[list, str | None]:
        """The gold's rows on a clean connection (cached per process); ``[]`` and the error if it fails.
        For tools and benchmarks; rows tied under the gold's ORDER BY may come in another order than in an
        episode (see the module docstring), so the reward does not use it."""
        key = int(task.data["ic_index"])
        if key not in self._gold_cache:
            res = self._ensure_runner().run_isolated(task.data["db"], task.data["gold"])
            if isinstance(res, list):
                self._gold_cache[key] = (res, None)
            else:
                self._gold_cache[key] = ([], res if isinstance(res, str) else "no result set")
        return self._gold_cache[key]

    # -- episodes ---------------------------------------------------------------------------
    def _reset(self, task: Task) -> str:
        runner = self._ensure_runner()
        runner.start_episode(task.data["db"])
        self._last = None
        return task.instruction

    def _step(self, action: str) -> StepResult:
        sql, is_code = parse_action(action)
        if not is_code:
            return NOT_CODE, 0.0, False, {"invalid": True}
        if sql == "submit":
            gold, how = self._runner.run_gold(self.task.data["db"], self.task.data["gold"])
            self._runner.end_episode()
            if isinstance(gold, list):
                r, gold_err = rw.sql_reward(self._last, gold), None
            else:   # never scored as an empty result: that is what an agent could make it
                r, gold_err = 0.0, gold if isinstance(gold, str) else "the gold gave no result set"
            info = {"success": r == 1.0, "score": r, "gold_error": gold_err, "gold_session": how}
            return format_observation(self._last), r, True, info
        self._last = self._runner.execute(sql)
        return format_observation(self._last), 0.0, False, {}

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._users_fd is not None:
            os.close(self._users_fd)
            self._users_fd = None
