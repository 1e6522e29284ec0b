"""Running untrusted SQL against the task databases, so that it changes nothing anyone else sees.

Layers (each one would stop the hostile statements on its own; together they also bound time/memory):
- A throw-away MariaDB user per ``SqlRunner`` (``ic_env_<pid>_<hex>``, random password, see
  ``envs.intercode_sql.users``: users of dead processes are dropped when a runner is made) with only the role
  ``ic_reader``: SELECT / SHOW VIEW on the task databases. DROP, DELETE, UPDATE, INSERT, CREATE
  (temporary tables too), GRANT, LOCK TABLES, INTO OUTFILE, LOAD_FILE (gives NULL), SET GLOBAL and
  KILL of other users' threads are refused by the server. Its own sessions are all it can see.
- One connection per episode, in a transaction (autocommit off) that is rolled back and closed when
  the episode ends: session variables, user variables, named locks, roles all die with it.
- Before every statement ``SET SESSION max_statement_time=<timeout>, sql_select_limit=<cap+1>``; the
  agent's text itself is sent byte for byte (its errors read as MariaDB's). A watchdog backs this up
  (a nested ``SET STATEMENT max_statement_time=0 FOR`` cannot escape it, nor can rows streamed slowly):
  at timeout + 5 s of wall time the admin account KILLs the connection, and the next statement
  reconnects; the client read timeout is the same.
- Results are streamed (unbuffered cursor) with a row cap and a byte cap; past a cap the connection
  is dropped and the observation is an error. The caps are far above any gold result.
- ``SET PASSWORD`` (the one account change any user may make) is healed: a refused login resets the
  password through the admin account and retries.
- The gold runs on a session in the default state (``run_gold``): the episode's connection is reset
  with COM_RESET_CONNECTION (session variables, user variables, prepared statements, transaction,
  temporary tables, locks: all back to a fresh connection's; the server thread stays, and with it the
  order in which MariaDB breaks ORDER BY / GROUP BY ties, which differs per connection), the role and
  the task's database are set again, the gold runs, and then a fingerprint of every session variable
  (the server's own list) and the role is compared with a fresh connection's. Any difference, or a
  connection that is gone: the gold runs again on a fresh connection. XA transactions an agent
  prepared (they outlive connections, with their row locks) are rolled back by the admin account
  when the episode ends.
- Multiple statements per call are impossible: client flag MULTI_STATEMENTS off (RetroAct's parser cuts at ``;``).
"""
from __future__ import annotations

import secrets
import threading
import time
import weakref
from typing import Any

import pymysql
import pymysql.cursors

from envs.intercode_sql import server as srv
from envs.intercode_sql import users

ROW_CAP = 100_000
BYTE_CAP = 32 << 20
TIMEOUT_S = 5.0
BACKSTOP_S = 5.0                 # the watchdog / client read timeout fire this long after the server's limit
COM_RESET_CONNECTION = 0x1F      # protocol command (MariaDB >= 10.2.4); pymysql has no public call for it
# session variables left out of the fingerprint: they differ between two fresh connections of the same
# user, follow the last statement (read-only counters, the transaction a SELECT opens) or the current
# database (USE sets them), not a setting. TIMESTAMP is checked against the clock instead.
_NOT_SETTINGS = ("RAND_SEED1", "RAND_SEED2", "PSEUDO_THREAD_ID", "TIMESTAMP", "MAX_USER_CONNECTIONS",
                 "WARNING_COUNT", "ERROR_COUNT", "IN_TRANSACTION", "CHARACTER_SET_DATABASE", "COLLATION_DATABASE")

Rows = list[tuple]
Result = Any   # Rows (a result set), None (a statement without one), or str (an error observation)


def error_obs(msg: str) -> str:
    return f"Error executing query: {msg}"


def _mysql_msg(e: BaseException) -> str:
    """The server's message, as mysql.connector's ``err.msg`` (no error code)."""
    if isinstance(e, pymysql.err.MySQLError) and len(e.args) >= 2 and isinstance(e.args[1], str):
        return e.args[1]
    return str(e) or type(e).__name__


def _drop_user(admin_kwargs: dict, user: str, state_dir, lock_fd: int | None) -> None:
    try:
        cnx = pymysql.connect(**admin_kwargs, autocommit=True, connect_timeout=5, ssl_disabled=True)
        try:
            with cnx.cursor() as cur:
                cur.execute(f"DROP USER IF EXISTS '{user}'@'localhost'")
        finally:
            cnx.close()
    except pymysql.err.MySQLError:
        pass   # server gone: the next runner (its lock is free) or the server's next start drops the user
    finally:
        users.release(state_dir, user, lock_fd)


def _abandon_result(cnx) -> None:
    """Mark an unbuffered result we stop reading as finished, so that pymysql's cursor / result
    destructors do not try to drain it from the closed socket (they would print a traceback)."""
    res = getattr(cnx, "_result", None)
    if res is not None and getattr(res, "unbuffered_active", False):
        res.unbuffered_active = False
        res.connection = None
    cnx._result = None


class SqlRunner:
    """Executes SQL for one env: its own restricted user, one connection per episode."""

    def __init__(self, info: srv.ServerInfo, timeout_s: float = TIMEOUT_S, row_cap: int = ROW_CAP,
                 byte_cap: int = BYTE_CAP):
        self.info, self.timeout_s, self.row_cap, self.byte_cap = info, float(timeout_s), int(row_cap), int(byte_cap)
        self._admin_kwargs = info.admin()
        self._admin = None
        self._admin_lock = threading.Lock()   # the watchdog thread shares the admin connection
        self._cnx = None
        self.db: str | None = None
        self._fp_sql: str | None = None       # the session fingerprint query (built on the first connection)
        self._baseline: tuple | None = None   # a fresh connection's fingerprint (md5, role, clock unset)
        self.dropped_stale_users: list[str] = []   # users of dead processes this runner dropped
        self.user, lock_fd = users.claim(info.state_dir)
        self._password = secrets.token_hex(16)
        self._finalizer = weakref.finalize(self, _drop_user, self._admin_kwargs, self.user, info.state_dir, lock_fd)
        self._create_user()

    # -- admin side -------------------------------------------------------------------------
    def _admin_call(self, fn):
        """``fn(cursor)`` on the admin connection (reconnected when needed), under the admin lock."""
        with self._admin_lock:
            if self._admin is not None and self._admin.open:
                try:
                    self._admin.ping(reconnect=False)
                except pymysql.err.MySQLError:
                    self._admin = None
            if self._admin is None or not self._admin.open:
                self._admin = pymysql.connect(**self._admin_kwargs, autocommit=True, connect_timeout=10,
                                              ssl_disabled=True)
            with self._admin.cursor() as cur:
                return fn(cur)

    def _admin_exec(self, sql: str) -> list:
        def run(cur):
            cur.execute(sql)
            return list(cur.fetchall())
        return self._admin_call(run)

    def _create_user(self) -> None:
        self.dropped_stale_users = self._admin_call(lambda cur: users.drop_stale(cur, self.info.state_dir))
        u = f"'{self.user}'@'localhost'"
        self._admin_exec(f"CREATE USER {u} IDENTIFIED BY '{self._password}' WITH MAX_USER_CONNECTIONS 4")
        self._admin_exec(f"GRANT {srv.READER_ROLE} TO {u}")
        self._admin_exec(f"SET DEFAULT ROLE {srv.READER_ROLE} FOR {u}")

    def _heal_password(self) -> None:
        self._admin_exec(f"SET PASSWORD FOR '{self.user}'@'localhost' = PASSWORD('{self._password}')")

    def _kill(self, thread_id: int) -> None:
        try:
            self._admin_exec(f"KILL CONNECTION {int(thread_id)}")
        except pymysql.err.MySQLError:
            pass   # already gone

    def rollback_detached_xa(self) -> int:
        """Roll back XA transactions left PREPARED (they outlive their connection and keep their row
        locks). Only env users run XA on this server, so every one found is an agent's leftover."""
        n = 0
        for fmt, glen, blen, xid in self._admin_exec("XA RECOVER"):
            xid = bytes(xid)
            try:
                self._admin_exec(f"XA ROLLBACK X'{xid[:glen].hex()}', X'{xid[glen:glen + blen].hex()}', {int(fmt)}")
                n += 1
            except pymysql.err.MySQLError:
                pass   # another runner rolled it back first
        return n

    # -- episodes ---------------------------------------------------------------------------
    def _connect(self):
        kw = dict(unix_socket=self.info.socket, user=self.user, password=self._password, database=self.db,
                  charset="utf8mb4", autocommit=False, connect_timeout=10, ssl_disabled=True,
                  read_timeout=self.timeout_s + BACKSTOP_S, write_timeout=self.timeout_s + BACKSTOP_S,
                  cursorclass=pymysql.cursors.SSCursor)
        for wait in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, None):   # waits on error 1226 (below)
            try:
                cnx = pymysql.connect(**kw)
                break
            except pymysql.err.OperationalError as e:
                if e.args and e.args[0] == 1045:   # the agent changed its password: reset it
                    self._heal_password()
                    cnx = pymysql.connect(**kw)
                    break
                # 1226: the server has not yet processed closes of this user's connections (loaded machine)
                if not (e.args and e.args[0] == 1226) or wait is None:
                    raise
                time.sleep(wait)
        if self._baseline is None:
            self._baseline = self._fingerprint(cnx)[:3]
        return cnx

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
        try:
            self.rollback_detached_xa()
        except pymysql.err.MySQLError:
            pass   # server unreachable: the next statement or connection says so

    @staticmethod
    def _close_hard(cnx) -> None:
        try:
            cnx.close()
        except Exception:  # noqa: BLE001
            _abandon_result(cnx)
            cnx._force_close()

    def start_episode(self, db: str) -> None:
        """New connection on ``db`` (InterCode runs ``use {db}`` at reset)."""
        self.end_episode()
        self.db = db
        self._cnx = self._connect()

    def _apply_limits(self, cnx) -> None:
        with cnx.cursor(pymysql.cursors.Cursor) as cur:
            cur.execute(f"SET SESSION max_statement_time={self.timeout_s:g}, sql_select_limit={self.row_cap + 1}")

    def _fingerprint(self, cnx) -> tuple:
        """(md5 of every session variable's value but ``_NOT_SETTINGS``, role, clock unset, database), after
        the limits every statement gets. The variables are the server's own list
        (information_schema.SYSTEM_VARIABLES, all but GLOBAL scope), read once on a fresh connection."""
        with cnx.cursor(pymysql.cursors.Cursor) as cur:
            if self._fp_sql is None:
                cur.execute("SELECT VARIABLE_NAME FROM information_schema.SYSTEM_VARIABLES "
                            "WHERE VARIABLE_SCOPE <> 'GLOBAL' ORDER BY VARIABLE_NAME")
                names = [n for (n,) in cur.fetchall() if n.upper() not in _NOT_SETTINGS]
                values = ", ".join(f"COALESCE(@@session.`{n}`, 'NULL')" for n in names)
                self._fp_sql = (f"SELECT MD5(CONCAT_WS(0x0a, {values})), CURRENT_ROLE(), "   # + the clock not set:
                                "ABS(@@session.timestamp - UNIX_TIMESTAMP(SYSDATE(6))) < 60, DATABASE()")
        self._apply_limits(cnx)
        with cnx.cursor(pymysql.cursors.Cursor) as cur:
            cur.execute(self._fp_sql)
            return tuple(cur.fetchall()[0])

    def execute(self, sql: str) -> Result:
        """Run one statement; never raises on the statement's account."""
        cnx = None
        for attempt in range(2):   # a connection the agent killed last time is replaced once
            try:
                if self._cnx is None or not self._cnx.open:
                    self._cnx = self._connect()
                cnx = self._cnx
                self._apply_limits(cnx)
                break
            except Exception as e:  # noqa: BLE001
                if cnx is not None:
                    self._drop(cnx)
                cnx = None
                if attempt == 1:
                    return error_obs(_mysql_msg(e))
        fired = threading.Event()
        dog = threading.Timer(self.timeout_s + BACKSTOP_S, self._watchdog, (cnx.thread_id(), fired))
        dog.daemon = True
        dog.start()
        try:
            return self._run(cnx, sql, fired)
        finally:
            dog.cancel()
            if fired.is_set() and self._cnx is cnx:   # fired as the statement ended: the kill may follow
                self._drop(cnx)

    def _watchdog(self, thread_id: int, fired: threading.Event) -> None:
        fired.set()
        self._kill(thread_id)

    def _run(self, cnx, sql: str, fired: threading.Event) -> Result:
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
            if fired.is_set():   # it finished as the watchdog fired: its connection is being killed
                self._drop(cnx)
            return [tuple(r) for r in rows]
        except pymysql.err.MySQLError as e:
            if isinstance(e, pymysql.err.OperationalError) and e.args and e.args[0] in (2013, 2006, 2014):
                self._drop(cnx)   # lost connection: timed out on the client side or killed by the watchdog
                if "timed out" in str(e) or fired.is_set():
                    return error_obs("Query execution was interrupted (max_statement_time exceeded)")
            else:
                self._close_cursor(cnx, cur)
            return error_obs(_mysql_msg(e))
        except Exception as e:  # noqa: BLE001 - e.g. a value the driver cannot decode
            self._drop(cnx)
            return error_obs(_mysql_msg(e))

    # -- the gold ---------------------------------------------------------------------------
    def reset_session(self, db: str) -> bool:
        """Put the episode's connection back in a fresh connection's state, on ``db``, keeping its
        server thread. False (and no connection) when that cannot be done."""
        cnx = self._cnx
        if cnx is None or not cnx.open:
            return False
        try:
            cnx._execute_command(COM_RESET_CONNECTION, b"")
            cnx._read_ok_packet()
            cnx.autocommit(False)                     # reset turned it back on
            with cnx.cursor(pymysql.cursors.Cursor) as cur:
                cur.execute(f"SET ROLE {srv.READER_ROLE}")   # reset leaves the role the agent set (NONE)
            cnx.select_db(db)
        except Exception:  # noqa: BLE001 - a dead / killed connection: the caller opens a fresh one
            self._drop(cnx)
            return False
        return True

    def session_is_default(self, db: str) -> bool:
        """Whether the episode's session is a fresh connection's (every session variable, role) on ``db``.
        False (and no connection) otherwise."""
        cnx = self._cnx
        if cnx is None or not cnx.open:
            return False
        try:
            fp = self._fingerprint(cnx)
        except Exception:  # noqa: BLE001
            self._drop(cnx)
            return False
        if fp[:3] != self._baseline or str(fp[3]).lower() != db.lower():
            self._drop(cnx)
            return False
        return True

    def run_gold(self, db: str, sql: str) -> tuple[Result, str]:
        """Run the gold ``sql`` on ``db`` in a session in the default state: the episode's connection
        reset (``"reset"``), or a fresh connection (``"fresh"``) when the reset cannot be trusted.
        The gold runs right after the reset and the session is checked after it (a SELECT changes no
        session variable): MariaDB breaks ties by memory addresses of the server thread, so the fewer
        statements between the agent's last one and the gold, the likelier the same tie order."""
        if self.reset_session(db):
            res = self.execute(sql)
            if self.session_is_default(db):
                return res, "reset"
        self.end_episode()
        self.db = db
        try:
            self._cnx = self._connect()
        except Exception as e:  # noqa: BLE001
            return error_obs(_mysql_msg(e)), "fresh"
        return self.execute(sql), "fresh"

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
        _abandon_result(cnx)
        cnx._force_close()   # no COM_QUIT: the socket may hold an unread result
        if tid is not None:
            self._kill(tid)
        if self._cnx is cnx:
            self._cnx = None

    def close(self) -> None:
        self.end_episode()
        with self._admin_lock:
            if self._admin is not None:
                try:
                    self._admin.close()
                except Exception:  # noqa: BLE001
                    pass
                self._admin = None
        self._finalizer()
