"""Per-episode resource caps for the bash sandbox: a cgroup where the machine allows one.

``detect()`` picks, once per process, the first mode that works here (it creates, configures and
removes a probe cgroup; a failure is a reason, never an exception):

- ``cgroup2``: the unified hierarchy offers the memory, pids and cpu controllers and we may write
  it (host root or a delegated tree). Episode cgroups live in ``retroact-bash/`` at the root of the
  hierarchy as we see it (a cgroup that holds processes, like our own, cannot give controllers to
  children). Files: ``memory.max``, ``memory.swap.max`` = 0, ``pids.max``, ``cpu.max``.
- ``cgroup1``: the v1 memory, pids and cpu hierarchies are mounted and writable (hybrid layouts,
  e.g. Firecracker VMs whose unified hierarchy carries no controller). Episode cgroups live in
  ``retroact-bash/`` under our own cgroup of each hierarchy, so memory is also charged to it.
  Files: ``memory.limit_in_bytes`` (+ ``memory.memsw.limit_in_bytes`` when swap is accounted),
  ``pids.max``, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``.
- ``rlimit``: neither. No cgroup: the caller lowers the per-process limits instead (see
  ``sandbox.Limits.per_process``), so processes x address space is still bounded.

An episode cgroup is named ``<pid>.<start time>.<n>`` of the process that made it; a cgroup whose
maker is gone (a crash) is emptied and removed by the next ``EpisodeCgroup`` of any process.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time

PARENT = "retroact-bash"
V1_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
_SEQ = itertools.count(1)           # next() is atomic under the GIL: unique names per process
_DETECTED: dict = {}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _mounts() -> list[tuple[str, str, str, set]]:
    """(fstype, mount root inside the fs, mount point, super options) of every mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fields, rfields = left.split(), right.split()
            out.append((rfields[0], fields[3], fields[4], set(rfields[2].split(","))))
    return out


def _own_paths() -> dict[str, str]:
    """Our cgroup path per v1 controller, and under key "" the unified (v2) one."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


def _under(mount_root: str, mount_point: str, path: str) -> str:
    rel = path[len(mount_root):] if path.startswith(mount_root) else path
    return os.path.join(mount_point, rel.lstrip("/"))


def _parents(mode: str) -> list[str]:
    """The ``retroact-bash`` directories episode cgroups go in (one per hierarchy); raises OSError."""
    mounts, own = _mounts(), _own_paths()
    if mode == "cgroup2":
        for fstype, _, point, _ in mounts:
            if fstype == "cgroup2":
                have = set(_read(os.path.join(point, "cgroup.controllers")).split())
                missing = [c for c in ("memory", "pids", "cpu") if c not in have]
                if missing:
                    raise OSError(f"cgroup v2 at {point} lacks the {'/'.join(missing)} controller(s) "
                                  f"(bound to v1 hierarchies or not delegated)")
                return [os.path.join(point, PARENT)]
        raise OSError("no cgroup v2 hierarchy is mounted")
    parents = []
    for c in V1_CONTROLLERS:
        hit = [(root, point) for fstype, root, point, opts in mounts if fstype == "cgroup" and c in opts]
        if not hit or c not in own:
            raise OSError(f"no cgroup v1 {c} hierarchy is mounted")
        parents.append(os.path.join(_under(*hit[0], own[c]), PARENT))
    return parents


def _prepare(mode: str, parent: str) -> None:
    os.makedirs(parent, exist_ok=True)
    if mode == "cgroup2":
        root = os.path.dirname(parent)
        for d in (root, parent):
            want = {"memory", "pids", "cpu"} - set(_read(os.path.join(d, "cgroup.subtree_control")).split())
            if want:
                _write(os.path.join(d, "cgroup.subtree_control"), " ".join("+" + c for c in sorted(want)))


def _configure(mode: str, dirs: list[str], memory_bytes: int, pids: int, cpus: float) -> None:
    quota = max(1000, int(cpus * CPU_PERIOD_US))
    if mode == "cgroup2":
        (d,) = dirs
        _write(f"{d}/memory.max", memory_bytes)
        if os.path.exists(f"{d}/memory.swap.max"):
            _write(f"{d}/memory.swap.max", 0)
        _write(f"{d}/pids.max", pids)
        _write(f"{d}/cpu.max", f"{quota} {CPU_PERIOD_US}")
        return
    mem, pid_d, cpu = dirs
    _write(f"{mem}/memory.limit_in_bytes", memory_bytes)
    if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):
        _write(f"{mem}/memory.memsw.limit_in_bytes", memory_bytes)
    _write(f"{pid_d}/pids.max", pids)
    _write(f"{cpu}/cpu.cfs_period_us", CPU_PERIOD_US)
    _write(f"{cpu}/cpu.cfs_quota_us", quota)


def detect() -> tuple[str, str]:
    """(mode, why): the mode episodes get here, and why the better modes were not possible."""
    if not _DETECTED:
        reasons = []
        for mode in ("cgroup2", "cgroup1"):
            try:
                cg = EpisodeCgroup(mode, 256 << 20, 16, 1.0, probe=True)
                try:                                   # a process must be able to enter it
                    subprocess.run(["/bin/true"], preexec_fn=cg.attach, check=True, timeout=30)
                finally:
                    cg.remove()
                _DETECTED["v"] = (mode, "; ".join(reasons))
                break
            except (OSError, subprocess.SubprocessError) as e:
                reasons.append(f"{mode}: {e}")
        else:
            _DETECTED["v"] = ("rlimit", "; ".join(reasons))
    return _DETECTED["v"]


def _start_time(pid: int) -> str | None:
    try:
        return _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _procs(d: str) -> list[int]:
    try:
        return [int(x) for x in _read(os.path.join(d, "cgroup.procs")).split()]
    except OSError:
        return []


def _empty_and_remove(d: str, wait_s: float = 5.0) -> None:
    """SIGKILL what is left in cgroup ``d`` and remove it (OSError if it stays busy)."""
    end = time.monotonic() + wait_s
    while True:
        left = _procs(d)
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.01)


def remove_stale(parent: str) -> list[str]:
    """Remove the episode cgroups in ``parent`` whose making process no longer exists."""
    gone = []
    try:
        names = os.listdir(parent)
    except OSError:
        return gone
    for name in names:
        parts = name.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        if _start_time(int(parts[0])) == parts[1]:
            continue                                   # its process still runs
        try:
            _empty_and_remove(os.path.join(parent, name), wait_s=1.0)
            gone.append(name)
        except OSError:
            pass
    return gone


class EpisodeCgroup:
    """One episode's cgroup(s) with the caps written; ``attach`` puts the calling process in."""

    def __init__(self, mode: str, memory_bytes: int, pids: int, cpus: float, probe: bool = False):
        if mode not in ("cgroup2", "cgroup1"):
            raise ValueError(f"EpisodeCgroup: unknown mode {mode!r}")
        self.mode, self.memory_bytes = mode, int(memory_bytes)
        self.parents = _parents(mode)
        name = f"{os.getpid()}.{_start_time(os.getpid())}.{next(_SEQ)}"
        self.dirs: list[str] = []
        try:
            for parent in self.parents:
                for attempt in range(3):          # another process may rmdir an empty parent
                    try:
                        _prepare(mode, parent)
                        if not probe:
                            remove_stale(parent)
                        d = os.path.join(parent, name)
                        os.mkdir(d)
                        self.dirs.append(d)
                        break
                    except FileNotFoundError:
                        if attempt == 2:
                            raise
            _configure(mode, self.dirs, self.memory_bytes, int(pids), float(cpus))
        except OSError:
            self.remove()
            raise

    def attach(self) -> None:
        """Move the calling process in (a ``preexec_fn``: runs in the child before exec)."""
        for d in self.dirs:
            _write(os.path.join(d, "cgroup.procs"), os.getpid())

    def peak_bytes(self) -> int:
        """Highest memory use of the episode so far (page cache and tmpfs included)."""
        f = "memory.peak" if self.mode == "cgroup2" else "memory.max_usage_in_bytes"
        return int(_read(os.path.join(self.dirs[0], f)))

    def oom_kills(self) -> int:
        """How many processes the kernel killed for exceeding the memory cap."""
        f = "memory.events" if self.mode == "cgroup2" else "memory.oom_control"
        fields = dict(line.split() for line in _read(os.path.join(self.dirs[0], f)).splitlines())
        return int(fields.get("oom_kill", 0))

    def procs(self) -> list[int]:
        return sorted({p for d in self.dirs for p in _procs(d)})

    def remove(self) -> None:
        """Kill anything left inside, remove the cgroup(s) and the parent once it is empty."""
        dirs, self.dirs = self.dirs, []
        for d in dirs:
            try:
                _empty_and_remove(d)
            except OSError:
                pass
            try:
                os.rmdir(os.path.dirname(d))        # fails while other episodes use it: fine
            except OSError:
                pass
