"""The MariaDB server behind InterCode-SQL, owned by the project (no Docker, no systemd).

State lives in ``envs.data.cache_dir("mariadb")`` (``$RETROACT_CACHE/mariadb``):
``data/`` (the datadir), ``mysqld.sock``, ``mysqld.pid``, ``error.log``, ``port`` (the TCP port in
use), ``admin.json`` (our admin account, mode 0600), ``ready`` (the sha256 of the loaded dump) and
``users/`` (one lock file per live env user, ``envs.intercode_sql.users``).

The datadir is made once with ``mariadb-install-db --skip-test-db`` (socket auth for root), the
server runs as ``mariadbd --no-defaults --user=root`` with utf8mb4, ``--lower_case_table_names=1``
(Spider's golds mix table-name case) and ``--skip-log-bin``, on 127.0.0.1 at port 3307 as InterCode
(or a free port when 3307 is taken). InterCode's dump is loaded once; afterwards its superuser
``admin@'%'`` (password ``admin``) is dropped and replaced by ``retroact_admin@localhost`` with a random
password, and a role ``ic_reader`` that may only SELECT / SHOW VIEW the task databases (the envs give it
to one throw-away user per env, see ``envs.intercode_sql.session``).

Several processes may call ``start()`` at once: an exclusive ``flock`` on ``server.lock`` serialises
start/stop, and a server that already answers is reused. Users hold a *shared* ``flock`` on
``users.lock`` while they use the server; ``running()`` stops the server on exit only if it started
it and no one else holds that lock. Nothing is installed here: ``experiments/setup.sh`` installs
mariadb-server.

CLI: ``python -m envs.intercode_sql.server start|stop|status [--port N] [--force]``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import time

from envs import data
from envs.intercode_sql.osutil import flock as _flock, free_port as _free_port, pid_alive as _pid_alive
from envs.intercode_sql.osutil import port_free as _port_free, tail as _tail

DUMP = "intercode/ic_spider_dbs.sql"
DEFAULT_PORT = 3307
READER_ROLE = "ic_reader"
ADMIN_USER = "retroact_admin"
SYSTEM_DBS = ("information_schema", "mysql", "performance_schema", "sys")
_SETUP_VERSION = "2"   # bump when the post-load setup below changes: forces a fresh datadir
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 60.0


class ServerError(RuntimeError):
    """The MariaDB server could not be set up, started or reached; the message says why."""


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """How to reach a running server. ``socket`` is what the env uses; ``port`` is for InterCode-style TCP."""
    state_dir: pathlib.Path
    socket: str
    port: int
    pid: int
    host: str = "127.0.0.1"

    def admin(self) -> dict:
        """pymysql connect kwargs of our admin account (reads ``admin.json``)."""
        cred = json.loads((self.state_dir / "admin.json").read_text())
        return dict(unix_socket=self.socket, user=cred["user"], password=cred["password"])


# -- paths and binaries -------------------------------------------------------------------------
def state_dir() -> pathlib.Path:
    d = data.cache_dir("mariadb")
    sock = d / "mysqld.sock"
    if len(str(sock)) > 100:
        raise ServerError(f"the MariaDB socket path {sock} is too long for a unix socket (>100 chars); "
                          f"set $RETROACT_CACHE to a shorter folder")
    return d


def binaries() -> dict[str, str]:
    """Absolute paths of the MariaDB programs, or a ServerError that says how to install them."""
    out, missing = {}, []
    for name in ("mariadbd", "mariadb-install-db", "mariadb"):
        p = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/bin")
        if p is None:
            missing.append(name)
        out[name] = p
    if missing:
        raise ServerError(f"MariaDB programs not found: {', '.join(missing)}; run experiments/setup.sh "
                          f"(it installs the Debian package mariadb-server)")
    return out


def available() -> str | None:
    """None when the server can be run here, else the reason it cannot (for pytest skips)."""
    try:
        binaries()
    except ServerError as e:
        return str(e)
    return None


# -- small helpers ------------------------------------------------------------------------------
def _read_pid(d: pathlib.Path) -> int | None:
    try:
        return int((d / "mysqld.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def ping(sock: str, timeout: float = 1.0) -> bool:
    """True when a server answers on ``sock`` (a refused login still proves it answers)."""
    import pymysql
    if not os.path.exists(sock):
        return False
    try:
        pymysql.connect(unix_socket=sock, user="retroact_ping", password="x", connect_timeout=timeout,
                        ssl_disabled=True).close()
    except pymysql.err.OperationalError as e:
        return bool(e.args) and e.args[0] in (1045, 1698)   # access denied: it answered
    except Exception:  # noqa: BLE001 - anything else means "not answering"
        return False
    return True


def _client(bins: dict, d: pathlib.Path, sql_stdin: bytes, what: str) -> None:
    """Run SQL with the ``mariadb`` client over the socket as the OS user (socket auth)."""
    import getpass
    cmd = [bins["mariadb"], "--no-defaults", f"--socket={d / 'mysqld.sock'}", f"-u{getpass.getuser()}"]
    r = subprocess.run(cmd, input=sql_stdin, capture_output=True, timeout=600)
    if r.returncode != 0:
        raise ServerError(f"{what} failed (exit {r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}")


# -- lifecycle ----------------------------------------------------------------------------------
def _info_if_running(d: pathlib.Path) -> ServerInfo | None:
    pid = _read_pid(d)
    if pid is None or not _pid_alive(pid):
        return None
    sock = str(d / "mysqld.sock")
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not ping(sock):
        if not _pid_alive(pid) or time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    try:
        port = int((d / "port").read_text())
    except (OSError, ValueError):
        port = -1
    return ServerInfo(d, sock, port, pid)


def _ready_marker(dump_sha: str) -> str:
    return f"{dump_sha} setup={_SETUP_VERSION}\n"


def _initialise(bins: dict, d: pathlib.Path) -> None:
    datadir = d / "data"
    if datadir.exists():
        shutil.rmtree(datadir)
    for f in ("ready", "admin.json"):
        (d / f).unlink(missing_ok=True)
    r = subprocess.run([bins["mariadb-install-db"], "--no-defaults", "--user=root", "--skip-test-db",
                        "--auth-root-authentication-method=socket", f"--datadir={datadir}"],
                       capture_output=True, timeout=300)
    if r.returncode != 0:
        raise ServerError(f"mariadb-install-db failed (exit {r.returncode}): "
                          f"{(r.stdout + r.stderr).decode(errors='replace')[-2000:]}")


def _launch(bins: dict, d: pathlib.Path, port: int) -> ServerInfo:
    for f in ("mysqld.sock", "mysqld.pid"):
        (d / f).unlink(missing_ok=True)
    cmd = [bins["mariadbd"], "--no-defaults", "--user=root", f"--datadir={d / 'data'}",
           f"--socket={d / 'mysqld.sock'}", f"--pid-file={d / 'mysqld.pid'}", f"--log-error={d / 'error.log'}",
           f"--port={port}", "--bind-address=127.0.0.1", "--lower_case_table_names=1", "--skip-log-bin",
           "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)   # survives this process; `stop` ends it
    _STARTED[str(d)] = proc
    deadline = time.monotonic() + _START_TIMEOUT_S
    sock = str(d / "mysqld.sock")
    while not ping(sock):
        if proc.poll() is not None:
            raise ServerError(f"mariadbd exited with code {proc.returncode} while starting; "
                              f"{d / 'error.log'} ends with:\n{_tail(d / 'error.log')}")
        if time.monotonic() > deadline:
            proc.kill()
            raise ServerError(f"mariadbd did not answer within {_START_TIMEOUT_S:.0f} s; "
                              f"{d / 'error.log'} ends with:\n{_tail(d / 'error.log')}")
        time.sleep(0.05)
    (d / "port").write_text(str(port))
    return ServerInfo(d, sock, port, proc.pid)


def _load(bins: dict, d: pathlib.Path, dump_sha: str) -> None:
    """Load InterCode's dump, then replace its superuser by ours and create the reader role."""
    _client(bins, d, data.path(DUMP).read_bytes(), f"loading {DUMP}")
    cred = {"user": ADMIN_USER, "password": secrets.token_hex(16)}
    setup = ["DROP USER IF EXISTS 'admin'@'%'",
             f"DROP USER IF EXISTS '{ADMIN_USER}'@'localhost'",
             f"CREATE USER '{ADMIN_USER}'@'localhost' IDENTIFIED BY '{cred['password']}'",
             f"GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'localhost' WITH GRANT OPTION",
             f"DROP ROLE IF EXISTS {READER_ROLE}",
             f"CREATE ROLE {READER_ROLE} WITH ADMIN '{ADMIN_USER}'@'localhost'"]
    sql = ";\n".join(setup) + ";\n"
    _client(bins, d, sql.encode(), "creating the admin account and the reader role")
    import pymysql
    info = ServerInfo(d, str(d / "mysqld.sock"), -1, -1)
    af = d / "admin.json"
    af.write_text(json.dumps(cred))
    os.chmod(af, 0o600)
    cnx = pymysql.connect(**info.admin(), autocommit=True, ssl_disabled=True)
    try:
        with cnx.cursor() as cur:
            for db in task_databases(cur):
                cur.execute(f"GRANT SELECT, SHOW VIEW ON `{db}`.* TO {READER_ROLE}")
            cur.execute("FLUSH PRIVILEGES")
    finally:
        cnx.close()
    (d / "ready").write_text(_ready_marker(dump_sha))


def task_databases(cur) -> list[str]:
    cur.execute("SHOW DATABASES")
    return sorted(r[0] for r in cur.fetchall() if r[0].lower() not in SYSTEM_DBS)


def _drop_stale_users(info: ServerInfo) -> None:
    """Drop per-env users left by processes that died (only at a fresh start: nobody uses them)."""
    import pymysql
    cnx = pymysql.connect(**info.admin(), autocommit=True, ssl_disabled=True)
    try:
        with cnx.cursor() as cur:
            cur.execute("SELECT User, Host FROM mysql.user WHERE User LIKE 'ic\\_env\\_%'")
            for user, host in cur.fetchall():
                cur.execute(f"DROP USER IF EXISTS '{user}'@'{host}'")
    finally:
        cnx.close()


_STARTED: dict[str, subprocess.Popen] = {}   # servers this process launched (to reap them on stop)


def start(port: int | None = None) -> tuple[ServerInfo, bool]:
    """Make sure the server runs with the dump loaded; returns (info, started_by_this_call)."""
    bins = binaries()
    d = state_dir()
    dump_sha = data.PACK[DUMP]
    data.path(DUMP)   # checks the dump's sha256 before anything is done with it
    with _flock(d / "server.lock", fcntl.LOCK_EX):
        ready = (d / "ready").is_file() and (d / "ready").read_text() == _ready_marker(dump_sha)
        info = _info_if_running(d)
        if info is not None and ready:
            return info, False
        if info is not None:          # running, but on an old / half-made datadir
            _stop_locked(d, force=True)
        want = int(os.environ.get("RETROACT_MARIADB_PORT", DEFAULT_PORT)) if port is None else int(port)
        if not _port_free(want):
            if port is not None:
                raise ServerError(f"port {want} on 127.0.0.1 is busy; pass another --port or free it")
            want = _free_port()
        if not ready:
            _initialise(bins, d)
        info = _launch(bins, d, want)
        try:
            if not ready:
                _load(bins, d, dump_sha)
            _drop_stale_users(info)
        except Exception:
            _stop_locked(d, force=True)
            raise
        return info, True


def _stop_locked(d: pathlib.Path, force: bool) -> bool:
    pid = _read_pid(d)
    if pid is None or not _pid_alive(pid):
        return False
    if not force:
        fd = os.open(d / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ServerError("the MariaDB server is in use by another process; use --force to stop it anyway")
                raise
        finally:
            os.close(fd)
    os.kill(pid, signal.SIGTERM)
    proc = _STARTED.pop(str(d), None)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while _pid_alive(pid) if proc is None else proc.poll() is None:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise ServerError(f"mariadbd (pid {pid}) did not stop within {_STOP_TIMEOUT_S:.0f} s; killed it")
        time.sleep(0.05)
    return True


def stop(force: bool = False) -> bool:
    """Stop the server cleanly (SIGTERM, wait). Refuses while others use it unless ``force``."""
    d = state_dir()
    with _flock(d / "server.lock", fcntl.LOCK_EX):
        return _stop_locked(d, force)


def status() -> dict:
    d = state_dir()
    info = None
    pid = _read_pid(d)
    if pid is not None and _pid_alive(pid) and ping(str(d / "mysqld.sock")):
        info = _info_if_running(d)
    return {"running": info is not None, "pid": info.pid if info else None, "port": info.port if info else None,
            "socket": str(d / "mysqld.sock"), "state_dir": str(d),
            "dump_loaded": (d / "ready").is_file() and (d / "ready").read_text() == _ready_marker(data.PACK[DUMP])}


@contextlib.contextmanager
def use(port: int | None = None):
    """Hold the server in use (a shared lock on ``users.lock``) without ever stopping it."""
    info, _ = start(port)
    with _flock(info.state_dir / "users.lock", fcntl.LOCK_SH):
        yield info


@contextlib.contextmanager
def running(port: int | None = None, stop_when_unused: bool = True):
    """Context manager: the server runs inside; stopped on exit if this call started it and nobody
    else holds it (another process or env in ``use``)."""
    info, started = start(port)
    try:
        with _flock(info.state_dir / "users.lock", fcntl.LOCK_SH):
            yield info
    finally:
        if started and stop_when_unused:
            with contextlib.suppress(ServerError):
                stop(force=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.intercode_sql.server", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["start", "stop", "status"])
    ap.add_argument("--port", type=int, default=None, help=f"TCP port (default ${{RETROACT_MARIADB_PORT}} or {DEFAULT_PORT})")
    ap.add_argument("--force", action="store_true", help="stop even if another process uses the server")
    a = ap.parse_args(argv)
    try:
        if a.command == "start":
            t0 = time.perf_counter()
            info, started = start(a.port)
            print(json.dumps({"started": started, "pid": info.pid, "port": info.port, "socket": info.socket,
                              "seconds": round(time.perf_counter() - t0, 2)}))
        elif a.command == "stop":
            print(json.dumps({"stopped": stop(force=a.force)}))
        else:
            print(json.dumps(status()))
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
