"""One episode's machine: a bubblewrap sandbox whose root is a size-limited tmpfs.

The sandbox lives as long as the episode: the file system built from the manifest, every file a
command writes and the working directory persist from one command to the next (as in InterCode's
long-lived container); environment variables, shell functions and background processes do not
(each command is a fresh ``/bin/bash -c``, as InterCode's ``docker exec``; background jobs are
killed when their command ends). Closing the sandbox kills it and frees its tmpfs; nothing is
ever written to the host's disk.

Isolation, and why each part is there:
- ``--unshare-all`` (user, mount, pid, net, ipc, uts, cgroup namespaces): no network, no view of
  host processes; ``--disable-userns``: no nested namespaces; ``--die-with-parent``.
- Root ``/`` is a ``--size``-limited tmpfs (default 64 MiB), ``/dev/shm`` another small one and
  ``/dev`` is remounted read-only, so writes cannot fill the host's RAM or disk.
  ``/usr`` is bound read-only (InterCode's was writable: see data/intercode/README.md).
  Only ``/usr``, ``/etc/alternatives`` and ``/etc/ld.so.cache`` of the host are visible;
  ``/etc`` is synthetic, ``/root``, ``/work``, ``/etc/shadow`` of the host do not exist inside.
- Capabilities: Docker's default set without MKNOD and NET_RAW (the data README's builder).
- Started as host root, bwrap runs as uid 65534 (``nobody``) mapped to root inside: a
  sandbox escape lands as nobody, and RLIMIT_NPROC (never enforced for host root) works.
- Per command (in the controller): timeout (default 10 s, InterCode's) then SIGKILL of every
  process in the namespace, output cap (default 64 KiB, then a marker), RLIMIT_NPROC 64,
  RLIMIT_AS 1 GiB. Residual risk: memory is limited per process, not in total (no cgroups).
"""
from __future__ import annotations

import base64
import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import time

CONTROLLER_SRC = (pathlib.Path(__file__).with_name("controller.py")).read_text()
SANDBOX_PYTHON = "/usr/bin/python3"
SANDBOX_UID = 65534
CAPS = ("CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_FSETID CAP_KILL CAP_SETGID CAP_SETUID CAP_SETFCAP "
        "CAP_SETPCAP CAP_NET_BIND_SERVICE CAP_SYS_CHROOT CAP_AUDIT_WRITE").split()


class SandboxError(RuntimeError):
    """The sandbox could not start or stopped answering (a host problem, not the model's)."""


def check_available() -> str | None:
    """None when bwrap can make a sandbox here; otherwise the reason it cannot."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed; experiments/setup.sh installs it"
    if not os.path.exists(SANDBOX_PYTHON):
        return f"{SANDBOX_PYTHON} is missing (the in-sandbox controller needs Debian's python3)"
    try:
        p = subprocess.run(bwrap_argv() + ["/bin/true"], capture_output=True, timeout=30,
                           preexec_fn=_drop_privileges, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return f"bwrap failed to run: {e}"
    if p.returncode != 0:
        return f"bwrap cannot create namespaces here: {p.stderr.decode(errors='replace').strip()}"
    return None


def _drop_privileges() -> None:
    """preexec: as host root, become nobody (see the module doc); otherwise stay who we are."""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(SANDBOX_UID)
        os.setuid(SANDBOX_UID)


def bwrap_argv(disk_bytes: int = 64 << 20) -> list[str]:
    argv = ["bwrap", "--size", str(int(disk_bytes)), "--tmpfs", "/",
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--symlink", "usr/lib", "/lib"]
    if os.path.exists("/usr/lib64"):
        argv += ["--symlink", "usr/lib64", "/lib64"]
    argv += ["--dir", "/etc"]
    for p in ("/etc/alternatives", "/etc/ld.so.cache"):
        if os.path.exists(p):
            argv += ["--ro-bind", p, p]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(8 << 20), "--tmpfs", "/dev/shm",
             "--remount-ro", "/dev",
             "--unshare-all", "--unshare-user", "--uid", "0", "--gid", "0", "--disable-userns",
             "--die-with-parent", "--new-session", "--as-pid-1", "--hostname", "intercode",
             "--cap-drop", "ALL"]
    for c in CAPS:
        argv += ["--cap-add", c]
    argv += ["--clearenv", "--setenv", "PATH", "/usr/sbin:/usr/bin:/sbin:/bin", "--setenv", "TZ", "UTC",
             "--chdir", "/"]
    return argv


class Sandbox:
    """A started sandbox with its controller; ``request`` sends one op and waits for the reply."""

    def __init__(self, disk_bytes: int = 64 << 20, start_timeout_s: float = 30.0):
        argv = bwrap_argv(disk_bytes) + [SANDBOX_PYTHON, "-I", "-S", "-c", CONTROLLER_SRC]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, preexec_fn=_drop_privileges,
                                         start_new_session=True)
        except OSError as e:
            raise SandboxError(f"could not start bwrap: {e}") from e
        self._buf = b""
        self.start_timeout_s = start_timeout_s

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request(self, op: dict, timeout_s: float) -> dict:
        if not self.alive:
            raise SandboxError("the sandbox is not running")
        try:
            self.proc.stdin.write((json.dumps(op) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as e:
            self.close()
            raise SandboxError(f"the sandbox stopped accepting requests: {e}") from e
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                self.close()
                raise SandboxError(f"the sandbox did not answer {op.get('op')!r} within {timeout_s:.0f} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                err = self._stderr()
                self.close()
                raise SandboxError(f"the sandbox exited while handling {op.get('op')!r}: {err}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            raise SandboxError(f"the sandbox controller failed on {op.get('op')!r}: {reply['error']}")
        return reply

    def _stderr(self) -> str:
        try:
            self.proc.wait(timeout=5)
            return self.proc.stderr.read(4096).decode(errors="replace").strip()
        except (OSError, subprocess.SubprocessError, ValueError):
            return "(no message)"

    def build(self, entries: list, build_time: int, extra_dirs: list) -> None:
        self.request({"op": "build", "entries": entries, "build_time": int(build_time),
                      "extra_dirs": extra_dirs}, self.start_timeout_s)

    def run(self, cmd: str, cwd: str = "/", timeout_s: float = 10.0, cap: int = 64 << 10) -> dict:
        rep = self.request({"op": "run", "cmd": cmd, "cwd": cwd, "timeout": timeout_s, "cap": cap},
                           timeout_s + 30.0)
        rep["output"] = base64.b64decode(rep["output"])
        return rep

    def snapshot(self, max_entries: int = 20000) -> dict:
        return self.request({"op": "snapshot", "max_entries": max_entries}, 60.0)

    def close(self) -> None:
        p, self.proc = getattr(self, "proc", None), None
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGKILL)   # bwrap + controller; the pid namespace dies with them
        except OSError:
            pass
        for f in (p.stdin, p.stdout, p.stderr):
            try:
                f.close()
            except OSError:
                pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def __del__(self):
        self.close()
