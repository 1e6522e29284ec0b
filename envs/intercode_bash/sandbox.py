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
  process in the namespace, output cap (default 64 KiB, then a marker), RLIMIT_NPROC / RLIMIT_AS.
- Per episode (``Limits``, ``cgroup.py``): in a cgroup (v2, or v1 where the controllers live there)
  capping the episode's total memory (default 1 GiB, the tmpfs included, no swap), its processes +
  threads (64) and CPU (1 core); RLIMIT_NPROC 64, RLIMIT_AS 1 GiB per command. Where no cgroup can
  be made (``mode`` ``rlimit``), the per-process limits are lowered instead: RLIMIT_NPROC 16 x
  RLIMIT_AS memory/16 (64 MiB), so the total stays bounded (+ the tmpfs and the controller); CPU is
  then bounded by the command timeout only. The mode is logged once per process and reported in
  the env's ``info["sandbox_limits"]``.
- Closing: the controller's stdin is closed (it exits; or it is SIGKILLed by its host pid from
  ``--info-fd``), then bwrap, which reaps it, is waited for: no zombie is left even where the
  host's init does not reap orphans. The cgroup is then emptied and removed.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import pathlib
import select
import shutil
import signal
import subprocess
import time

from envs.intercode_bash import cgroup

CONTROLLER_SRC = (pathlib.Path(__file__).with_name("controller.py")).read_text()
SANDBOX_PYTHON = "/usr/bin/python3"
SANDBOX_UID = 65534
CAPS = ("CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_FSETID CAP_KILL CAP_SETGID CAP_SETUID CAP_SETFCAP "
        "CAP_SETPCAP CAP_NET_BIND_SERVICE CAP_SYS_CHROOT CAP_AUDIT_WRITE").split()


MODES = ("auto", "cgroup", "rlimit")
RLIMIT_MODE_NPROC = 16
_log = logging.getLogger(__name__)
_LOGGED: set = set()


class SandboxError(RuntimeError):
    """The sandbox could not start or stopped answering (a host problem, not the model's)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """An episode's resource caps (module doc); ``mode`` auto = a cgroup when possible."""
    memory_bytes: int = 1 << 30     # total memory of the episode (tmpfs included)
    pids: int = 64                  # processes + threads of the episode
    cpus: float = 1.0               # CPU cores (cgroup modes)
    mode: str = "auto"              # auto | cgroup (required) | rlimit (per-process limits only)

    def problem(self, disk_bytes: int) -> str | None:
        """None when valid; otherwise what is wrong, in one line."""
        if self.mode not in MODES:
            return f"limits mode {self.mode!r} unknown; known: {MODES}"
        if self.memory_bytes < disk_bytes + (64 << 20):
            return (f"memory_bytes={self.memory_bytes} must be at least disk_bytes + 64 MiB "
                    f"({disk_bytes + (64 << 20)}): the tmpfs lives in it")
        if self.pids < 16:
            return f"pids={self.pids} must be >= 16"
        if not 0.01 <= self.cpus <= 1024:
            return f"cpus={self.cpus} must be in [0.01, 1024]"
        return None

    def per_process(self, mode: str) -> dict:
        """RLIMIT_NPROC / RLIMIT_AS of every command under ``mode``."""
        if mode == "rlimit":
            return {"nproc": RLIMIT_MODE_NPROC, "as_bytes": self.memory_bytes // RLIMIT_MODE_NPROC}
        return {"nproc": self.pids, "as_bytes": min(1 << 30, self.memory_bytes)}


def resolve_mode(requested: str) -> tuple[str, str]:
    """(mode, why): ``cgroup2`` | ``cgroup1`` | ``rlimit`` for a requested auto | cgroup | rlimit."""
    if requested == "rlimit":
        return "rlimit", "requested"
    mode, why = cgroup.detect()
    if mode == "rlimit" and requested == "cgroup":
        raise SandboxError(f"no cgroup can be made here ({why}); use limits mode 'auto' or 'rlimit'")
    if (mode, requested) not in _LOGGED:
        _LOGGED.add((mode, requested))
        if mode == "rlimit":
            _log.warning("intercode_bash: no episode cgroup (%s); memory is bounded per process: "
                         "%d processes x memory/%d of address space", why, RLIMIT_MODE_NPROC,
                         RLIMIT_MODE_NPROC)
        else:
            _log.info("intercode_bash: episodes run in %s cgroups (memory, pids, cpu caps)", mode)
    return mode, why


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

    def __init__(self, disk_bytes: int = 64 << 20, limits: Limits = Limits(), start_timeout_s: float = 30.0):
        why = limits.problem(disk_bytes)
        if why is not None:
            raise ValueError(f"Sandbox: {why}")
        self.proc, self.cgroup, self.child_pid = None, None, None
        self.mode, self.mode_reason = resolve_mode(limits.mode)
        if self.mode != "rlimit":
            try:
                self.cgroup = cgroup.EpisodeCgroup(self.mode, limits.memory_bytes, limits.pids, limits.cpus)
            except OSError as e:
                raise SandboxError(f"could not make the episode's {self.mode} cgroup: {e}") from e
        info_r, info_w = os.pipe()
        argv = (bwrap_argv(disk_bytes) + ["--info-fd", str(info_w), SANDBOX_PYTHON, "-I", "-S", "-c",
                CONTROLLER_SRC, json.dumps(limits.per_process(self.mode))])
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, preexec_fn=self._preexec,
                                         start_new_session=True, pass_fds=(info_w,))
        except (OSError, subprocess.SubprocessError) as e:
            os.close(info_r)
            self.close()
            raise SandboxError(f"could not start bwrap: {e}") from e
        finally:
            os.close(info_w)
        self.child_pid = self._read_child_pid(info_r, start_timeout_s)
        self._buf = b""
        self.start_timeout_s = start_timeout_s

    def _preexec(self) -> None:
        if self.cgroup is not None:
            self.cgroup.attach()
        _drop_privileges()

    @staticmethod
    def _read_child_pid(fd: int, timeout_s: float) -> int | None:
        """bwrap's ``--info-fd`` JSON: the host pid of the controller (None if bwrap failed)."""
        data, end = b"", time.monotonic() + timeout_s
        try:
            while time.monotonic() < end and select.select([fd], [], [], max(end - time.monotonic(), 0))[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        try:
            return int(json.loads(data)["child-pid"])
        except (ValueError, KeyError, TypeError):
            return None

    def memory_peak(self) -> int | None:
        """The episode cgroup's highest memory use in bytes (None in ``rlimit`` mode)."""
        return None if self.cgroup is None or not self.cgroup.dirs else self.cgroup.peak_bytes()

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
            self.close(graceful=False)
            raise SandboxError(f"the sandbox stopped accepting requests: {e}") from e
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                self.close(graceful=False)
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

    def close(self, graceful: bool = True) -> None:
        """Stop the controller first, so that bwrap reaps it, then bwrap; then the cgroup."""
        p, self.proc = getattr(self, "proc", None), None
        if p is not None:
            try:
                p.stdin.close()                       # EOF: the controller returns and exits
            except OSError:
                pass
            try:
                p.wait(timeout=2 if graceful else 0.001)
            except subprocess.TimeoutExpired:
                self._kill_controller(p.pid)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)   # last resort: bwrap itself
                    except OSError:
                        pass
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
            for f in (p.stdout, p.stderr):
                try:
                    f.close()
                except OSError:
                    pass
        cg, self.cgroup = getattr(self, "cgroup", None), None
        if cg is not None:
            cg.remove()

    def _kill_controller(self, bwrap_pid: int) -> None:
        """SIGKILL the controller (PID 1 of the sandbox: the namespace dies with it), if still bwrap's."""
        pid = getattr(self, "child_pid", None)
        if pid is None:
            return
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == bwrap_pid:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass

    def __del__(self):
        self.close()
