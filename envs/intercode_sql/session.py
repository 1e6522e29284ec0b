"""Running untrusted SQL against the task databases, so that it changes nothing anyone else sees.

Layers (each one would stop the hostile statements on its own; together they also bound time/memory):
- A throw-away MariaDB user per ``SqlRunner`` (``ic_env_<hex>``, random password) with only the role
  ``ic_reader``: SELECT / SHOW VIEW on the task databases. DROP, DELETE, UPDATE, INSERT, CREATE
  (temporary tables too), GRANT, LOCK TABLES, INTO OUTFILE, LOAD_FILE (gives NULL), SET GLOBAL and
  KILL of other users' threads are refused by the server. Its own sessions are all it can see.
- One connection per episode, in a transaction (autocommit off) that is rolled back and closed when
  the episode ends: session variables, user variables, named locks, roles all die with it.
- Before every statement ``SET SESSION max_statement_time=<timeout>, sql_select_limit=<cap+1>``; the
  agent's text itself is sent byte for byte (its errors read as MariaDB's). A client read timeout
  (timeout + 5 s) backs this up (a nested ``SET STATEMENT max_statement_time=0 FOR`` cannot escape it):
  the admin account KILLs the connection and the next statement reconnects.
- Results are streamed (unbuffered cursor) with a row cap and a byte cap; past a cap the connection
  is dropped and the observation is an error. The caps are far above any gold result.
- ``SET PASSWORD`` (the one account change any user may make) is healed: a refused login resets the
  password through the admin account and retries.
- Multiple statements per call are impossible: the client flag MULTI_STATEMENTS is off (and the
  RetroAct parser already cuts the SQL at the first ``;``).
"""
from __future__ import annotations

import secrets
import weakref
from typing import Any

import pymysql
import pymysql.cursors

from envs.intercode_sql import server as srv

ROW_CAP = 100_000
BYTE_CAP = 32 << 20
TIMEOUT_S = 5.0

Rows = list[tuple]
Result = Any   # Rows (a result set), None (a statement without one), or str (an error observation)


def error_obs(msg: str) -> str:
    return f"Error executing query: {msg}"


def _mysql_msg(e: BaseException) -> str:
    """The server's message, as mysql.connector's ``err.msg`` (no error code)."""
    if isinstance(e, pymysql.err.MySQLError) and len(e.args) >= 2 and isinstance(e.args[1], str):
        return e.args[1]
    return str(e) or type(e).__name__


def _drop_user(admin_kwargs: dict, user: str) -> None:
    try:
        cnx = pymysql.connect(**admin_kwargs, autocommit=True, connect_timeout=5, ssl_disabled=True)
        try:
            with cnx.cursor() as cur:
                cur.execute(f"DROP USER IF EXISTS '{user}'@'localhost'")
        finally:
            cnx.close()
    except Exception:  # noqa: BLE001 - server gone at exit: its next start drops stale users
        pass


class SqlRunner:
    """Executes SQL for one env: its own restricted user, one connection per episode."""

    def __init__(self, info: srv.ServerInfo, timeout_s: float = TIMEOUT_S, row_cap: int = ROW_CAP,
                 byte_cap: int = BYTE_CAP):
        self.info, self.timeout_s, self.row_cap, self.byte_cap = info, float(timeout_s), int(row_cap), int(byte_cap)
        self._admin_kwargs = info.admin()
        self.user = f"ic_env_{secrets.token_hex(6)}"
        self._password = secrets.token_hex(16)
        self._admin = None
        self._cnx = None
        self.db: str | None = None
        self._create_user()
        self._finalizer = weakref.finalize(self, _drop_user, self._admin_kwargs, self.user)

    # -- admin side -------------------------------------------------------------------------
    def _admin_cur(self):
        if self._admin is None or not self._admin.open:
            self._admin = pymysql.connect(**self._admin_kwargs, autocommit=True, connect_timeout=10, ssl_disabled=True)
        try:
            self._admin.ping(reconnect=False)
        except pymysql.err.MySQLError:
            self._admin = pymysql.connect(**self._admin_kwargs, autocommit=True, connect_timeout=10, ssl_disabled=True)
        return self._admin.cursor()

    def _create_user(self) -> None:
        with self._admin_cur() as cur:
            u = f"'{self.user}'@'localhost'"
            cur.execute(f"CREATE USER {u} IDENTIFIED BY '{self._password}' WITH MAX_USER_CONNECTIONS 4")
            cur.execute(f"GRANT {srv.READER_ROLE} TO {u}")
            cur.execute(f"SET DEFAULT ROLE {srv.READER_ROLE} FOR {u}")

    def _heal_password(self) -> None:
        with self._admin_cur() as cur:
            cur.execute(f"SET PASSWORD FOR '{self.user}'@'localhost' = PASSWORD('{self._password}')")

    def _kill(self, thread_id: int) -> None:
        try:
            with self._admin_cur() as cur:
                cur.execute(f"KILL CONNECTION {int(thread_id)}")
        except pymysql.err.MySQLError:
            pass   # already gone

    # -- episodes ---------------------------------------------------------------------------
    def _connect(self):
        kw = dict(unix_socket=self.info.socket, user=self.user, password=self._password, database=self.db,
                  charset="utf8mb4", autocommit=False, connect_timeout=10, ssl_disabled=True, read_timeout=self.timeout_s + 5,
                  write_timeout=self.timeout_s + 5, cursorclass=pymysql.cursors.SSCursor)
        try:
            return pymysql.connect(**kw)
        except pymysql.err.OperationalError as e:
            if e.args and e.args[0] == 1045:   # the agent changed its password: reset it
                self._heal_password()
                return pymysql.connect(**kw)
            raise

    def end_episode(self) -> None:
        """Roll back and close this episode's connection (its session state goes with it)."""
        cnx, self._cnx = self._cnx, None
        if cnx is None:
            return
        try:
            if cnx.open:
                cnx.rollback()
        except Exception:  # noqa: BLE001 - a killed / broken connection is just dropped
            pass
        finally:
            self._close_hard(cnx)

    @staticmethod
    def _close_hard(cnx) -> None:
        try:
            cnx.close()
        except Exception:  # noqa: BLE001
            try:
                cnx._force_close()
            except Exception:  # noqa: BLE001
                pass

    def start_episode(self, db: str) -> None:
        """New connection on ``db`` (InterCode runs ``use {db}`` at reset)."""
        self.end_episode()
        self.db = db
        self._cnx = self._connect()

    def execute(self, sql: str) -> Result:
        """Run one statement; never raises on the statement's account."""
        cnx = None
        for attempt in range(2):   # a connection the agent killed last time is replaced once
            try:
                if self._cnx is None or not self._cnx.open:
                    self._cnx = self._connect()
                cnx = self._cnx
                with cnx.cursor(pymysql.cursors.Cursor) as cur:
                    cur.execute(f"SET SESSION max_statement_time={self.timeout_s:g}, "
                                f"sql_select_limit={self.row_cap + 1}")
                break
            except Exception as e:  # noqa: BLE001
                if cnx is not None:
                    self._drop(cnx)
                cnx = None
                if attempt == 1:
                    return error_obs(_mysql_msg(e))
        cur = cnx.cursor()
        try:
            cur.execute(sql)
            if cur.description is None:
                cur.close()
                return None
            rows, nbytes = [], 0
            while True:
                chunk = cur.fetchmany(256)
                if not chunk:
                    break
                for r in chunk:
                    nbytes += sum(len(v) if isinstance(v, (str, bytes, bytearray)) else 8 for v in r)
                rows.extend(chunk)
                if len(rows) > self.row_cap or nbytes > self.byte_cap:
                    self._drop(cnx)
                    what = f"{self.row_cap} rows" if len(rows) > self.row_cap else f"{self.byte_cap >> 20} MiB"
                    return error_obs(f"the result has more than {what} (this environment's result cap)")
            cur.close()
            return [tuple(r) for r in rows]
        except pymysql.err.MySQLError as e:
            if isinstance(e, pymysql.err.OperationalError) and e.args and e.args[0] in (2013, 2006, 2014):
                self._drop(cnx)   # lost connection / timed out on the client side
                if "timed out" in str(e):
                    return error_obs("Query execution was interrupted (max_statement_time exceeded)")
            else:
                self._close_cursor(cnx, cur)
            return error_obs(_mysql_msg(e))
        except Exception as e:  # noqa: BLE001 - e.g. a value the driver cannot decode
            self._drop(cnx)
            return error_obs(_mysql_msg(e))

    def run_isolated(self, db: str, sql: str) -> Result:
        """Run ``sql`` on ``db`` in a connection of its own (used for the gold queries)."""
        saved, saved_db = self._cnx, self.db
        self._cnx = None
        try:
            self.start_episode(db)
            return self.execute(sql)
        except Exception as e:  # noqa: BLE001
            return error_obs(_mysql_msg(e))
        finally:
            self.end_episode()
            self._cnx, self.db = saved, saved_db

    def _close_cursor(self, cnx, cur) -> None:
        try:
            cur.close()
        except Exception:  # noqa: BLE001
            self._drop(cnx)

    def _drop(self, cnx) -> None:
        """Abandon a connection mid-statement: kill its server thread, close the socket."""
        tid = None
        try:
            tid = cnx.thread_id()
        except Exception:  # noqa: BLE001
            pass
        self._close_hard_nowait(cnx)
        if tid is not None:
            self._kill(tid)
        if self._cnx is cnx:
            self._cnx = None

    @staticmethod
    def _close_hard_nowait(cnx) -> None:
        try:
            cnx._force_close()   # no COM_QUIT: the socket may hold an unread result
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        self.end_episode()
        if self._admin is not None:
            try:
                self._admin.close()
            except Exception:  # noqa: BLE001
                pass
            self._admin = None
        self._finalizer()
