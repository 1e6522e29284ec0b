"""The in-sandbox controller: PID 1 of one episode's bubblewrap sandbox (stdlib only).

It runs under the sandbox's own ``/usr/bin/python3`` (``python3 -c <this file>``), so it imports
nothing from the project. The host talks to it over its stdin/stdout, one JSON object per line:

  {"op": "build", "entries": [...], "build_time": int, "extra_dirs": [[path, mode], ...]}
  {"op": "run", "cmd": str, "cwd": str, "timeout": float, "cap": int}
      -> {"output": b64, "exit": int|null, "timed_out": bool, "truncated": bool, "cwd": str}
  {"op": "snapshot", "max_entries": int}
      -> {"files": {path: [kind, exec_bit, digest]}, "dirs": [...], "overflow": bool}

Why PID 1: the init of a PID namespace never gets a signal sent from inside it unless it handles
that signal, so no command can kill it with SIGKILL or SIGSTOP; every other catchable signal is set
to SIG_IGN (Python's own SIGINT handler would otherwise raise KeyboardInterrupt on ``kill -INT 1``),
and back to SIG_DFL in commands. After every command it kills every other process of the namespace
(``kill(-1, SIGKILL)``) and reaps every child, so background jobs never outlive their command and
no zombie is left; orphans reparented to it are reaped while a command runs too. Commands get
``oom_score_adj`` 1000: when the episode's memory cgroup is full, the kernel kills them, not it.
It makes itself non-dumpable, so commands (which lack CAP_SYS_PTRACE) cannot open ``/proc/1/fd``
and forge replies. Commands get ``setsid``, stdin ``/dev/null``, rlimits (processes, address space,
core; the first two from ``argv[1]``, a JSON object, default ``LIMITS``) and ``BASH_ENV``
pointing at a tiny rc that restores nothing but reports the final ``pwd`` on fd 3 at exit, which
is how the working directory persists between commands.
"""
import base64
import ctypes
import hashlib
import json
import os
import resource
import select
import signal
import stat
import sys
import time

RC_PATH = "/run/.ic/rc"
RC_TEXT = "unset BASH_ENV\ntrap 'builtin pwd >&3 2>/dev/null' EXIT\n"
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
       "HOSTNAME": "intercode", "BASH_ENV": RC_PATH}
# InterCode's docker.gitignore: these names are ignored at any depth.
IGNORED = frozenset("bin boot dev etc home lib media opt proc root run sbin srv sys usr var .dockerenv".split())
LIMITS = {"nproc": 64, "as_bytes": 1 << 30}
# signals the controller ignores: every catchable one but SIGCHLD (needed by waitpid) and the faults
# a bug of its own raises (SIG_DFL there; a kill from inside the namespace never reaches PID 1)
KEEP_DFL = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS,
            signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS}
IGNORED_SIGNALS = sorted(set(signal.valid_signals()) - KEEP_DFL)


def _reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _write_etc():
    os.makedirs("/etc", exist_ok=True)
    for name in ("passwd", "group"):
        src = "/usr/share/base-passwd/%s.master" % name
        text = open(src).read() if os.path.exists(src) else "root:x:0:0:root:/root:/bin/bash\n"
        if name == "group" and not os.path.exists(src):
            text = "root:x:0:\n"
        with open("/etc/" + name, "w") as f:
            f.write(text)
    files = {"hostname": "intercode\n",
             "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tintercode\n",
             "networks": "default\t\t0.0.0.0\nloopback\t127.0.0.0\nlink-local\t169.254.0.0\n",
             "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
                              "networks: files\nprotocols: db files\nservices: db files\n",
             "resolv.conf": "nameserver 127.0.0.1\n"}
    for name, text in files.items():
        with open("/etc/" + name, "w") as f:
            f.write(text)
    if not os.path.lexists("/etc/mtab"):
        os.symlink("/proc/self/mounts", "/etc/mtab")


def op_build(req):
    """Create the manifest's tree; dirs' times are set last (children change a dir's mtime)."""
    os.umask(0o022)
    build_time = int(req["build_time"])
    _write_etc()
    os.makedirs(os.path.dirname(RC_PATH), exist_ok=True)
    with open(RC_PATH, "w") as f:
        f.write(RC_TEXT)
    for path, mode in req.get("extra_dirs", []):
        os.makedirs(path, exist_ok=True)
        os.chmod(path, int(mode, 8))
    dirs = []
    for e in req["entries"]:
        p, mode = e["path"], int(e["mode"], 8)
        t = build_time if e.get("mtime") is None else int(e["mtime"])
        if e["type"] == "dir":
            os.makedirs(p, exist_ok=True)
            os.chmod(p, mode)
            dirs.append((p, t))
        else:
            raw = e["content"].encode("utf-8") if e["encoding"] == "utf-8" else base64.b64decode(e["content"])
            with open(p, "wb") as f:
                f.write(raw)
            os.chmod(p, mode)
            os.utime(p, (t, t))
    for p, t in sorted(dirs, key=lambda d: -d[0].count("/")):
        os.utime(p, (t, t))
    return {"ok": True}


def _child(cmd, cwd, out_w, cwd_w):
    try:
        os.setsid()
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.dup2(cwd_w, 3)
        os.closerange(4, 1 << 16)
        for sig in IGNORED_SIGNALS + [signal.SIGCHLD]:
            signal.signal(sig, signal.SIG_DFL)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        resource.setrlimit(resource.RLIMIT_NPROC, (LIMITS["nproc"], LIMITS["nproc"]))
        resource.setrlimit(resource.RLIMIT_AS, (LIMITS["as_bytes"], LIMITS["as_bytes"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            os.chdir(cwd)
        except OSError:
            os.chdir("/")
        os.execve("/bin/bash", ["/bin/bash", "-c", cmd], ENV)
    finally:
        os._exit(127)


def _kill_all_and_reap(main_pid, deadline_s=5.0):
    """SIGKILL every process but us (we are init), then reap them; returns main's wait status."""
    status = None
    end = time.monotonic() + deadline_s
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == main_pid:
            status = st
        if pid == 0:
            if time.monotonic() > end:
                return status
            time.sleep(0.005)


def _reap_now(main_pid):
    """Reap every child that has exited (orphans included); main's wait status once it has."""
    status = None
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == main_pid:
            status = st


def op_run(req):
    cmd, cwd = req["cmd"], req.get("cwd", "/")
    timeout, cap = float(req["timeout"]), int(req["cap"])
    out_r, out_w = os.pipe()
    cwd_r, cwd_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(cwd_r)
        _child(cmd, cwd, out_w, cwd_w)
    os.close(out_w)
    os.close(cwd_w)
    deadline = time.monotonic() + timeout
    buf, truncated, timed_out, eof, status = bytearray(), False, False, False, None
    while True:
        if not eof:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([out_r], [], [], min(left, 0.05))
            if ready:
                chunk = os.read(out_r, 65536)
                if not chunk:
                    eof = True
                else:
                    buf += chunk
                    if len(buf) > cap:
                        truncated = True
                        break
        if status is None:
            status = _reap_now(pid)
        if status is not None and eof:
            break
        if status is None and eof:   # output closed but the shell still runs
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.005)
    os.close(out_r)
    reaped = _kill_all_and_reap(pid)
    status = status if status is not None else reaped
    os.set_blocking(cwd_r, False)
    try:
        report = os.read(cwd_r, 8192)
    except OSError:
        report = b""
    os.close(cwd_r)
    new_cwd = cwd
    lines = report.decode("utf-8", "replace").strip().splitlines()
    if lines and lines[-1].startswith("/") and os.path.isdir(lines[-1]):
        new_cwd = lines[-1]
    code = None
    if status is not None:
        code = os.waitstatus_to_exitcode(status)
    return {"output": base64.b64encode(bytes(buf[:cap])).decode(), "exit": code,
            "timed_out": timed_out, "truncated": truncated, "cwd": new_cwd}


def _digest(path, st):
    if stat.S_ISLNK(st.st_mode):
        return ["l", False, hashlib.md5(os.readlink(path).encode("utf-8", "surrogateescape")).hexdigest()]
    if stat.S_ISREG(st.st_mode):
        h = hashlib.md5()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:  # e.g. chmod 000 without CAP_DAC_OVERRIDE: still a change git sees
            h.update(b"unreadable:" + str(e.errno).encode())
        return ["f", bool(st.st_mode & 0o100), h.hexdigest()]
    return ["o", False, "%o" % stat.S_IFMT(st.st_mode)]   # fifo/socket: git ignores them


def op_snapshot(req):
    """Every non-ignored path (no symlink followed), relative to / as git status prints them."""
    limit = int(req.get("max_entries", 20000))
    files, dirs, overflow = {}, [], False
    stack = ["/"]
    while stack:
        d = stack.pop()
        try:
            it = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in it:
            if e.name in IGNORED:
                continue
            if len(files) + len(dirs) >= limit:
                overflow = True
                break
            rel = e.path[1:]
            try:
                st = os.lstat(e.path)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                dirs.append(rel)
                stack.append(e.path)
            else:
                files[rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")] = _digest(e.path, st)
    return {"files": files, "dirs": [d.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                                     for d in dirs], "overflow": overflow}


def main():
    if len(sys.argv) > 1:
        LIMITS.update({k: int(v) for k, v in json.loads(sys.argv[1]).items() if k in LIMITS})
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)   # PR_SET_DUMPABLE = 0: /proc/1 closed to commands
    except Exception:
        pass
    ops = {"build": op_build, "run": op_run, "snapshot": op_snapshot}
    for line in sys.stdin:
        try:
            req = json.loads(line)
            _reply(ops[req["op"]](req))
        except Exception as e:   # report, keep serving: the host decides what a failure means
            _reply({"error": "%s: %s" % (type(e).__name__, e)})


if __name__ == "__main__":
    main()
