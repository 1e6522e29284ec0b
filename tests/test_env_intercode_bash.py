"""InterCode-Bash: action parsing, the reward against InterCode's rules, golds replayed in the
sandbox, the sandbox's safety against hostile commands, and fuzzed model output."""
from __future__ import annotations

import math
import os
import random
import string
import time

import pytest

import envs
from envs.base import EnvError
from envs.intercode_bash import fs, parse_action
from envs.intercode_bash.env import NON_CODE_OBS, TIMEOUT_OBS
from envs.intercode_bash.reward import bash_reward, tfidf_similarity
from envs.intercode_bash.sandbox import check_available

_WHY = None


def _need_bwrap():
    global _WHY
    if _WHY is None:
        _WHY = check_available() or ""
    if _WHY:
        pytest.skip(f"bwrap sandbox unavailable: {_WHY}")


@pytest.fixture(scope="module")
def env():
    _need_bwrap()
    e = envs.make("intercode_bash", split="test", timeout_s=3.0, max_steps=1000)
    yield e
    e.close()


# -- no sandbox needed ------------------------------------------------------------------------
def test_tasks_and_splits():
    e = envs.make("intercode_bash", split="all")
    assert len(e.tasks) == 200 and e.tasks[0].id == "fs_1#0" and e.tasks[199].id == "fs_4#26"
    assert [t.data["fs"] for t in e.tasks].count("fs_2") == 53
    with pytest.raises(EnvError, match="no train split"):
        envs.make("intercode_bash", split="train")
    with pytest.raises(EnvError, match="reward_mode"):
        envs.make("intercode_bash", reward_mode="nope")


@pytest.mark.parametrize("action,expected", [
    ("submit", ("submit", None)), ("  submit \n", ("submit", None)),
    ("execute[ls -la]", ("execute", "ls -la")), ("execute[echo [a] b]", ("execute", "echo [a] b")),
    ("Thought: x execute[pwd] and more", ("execute", "pwd")), ("execute[submit]", ("submit", None)),
    ("execute[]", ("execute", "")), ("submit now", ("invalid", None)), ("ls", ("invalid", None)),
    ("Execute[ls]", ("invalid", None)), ("", ("invalid", None)),
])
def test_parse_action(action, expected):
    assert parse_action(action) == expected


def test_tfidf_matches_sklearn_formula():
    # idf(hello)=1, idf(world)=idf(there)=ln(3/2)+1; cosine = 1 / (1 + idf^2)
    w = math.log(1.5) + 1
    assert tfidf_similarity("Hello world", "hello there") == pytest.approx(1 / (1 + w * w))
    assert tfidf_similarity("a b c", "a b c") == 1.0          # empty vocabulary -> equality
    assert tfidf_similarity("1\n", "2\n") == 0.0
    assert tfidf_similarity(None, "") == 0.0 and tfidf_similarity("", "") == 1.0
    assert tfidf_similarity("foo bar", "") == 0.0
    assert tfidf_similarity("foo bar foo", "bar foo foo") == pytest.approx(1.0)


def test_tfidf_against_scikit_learn():
    sk = pytest.importorskip("sklearn.feature_extraction.text")
    rng = random.Random(0)
    words = ["ab", "Ab", "xyz", "é1", "__", "q", "file.txt", "9", "42"]
    for _ in range(200):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        try:
            m = sk.TfidfVectorizer().fit_transform([a, b])
            ref = (m * m.T).toarray()[0][1]
        except ValueError:
            ref = 1 if a == b else 0
        assert tfidf_similarity(a, b) == pytest.approx(ref, abs=1e-12)


def _snap(files, overflow=False):
    return {"files": {p: list(v) for p, v in files.items()}, "dirs": [], "overflow": overflow}


def test_git_status_rules():
    init = _snap({"t/a.txt": ("f", False, "1"), "t/d/b.sh": ("f", False, "2"), "x.html": ("f", False, "3")})
    now = _snap({"t/a.txt": ("f", False, "9"), "t/d/b.sh": ("f", True, "2"),       # content, +x
                 "t/new.txt": ("f", False, "4"), "t/n1/n2/c": ("f", False, "5"),     # new file, new dir
                 "t/n1/n2/d": ("l", False, "6")})                                    # x.html deleted
    assert fs.git_status(init, now) == {("t/a.txt", "M"), ("t/d/b.sh", "M"), ("x.html", "D"),
                                        ("t/new.txt", "??"), ("t/n1/", "??")}
    assert fs.git_status(init, init) == set()


def test_reward_parts_follow_intercode():
    init = _snap({"t/a.txt": ("f", False, "1")})
    gold = _snap({"t/a.txt": ("f", False, "1"), "t/out.txt": ("f", False, "G"), "t/dir/x": ("f", False, "G")})
    same = _snap({"t/a.txt": ("f", False, "1"), "t/out.txt": ("f", False, "G"), "t/dir/x": ("f", False, "G")})
    r, d = bash_reward(init, same, init, gold, "3 files", "3 files")
    assert r == 1.0 and d["reward_hundredths"] == 100
    wrong = _snap({"t/a.txt": ("f", False, "1"), "t/out.txt": ("f", False, "B"), "t/dir/x": ("f", False, "B")})
    r, d = bash_reward(init, wrong, init, gold, "3 files", "3 files")
    assert d["file_changes"] == 0.17 and r == pytest.approx(0.84)    # only the dotted path is hashed
    r, d = bash_reward(init, wrong, init, gold, "3 files", "3 files", mode="strict")
    assert d["file_changes"] == 0.0 and r == pytest.approx(0.67)
    r, d = bash_reward(init, init, init, gold, None, "3 files")       # nothing done, nothing said
    assert d["file_diff"] == 0.0 and d["file_changes"] == 0.33 and r == pytest.approx(0.34)
    one = _snap({"t/a.txt": ("f", False, "1"), "t/out.txt": ("f", False, "G")})
    _, d = bash_reward(init, one, init, gold, "x", "x")
    assert d["file_diff"] == round(0.33 * (1 - math.erf(1)), 2)


def test_invalid_actions_start_no_sandbox(monkeypatch):
    e = envs.make("intercode_bash")
    e.task, e.steps, e.done = e.tasks[0], 0, False      # no reset: any sandbox use would fail
    monkeypatch.setattr(e, "_sandbox", None)
    rng = random.Random(1)
    alphabet = string.printable + "[]()\x00\udc80é漢"
    for i in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        if parse_action(s)[0] != "invalid":
            continue
        e.steps, e.done = 0, False
        obs, r, done, info = e.step(s)
        assert obs == NON_CODE_OBS and r == 0.0 and info["invalid"] and not done


# -- sandbox -----------------------------------------------------------------------------------
@pytest.mark.bwrap
def test_gold_replay_sample_reaches_reward_1(env):
    # 20 tasks over all four file systems; golds that walk the whole root (``find ${DIRECTORY}``
    # with DIRECTORY unset, ~120k files incl. /proc) depend on machine load and the 10 s timeout,
    # so the sample takes the next task instead (bench/intercode_bash_gold.py replays all 200)
    sample = []
    for i in range(0, 200, 10):
        while "${DIRECTORY}" in env.task_at(i).data["gold"] or " / " in env.task_at(i).data["gold"]:
            i += 1
        sample.append(i)
    assert len(set(sample)) == 20
    for i in sample:
        task = env.task_at(i)
        env.reset(i)
        env.step(f"execute[{task.data['gold']}]")
        _, r, done, info = env.step("submit")
        assert done and r == 1.0 and info["success"], (task.id, info["reward_details"])


@pytest.mark.bwrap
def test_wrong_answer_and_state_persistence(env):
    i = next(t.index for t in env.tasks if t.data["gold"].startswith("find /system -type f -mtime +31 -exec rm"))
    env.reset(i)
    obs, r, done, _ = env.step("execute[cd /system/folder1]")
    assert (obs, r, done) == ("", 0.0, False)
    assert env.step("execute[pwd; echo hi > mine.txt]")[0] == "/system/folder1\n"
    assert env.step("execute[cat /system/folder1/mine.txt]")[0] == "hi\n"
    _, r, done, info = env.step("submit")
    assert done and r < 1.0 and not info["success"] and info["reward_details"]["diff_miss"]
    env.reset(i)                                      # a new episode starts from the manifest again
    assert "No such file" in env.step("execute[cat /system/folder1/mine.txt]")[0]
    assert env.step("execute[pwd]")[0] == "/\n"


@pytest.mark.bwrap
def test_step_limit():
    _need_bwrap()
    with envs.make("intercode_bash", max_steps=2) as e:
        e.reset(0)
        assert e.step("execute[true]")[2] is False
        _, _, done, info = e.step("execute[true]")
        assert done and info["truncated"] and info["steps"] == 2


@pytest.mark.bwrap
def test_hostile_commands_cannot_escape(env, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("alive")
    env.reset(0)
    run = lambda c: env.step(f"execute[{c}]")[0]          # noqa: E731
    assert "Command timed out" == run("sleep 100")
    t = time.monotonic()
    bomb = run(":(){ :|:& };:")
    assert bomb == TIMEOUT_OBS or "fork" in bomb
    assert time.monotonic() - t < 15 and run("echo ok") == "ok\n"
    out = run("yes")
    assert out.endswith("[output truncated: more than 65536 bytes]") and len(out) < 70000
    assert "No space left on device" in run("head -c 200M /dev/zero > /big")
    assert "64M" in run("df -h / | tail -1")
    assert "Read-only" in run("echo x > /dev/junk") and "No space" in run("head -c 20M /dev/zero > /dev/shm/x")
    assert "Read-only" in run("touch /usr/evil")
    net = run("curl -sS -m 2 http://1.1.1.1; python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 80), 2)'")
    assert "Network is unreachable" in net or "Could not" in net or "Failed" in net
    assert run("ls /work /etc/shadow 2>&1; ls -A /root") .count("No such file") == 2
    assert "Permission denied" in run("echo forged > /proc/1/fd/1")
    run("kill -9 1; kill -9 -1")
    assert run("(sleep 30 >/dev/null 2>&1 &); echo started") == "started\n"
    assert run("ps -e -o comm= | grep -c sleep") == "0\n"                      # background jobs die
    run("rm -rf --no-preserve-root / 2>/dev/null")
    assert canary.read_text() == "alive" and os.path.isdir("/usr/bin")
    env.reset(0)                                                               # fresh machine again
    assert env.step("execute[ls /testbed/dir1]")[0].startswith("AnotherHello.java")


@pytest.mark.bwrap
def test_episodes_are_isolated():
    _need_bwrap()
    with envs.make("intercode_bash") as a, envs.make("intercode_bash") as b:
        a.reset(0)
        b.reset(0)
        a.step("execute[echo secret > /testbed/s.txt; echo x > /tmp/t]")
        assert "No such file" in b.step("execute[cat /testbed/s.txt /tmp/t]")[0]


@pytest.mark.bwrap
def test_fuzz_in_sandbox_never_raises(env):
    rng = random.Random(2)
    hostile = ["\x00", "\udc80\ud800", "'", '"', "`", "$(", "\\", "exit 3", "exec 3>&-; cd /tmp",
               "trap '' EXIT; cd /etc", "echo -n /nonexistent >&3", "x" * 200_000, "cat /dev/urandom",
               "head -c 3000 /dev/urandom", "]]]", "execute[ls]", "kill -STOP 1", "ulimit -n 1; ls",
               "cd /testbed/dir1; rm -rf /testbed", "cd ..; cd ..; pwd"]
    hostile += ["".join(rng.choice(string.printable) for _ in range(rng.randint(1, 40))) for _ in range(20)]
    env.reset(5)
    for i, cmd in enumerate(hostile):
        if env.done:
            env.reset(5)
        obs, r, done, info = env.step(f"execute[{cmd}]")
        assert isinstance(obs, str) and r == 0.0 and "sandbox_error" not in info, (cmd[:50], obs[:200])
    assert env.step("execute[pwd]")[0].startswith("/")
    env.step("submit")


# -- episode caps, controller signals, zombies (issue 10) ------------------------------------------
def _cgroup_mode():
    _need_bwrap()
    from envs.intercode_bash import cgroup
    mode, why = cgroup.detect()
    if mode == "rlimit":
        pytest.skip(f"no episode cgroup on this machine: {why}")
    return mode


@pytest.mark.bwrap
def test_controller_ignores_signals_from_inside(env):
    env.reset(0)
    for sig in ("INT", "TERM", "HUP", "QUIT", "USR1", "ALRM", "STOP", "KILL"):
        obs, _, done, info = env.step(f"execute[kill -{sig} 1; sleep 0.2; echo alive]")
        assert (obs, done) == ("alive\n", False) and "sandbox_error" not in info, (sig, obs)
    assert env.step("execute[cd /testbed; kill -INT 1; pwd]")[0] == "/testbed\n"
    assert env.step("execute[pwd]")[0] == "/testbed\n"              # state kept: same controller
    # orphans that exit while the command runs are reaped by the controller (PID 1) at once
    assert env.step("execute[for i in 1 2 3; do (true &); done; sleep 0.5; ps -eo stat= | grep -c Z]")[0] == "0\n"
    _, r, done, info = env.step("submit")
    assert done and "sandbox_error" not in info


_ZOMBIE_SCRIPT = r"""
import ctypes, os, envs
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)     # PR_SET_CHILD_SUBREAPER: orphans come to us, never reaped
e = envs.make("intercode_bash", timeout_s=3.0)
dirs = []
for i in range(10):
    e.reset(i)
    e.step("execute[(sleep 30 &); ls]")
    dirs += getattr(getattr(e._sandbox, "cgroup", None), "dirs", [])
    if not e.done:
        e.step("submit")
e.close()
zombies = []
for p in os.listdir("/proc"):
    try:
        after = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        continue
    if int(after[1]) == os.getpid():
        zombies.append((p, after[0]))
print("CHILDREN", zombies)
print("CGROUPS_LEFT", [d for d in dirs if os.path.exists(d)])
"""


@pytest.mark.bwrap
def test_no_zombie_and_no_cgroup_after_10_episodes():
    _need_bwrap()
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", _ZOMBIE_SCRIPT], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines() if line.startswith(("CHILDREN", "CGROUPS")))
    assert lines["CHILDREN"] == "[]" and lines["CGROUPS_LEFT"] == "[]", p.stdout


@pytest.mark.bwrap
def test_memory_cap_is_total_per_episode():
    mode = _cgroup_mode()
    cap = 384 << 20
    with envs.make("intercode_bash", timeout_s=20.0, memory_bytes=cap) as e:
        e.reset(0)
        # the shape: several processes, each under the per-process limit, together over the cap
        cmd = ("for i in 1 2 3 4; do python3 -c \"import time; b=b'x'*(200*1024**2); time.sleep(3)\" & done; "
               "wait; echo done")
        obs, _, done, info = e.step(f"execute[{cmd}]")
        sb = e._sandbox
        assert info["sandbox_limits"] == mode and not done
        assert "Killed" in obs or "MemoryError" in obs, obs
        assert sb.cgroup.oom_kills() >= 1
        assert sb.memory_peak() <= cap                       # host side: the episode never held more
        assert e.step("execute[echo ok]")[0] == "ok\n"       # the controller survived the OOM
        assert e.step("execute[python3 -c \"b=b'x'*(100*1024**2); print(len(b))\"]")[0] == "104857600\n"


@pytest.mark.bwrap
def test_rlimit_fallback_bounds_processes_times_memory():
    _need_bwrap()
    with envs.make("intercode_bash", timeout_s=5.0, limits_mode="rlimit") as e:
        e.reset(0)
        obs, _, _, info = e.step("execute[python3 -c \"b=b'x'*(100*1024**2)\"]")
        assert info["sandbox_limits"] == "rlimit" and "MemoryError" in obs          # > 1 GiB / 16
        assert e.step("execute[python3 -c \"b=b'x'*(20*1024**2); print(len(b))\"]")[0] == "20971520\n"
        obs = e.step("execute[for i in $(seq 20); do sleep 2 & done; wait; echo done]")[0]
        assert "fork" in obs and "Resource temporarily unavailable" in obs         # 16 processes
        assert e._sandbox.cgroup is None and e._sandbox.memory_peak() is None
        assert e.step("execute[ls /testbed/dir1 | head -1]")[0] == "AnotherHello.java\n"


@pytest.mark.bwrap
def test_stale_cgroup_of_a_dead_process_is_removed():
    mode = _cgroup_mode()
    import subprocess
    import sys
    from envs.intercode_bash import cgroup
    code = (f"import os; from envs.intercode_bash import cgroup; "
            f"print(repr(cgroup.EpisodeCgroup({mode!r}, 256 << 20, 16, 1.0).dirs)); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    stale = eval(out)                                  # noqa: S307 (our own repr of a list of paths)
    assert stale and all(os.path.isdir(d) for d in stale)
    cg = cgroup.EpisodeCgroup(mode, 256 << 20, 16, 1.0)
    try:
        assert not any(os.path.exists(d) for d in stale)
    finally:
        cg.remove()


def test_bad_limits_fail_before_work():
    with pytest.raises(EnvError, match="memory_bytes"):
        envs.make("intercode_bash", memory_bytes=32 << 20)
    with pytest.raises(EnvError, match="limits mode"):
        envs.make("intercode_bash", limits_mode="docker")
    with pytest.raises(EnvError, match="pids"):
        envs.make("intercode_bash", pids=2)


def test_cgroup2_files_on_a_fake_hierarchy(tmp_path, monkeypatch):
    # this project's machines have a v1 layout (the real-kernel tests above run there); the v2 file
    # layout is checked on a plain directory standing in for the unified hierarchy
    from envs.intercode_bash import cgroup
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("cpu\n")
    (tmp_path / cgroup.PARENT).mkdir()
    (tmp_path / cgroup.PARENT / "cgroup.subtree_control").write_text("")
    monkeypatch.setattr(cgroup, "_mounts", lambda: [("cgroup2", "/", str(tmp_path), {"rw"})])
    cg = cgroup.EpisodeCgroup("cgroup2", 300 << 20, 40, 1.5)
    (d,) = cg.dirs
    assert os.path.dirname(d) == str(tmp_path / cgroup.PARENT)
    read = lambda f: open(os.path.join(d, f)).read()               # noqa: E731
    assert (read("memory.max"), read("pids.max"), read("cpu.max")) == (str(300 << 20), "40", "150000 100000")
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids"      # cpu was on
    assert (tmp_path / cgroup.PARENT / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    with pytest.raises(OSError, match="memory/pids"):
        cgroup.EpisodeCgroup("cgroup2", 300 << 20, 40, 1.0)
