"""A pool of worker processes that run a batch of episodes of any env in parallel.

``EnvPool(env, split, workers=N)`` starts N processes; each builds its envs with
``envs.make(env, split, **env_kwargs)`` and owns the episodes ``slot % N == worker``. A batch is
``reset_many(tasks)`` (episode ``i`` plays ``tasks[i]``; ``None`` keeps episode ``i`` going) then
``step_many(actions)`` calls, one action per episode (``None`` skips an episode, e.g. one that is
done), until the caller stops.
Every call sends each worker its share first and then collects the answers, so the episodes of
a batch run concurrently rather than one after another.

- Processes are started with the "spawn" context by default: JAX is multithreaded, and forking a
  process that has imported it is unsafe.
- An exception inside a worker (a back-end bug, or caller misuse such as stepping a finished
  episode) comes back as ``PoolError`` naming the episode, its task and the action, with the
  worker's traceback; the other episodes of that call are still answered, so the pool stays usable.
  A worker that dies makes the pool unusable (``PoolError`` names it and its exit code).
- ``close()`` (also on ``with`` exit, garbage collection and interpreter exit) asks workers to
  stop, waits, and terminates stragglers. Workers ignore SIGINT (the parent decides) and exit
  quietly when the parent goes away, so shutdown prints no ``Process Process-N:`` tracebacks.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import traceback
import weakref
from typing import Any, Sequence

from envs.base import EnvError, StepResult, Task


class PoolError(RuntimeError):
    """An episode failed inside a worker, or a worker died."""


def _worker(conn, env_name: str, split: str, env_kwargs: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import envs  # in the child: the registry and the env back end

    by_slot: dict[int, Any] = {}
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the parent went away
                break
            if msg is None:
                break
            if msg == "ping":
                conn.send("pong")
                continue
            op, items = msg
            out = []
            for slot, payload in items:
                try:
                    if op == "reset":
                        env = by_slot.get(slot)
                        if env is None:
                            env = by_slot[slot] = envs.make(env_name, split, **env_kwargs)
                        result = env.reset(payload)
                    elif slot not in by_slot:
                        raise EnvError(f"episode {slot} was never reset")
                    else:
                        result = by_slot[slot].step(payload)
                    out.append((slot, True, result))
                except Exception:  # noqa: BLE001 - sent back to the parent, which raises it
                    out.append((slot, False, traceback.format_exc()))
            try:
                conn.send(out)
            except (BrokenPipeError, OSError):
                break
    finally:
        for env in by_slot.values():
            try:
                env.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        conn.close()


def _shutdown(procs: list, conns: list, timeout: float = 10.0) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except (BrokenPipeError, OSError):
            pass
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.terminate()
            p.join(timeout)
    for conn in conns:
        conn.close()


class EnvPool:
    def __init__(self, env: str, split: str = "test", workers: int = 2,
                 env_kwargs: dict | None = None, start_method: str = "spawn"):
        if workers < 1:
            raise EnvError(f"EnvPool: workers must be >= 1, got {workers}")
        import envs
        envs.env_class(env)  # fail here, not in every worker, on an unknown env name
        self.env_name, self.split, self.workers = env, split, int(workers)
        self.env_kwargs = dict(env_kwargs or {})
        ctx = mp.get_context(start_method)
        self._conns, self._procs = [], []
        for w in range(self.workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, env, split, self.env_kwargs),
                            name=f"envpool-{env}-{w}", daemon=True)
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns)
        self._batch: list[Task | int] = []
        self._broken: str | None = None
        self._local = None

    # -- the task set (read in the parent; envs.make is cheap) -------------------------------
    @property
    def tasks(self) -> Sequence[Task]:
        if self._local is None:
            import envs
            self._local = envs.make(self.env_name, self.split, **self.env_kwargs)
        return self._local.tasks

    def ping(self) -> None:
        """Wait until every worker has started and answers (startup timing, health check)."""
        for w in range(self.workers):
            self._send(w, "ping")
        for w in range(self.workers):
            if self._recv(w, []) != "pong":
                raise PoolError(f"EnvPool({self.env_name}): worker {w} is out of step")

    @property
    def batch_size(self) -> int:
        return len(self._batch)

    # -- episodes -----------------------------------------------------------------------------
    def reset_many(self, tasks: Sequence[Task | int | None]) -> list[str | None]:
        """Start episode i on ``tasks[i]``; the initial observations. The batch size becomes
        ``len(tasks)``; ``tasks[i] is None`` leaves episode i as it is (its observation is None),
        so finished episodes can be restarted while the others go on."""
        tasks = list(tasks)
        old = self._batch
        self._batch = [t if t is not None else (old[i] if i < len(old) else None)
                       for i, t in enumerate(tasks)]
        return self._call("reset", tasks)

    def step_many(self, actions: Sequence[str | None]) -> list[StepResult | None]:
        """One action per episode of the batch; ``None`` skips that episode (its result is None)."""
        actions = list(actions)
        if len(actions) != len(self._batch):
            raise EnvError(f"EnvPool.step_many: {len(actions)} actions for a batch of "
                           f"{len(self._batch)} episodes")
        return self._call("step", actions)

    def _label(self, slot: int) -> str:
        t = self._batch[slot] if slot < len(self._batch) else None
        return f"task {t.id!r}" if isinstance(t, Task) else f"task #{t}"

    def _call(self, op: str, payloads: list) -> list:
        if self._broken:
            raise PoolError(f"EnvPool({self.env_name}) is unusable: {self._broken}")
        if not self._finalizer.alive:
            raise EnvError(f"EnvPool({self.env_name}) is closed")
        shares: list[list] = [[] for _ in range(self.workers)]
        for slot, payload in enumerate(payloads):
            if payload is not None:
                shares[slot % self.workers].append((slot, payload))
        asked = [w for w in range(self.workers) if shares[w]]
        for w in asked:
            self._send(w, (op, shares[w]))
        results: list = [None] * len(payloads)
        errors = []
        for w in asked:
            for slot, ok, value in self._recv(w, shares[w]):
                if ok:
                    results[slot] = value
                else:
                    what = "reset" if op == "reset" else f"step({_short(payloads[slot])})"
                    errors.append(f"episode {slot} ({self._label(slot)}) failed in worker {w} "
                                  f"on {what}:\n{value}")
        if errors:
            raise PoolError(f"EnvPool({self.env_name}/{self.split}): {len(errors)} episode(s) "
                            f"failed\n" + "\n".join(errors))
        return results

    def _send(self, w: int, msg) -> None:
        try:
            self._conns[w].send(msg)
        except (BrokenPipeError, OSError) as e:
            self._die(w, [s for s, _ in msg[1]] if isinstance(msg, tuple) else [], e)

    def _recv(self, w: int, share: list):
        try:
            return self._conns[w].recv()
        except (EOFError, OSError) as e:
            self._die(w, [s for s, _ in share], e)

    def _die(self, w: int, slots: list[int], err: Exception):
        p = self._procs[w]
        p.join(1.0)
        self._broken = (f"worker {w} (pid {p.pid}) died (exit code {p.exitcode}, {err!r}) while "
                        f"running episodes {slots} "
                        f"({', '.join(self._label(s) for s in slots[:5])})")
        raise PoolError(f"EnvPool({self.env_name}/{self.split}): {self._broken}")

    def close(self) -> None:
        self._finalizer()
        if self._local is not None:
            self._local.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _short(x: Any, n: int = 80) -> str:
    r = repr(x)
    return r if len(r) <= n else r[:n] + f"...({len(r)} chars)"
