"""InterCode-Bash (NL2Bash, 200 tasks) behind the ``envs.base.Env`` protocol.

Splits: ``"test"`` and ``"all"`` are the 200 tasks (fs_1..fs_4 in order), the set InterCode
evaluates; there is no ``"train"`` split (InterCode ships none for bash, the paper did not
evaluate Bash): asking for it is an ``EnvError`` naming this.

Actions, as RetroAct's ReAct agent for InterCode (``bash_parser_react`` + ``intercode_trial``):
the action text (surrounding whitespace stripped) is ``submit``, or ``execute[<cmd>]`` where
``<cmd>`` is everything between the first ``execute[`` and the last ``]``. A command that starts
with ``submit`` submits (InterCode's ``step`` checks ``startswith("submit")``). Anything else
gets ``Error executing query: Your last `execute` action did not contain bash code``, reward 0,
``invalid=True``; it starts no sandbox process.

``execute`` runs the command in the episode's sandbox (``sandbox.Sandbox``, built at reset);
the observation is its stdout+stderr, ``Command timed out`` after the timeout (InterCode's text),
or the output cut at ``output_cap`` bytes followed by a ``[output truncated ...]`` line.
Bytes that are not UTF-8 are replaced (InterCode would answer ``Malformed command``).
``submit`` returns the last observation, computes the reward by running the gold in a fresh
sandbox with the same build time (``reward.bash_reward``), and ends the episode; success is
reward == 1. Commands run as given (``bash -c CMD``), not through InterCode's
``shlex.split('/bin/bash -c "CMD"')`` quirk (see data/intercode/README.md).
A sandbox failure (a host problem) ends the episode with reward 0 and ``info["sandbox_error"]``.

Each episode's sandbox is capped in total (``memory_bytes``, ``pids``, ``cpus``; see
``sandbox.Limits``) by a cgroup where the machine allows it; ``limits_mode="auto"`` falls back to
lower per-process limits where it does not (logged), ``"cgroup"`` refuses to run without one,
``"rlimit"`` forces the fallback. ``info["sandbox_limits"]`` of every execute / submit step says
which applied: ``cgroup2``, ``cgroup1`` or ``rlimit``.
"""
from __future__ import annotations

import re
import time

from envs.base import Env, EnvError, StepResult, Task
from envs.intercode_bash import fs
from envs.intercode_bash.reward import MODES, bash_reward
from envs.intercode_bash.sandbox import Limits, Sandbox, SandboxError, resolve_mode

NON_CODE_OBS = "Error executing query: Your last `execute` action did not contain bash code"
TIMEOUT_OBS = "Command timed out"
_EXECUTE = re.compile(r"execute\[(.*)\]", re.DOTALL)


def parse_action(action: str) -> tuple[str, str | None]:
    """("submit", None) | ("execute", cmd) | ("invalid", None)."""
    a = action.strip()
    if a == "submit":
        return "submit", None
    m = _EXECUTE.search(a)
    if m is None:
        return "invalid", None
    cmd = m.group(1)
    if cmd.startswith("submit"):
        return "submit", None
    return "execute", cmd


class InterCodeBashEnv(Env):
    name = "intercode_bash"
    default_max_steps = 10

    def __init__(self, split: str = "test", max_steps: int | None = None, timeout_s: float = 10.0,
                 output_cap: int = 64 << 10, disk_bytes: int = 64 << 20, reward_mode: str = "intercode",
                 memory_bytes: int = 1 << 30, pids: int = 64, cpus: float = 1.0, limits_mode: str = "auto"):
        super().__init__(split, max_steps)
        if split == "train":
            raise EnvError("intercode_bash has no train split: InterCode ships only the 200 NL2Bash "
                           "evaluation tasks (use split='test' or 'all')")
        if split not in ("test", "all"):
            raise EnvError(f"intercode_bash: unknown split {split!r}; known: 'test', 'all'")
        if reward_mode not in MODES:
            raise EnvError(f"intercode_bash: unknown reward_mode {reward_mode!r}; known: {MODES}")
        if not (timeout_s > 0 and output_cap > 0 and disk_bytes >= 1 << 20):
            raise EnvError(f"intercode_bash: bad limits timeout_s={timeout_s} output_cap={output_cap} "
                           f"disk_bytes={disk_bytes}")
        self.timeout_s, self.output_cap, self.disk_bytes = float(timeout_s), int(output_cap), int(disk_bytes)
        self.limits = Limits(int(memory_bytes), int(pids), float(cpus), limits_mode)
        why = self.limits.problem(self.disk_bytes)
        if why is not None:
            raise EnvError(f"intercode_bash: {why}")
        if limits_mode == "cgroup":          # required: find out now, before any episode
            try:
                resolve_mode("cgroup")
            except SandboxError as e:
                raise EnvError(f"intercode_bash: {e}") from None
        self.reward_mode = reward_mode
        self._tasks = tuple(
            Task(env=self.name, split=split, index=i, id=f"{name}#{j}", instruction=query,
                 data={"fs": name, "gold": gold})
            for i, (name, j, query, gold) in enumerate(fs.nl2bash_tasks()))
        self._sandbox: Sandbox | None = None
        self.cwd, self.last_obs, self.build_time, self._init_snap = "/", None, 0, None

    @property
    def tasks(self):
        return self._tasks

    # -- sandbox helpers --------------------------------------------------------------------
    def _machine(self, task: Task, build_time: int) -> tuple[Sandbox, dict]:
        """A fresh sandbox with the task's tree built, and its initial snapshot."""
        sb = Sandbox(self.disk_bytes, self.limits)
        try:
            sb.build(fs.entries(task.data["fs"]), build_time, fs.EXTRA_DIRS)
            return sb, sb.snapshot()
        except BaseException:
            sb.close()
            raise

    def _run(self, sb: Sandbox, cmd: str, cwd: str) -> tuple[str, dict]:
        rep = sb.run(cmd, cwd=cwd, timeout_s=self.timeout_s, cap=self.output_cap)
        if rep["timed_out"]:
            return TIMEOUT_OBS, rep
        obs = rep["output"].decode("utf-8", errors="replace")
        if rep["truncated"]:
            obs += f"\n[output truncated: more than {self.output_cap} bytes]"
        return obs, rep

    def _close_sandbox(self) -> None:
        if getattr(self, "_sandbox", None) is not None:
            self._sandbox.close()
            self._sandbox = None

    # -- protocol ---------------------------------------------------------------------------
    def _reset(self, task: Task) -> str:
        self._close_sandbox()
        self.cwd, self.last_obs = "/", None
        self.build_time = int(time.time()) - fs.BUILD_AGE_S
        self._sandbox, self._init_snap = self._machine(task, self.build_time)
        return task.instruction

    def _step(self, action: str) -> StepResult:
        kind, cmd = parse_action(action)
        if kind == "invalid":
            return NON_CODE_OBS, 0.0, False, {"invalid": True}
        try:
            if kind == "execute":
                obs, rep = self._run(self._sandbox, cmd, self.cwd)
                self.cwd, self.last_obs = rep["cwd"], obs
                return obs, 0.0, False, {"action_executed": rep["exit"] == 0 and not rep["timed_out"],
                                         "exit_code": rep["exit"], "sandbox_limits": self._sandbox.mode}
            return self._submit()
        except SandboxError as e:
            self._close_sandbox()
            obs = f"Sandbox error: {e}"
            return obs, 0.0, True, {"sandbox_error": str(e), "success": False, "score": 0.0}

    def _submit(self) -> StepResult:
        agent_now, mode = self._sandbox.snapshot(), self._sandbox.mode
        self._close_sandbox()
        gold_sb, gold_init = self._machine(self.task, self.build_time)
        try:
            gold_obs, _ = self._run(gold_sb, self.task.data["gold"], "/")
            gold_now = gold_sb.snapshot()
        finally:
            gold_sb.close()
        reward, details = bash_reward(self._init_snap, agent_now, gold_init, gold_now,
                                      self.last_obs, gold_obs, self.reward_mode)
        obs = self.last_obs if self.last_obs is not None else ""
        info = {"success": details["reward_hundredths"] == 100, "score": reward,
                "gold_observation": gold_obs, "reward_details": details, "sandbox_limits": mode}
        return obs, reward, True, info

    def close(self) -> None:
        self._close_sandbox()

    def __del__(self):
        self._close_sandbox()
