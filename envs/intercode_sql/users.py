"""The throw-away MariaDB users of the envs, and the cleanup of those whose process died.

Each ``SqlRunner`` gets a user ``ic_env_<pid>_<hex>`` (role ``ic_reader``, random password). Its process
holds an exclusive ``flock`` on ``<state_dir>/users/<user>.lock`` for as long as the user lives; the
lock file is created and locked *before* the user is created. The kernel drops the lock when the
process dies, however it dies (SIGKILL included), so "the lock of a user can be taken" means "its
owner is gone": ``drop_stale`` (run whenever a runner is made) then drops the user and its lock file.
The pid in the name is for people reading ``mysql.user``; the lock decides (pids are reused).
Users named the older way (``ic_env_<hex>``, no lock) are left to the server's start, which drops
every ``ic_env_`` user.
"""
from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import re
import secrets

PREFIX = "ic_env_"
_NAME = re.compile(r"ic_env_[0-9]+_[0-9a-f]+")


def lock_dir(state_dir: pathlib.Path) -> pathlib.Path:
    d = pathlib.Path(state_dir) / "users"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _try_lock(path: pathlib.Path, create: bool) -> int | None:
    """An fd holding an exclusive lock on ``path`` (the very file that is there now), or None when
    another process holds it or the file is gone."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    try:   # a cleaner may have unlinked the file between our open and our lock
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def claim(state_dir: pathlib.Path) -> tuple[str, int]:
    """A fresh user name and the fd of its held lock (keep it open while the user exists)."""
    d = lock_dir(state_dir)
    for _ in range(8):
        name = f"{PREFIX}{os.getpid()}_{secrets.token_hex(5)}"
        fd = _try_lock(d / f"{name}.lock", create=True)
        if fd is not None:
            return name, fd
    raise RuntimeError(f"could not lock a user file in {d}")


def release(state_dir: pathlib.Path, name: str, fd: int | None) -> None:
    """After the user is dropped: remove its lock file, then let the lock go."""
    if fd is None:
        return
    try:
        (lock_dir(state_dir) / f"{name}.lock").unlink(missing_ok=True)
    finally:
        os.close(fd)


def drop_stale(cur, state_dir: pathlib.Path) -> list[str]:
    """Drop the env users whose owning process is gone (``cur``: an admin cursor); returns their names.
    Also removes lock files left without a user."""
    d = lock_dir(state_dir)
    cur.execute("SELECT User, Host FROM mysql.user WHERE User LIKE 'ic\\_env\\_%'")
    users = [(u, h) for u, h in cur.fetchall() if _NAME.fullmatch(u)]
    dropped, names = [], {u for u, _ in users}
    for user, host in users:
        path = d / f"{user}.lock"
        fd = _try_lock(path, create=False)
        if fd is None and path.exists():
            continue                                  # its owner holds the lock: alive
        try:                                          # owner dead (lock free) or lock file gone
            cur.execute(f"DROP USER IF EXISTS '{user}'@'{host}'")
            dropped.append(user)
            path.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
    for path in d.glob(f"{PREFIX}*.lock"):            # lock files of users already dropped
        if path.stem in names:
            continue
        fd = _try_lock(path, create=False)
        if fd is not None:
            try:
                cur.execute("SELECT COUNT(*) FROM mysql.user WHERE User = %s", (path.stem,))
                if cur.fetchall()[0][0] == 0:
                    path.unlink(missing_ok=True)
            finally:
                os.close(fd)
    return dropped
