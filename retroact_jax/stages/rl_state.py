"""The RL stage's state record and its life cycle: ``init`` (config checks, models, IL data),
``start`` (learner, checkpoints with the replay buffer, metrics writer), ``save``, ``refresh``.

The learner starts as soon as its lr horizon is known: at once for a constant schedule, a given
``optimizer.total_steps`` or a run that recorded it (``schedule.json``); otherwise after the first
collection, when the step count of iteration 1 is known (``fix_schedule``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pathlib
from typing import Any

from retroact_jax import batching, benchmarks, distributed, losses, metrics as metrics_lib
from retroact_jax.stages import behaviour as behaviour_lib
from retroact_jax.stages import holdout
from retroact_jax.stages import replay as replay_lib
from retroact_jax.stages import setup
from retroact_jax.stages.setup import StageError, as_list, to_dict

STAGE = "rl"
METHODS = ("retroact", "sft_rl", "sft_ei")
log = logging.getLogger(__name__)


def seed_of(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


@dataclasses.dataclass
class RLState:
    """Everything the RL stage holds; the step functions below read and advance it."""
    c: Any
    workdir: pathlib.Path
    t: setup.Training                 # models, tokenizer; learner / checkpoints once started
    roles: list[str]                  # trained roles
    reflector: bool                   # the reflector takes part in the trials
    ei: bool                          # expert iteration (IL samples, no behaviour scoring)
    rl_rows: dict
    il_rows: dict
    collate_kw: dict
    buckets: tuple
    eos: int | None
    il_data: dict                     # {role: [TokenizedSample]} of the IL regulariser
    behaviour: dict                   # {role: behaviour.Behaviour}
    buffer: replay_lib.ReplayBuffer
    n_train: int
    backend: str
    pool: list                        # train-task indices RL may collect on (all but the validation slice)
    iteration: int = 0
    it_step: int = 0
    it_done: bool = True
    replay_ref: tuple = (None, None)  # (file name, sha256) of the buffer the last save names
    saved_refs: list = dataclasses.field(default_factory=list)
    tokenized: dict = dataclasses.field(default_factory=dict)   # entry uid -> TokenizedSample
    history: list = dataclasses.field(default_factory=list)
    pending: list = dataclasses.field(default_factory=list)     # collect logs before the start
    lag: Any = None
    resumed_from_step: int = 0
    total_steps: int | None = None    # the lr horizon fixed by this run (``fix_schedule``)

    @property
    def started(self) -> bool:
        return self.t.learner is not None


# ----------------------------------------------------------------------------------------- setup
def init(c: Any, workdir: pathlib.Path) -> RLState:
    """Check the config, load the models and IL data, open the learner when its schedule is known."""
    import envs
    if c.method not in METHODS:
        raise StageError(f"config.method={c.method!r}: choose one of {METHODS}")
    bench = benchmarks.get(c.env)
    roles = ["planner", "reflector"] if c.method == "retroact" else ["planner"]
    ei = c.method == "sft_ei"
    rl_rows = {r: int(c.train[f"rows_{r}"]) for r in roles}
    il_rows = {r: (int(c.train[f"il_rows_{r}"]) if float(c.loss.il_coef) != 0.0 and not ei else 0)
               for r in roles}
    if any(v < 1 for v in rl_rows.values()) or any(v < 0 for v in il_rows.values()):
        raise StageError(f"config.train.rows_<role> must be >= 1 and il_rows_<role> >= 0: {rl_rows} {il_rows}")
    t = setup.load(c, roles=("planner", "reflector") if c.method == "retroact" else ("planner",))
    eos = t.tokenizer.eos_id if c.train.append_eos else None
    il_data = _load_il(c, workdir, [r for r in roles if il_rows[r]], t.tokenizer, eos)
    for r in roles:
        if il_rows[r] and not il_data.get(r):
            raise StageError(f"config.train.il_rows_{r}={il_rows[r]} but config.il_data gives no {r} "
                             "samples: add IL data or set il_rows_<role> = 0 / loss.il_coef = 0")
    probe = envs.make(c.env, c.collect.split)
    try:
        n_train = len(probe.tasks)
    finally:
        probe.close()
    held = holdout.from_config(c.get("validation"))
    if held and held.env != c.env:
        raise StageError(f"config.validation.env={held.env!r} but the RL stage runs on {c.env!r}")
    if held and c.collect.split != held.train_split:
        raise StageError(f"config.collect.split={c.collect.split!r}: with a validation slice RL collects "
                         f"on {held.train_split!r} (the slice's split)")
    pool = holdout.training_indices(n_train, held.num_tasks, held.seed) if held else list(range(n_train))
    buckets = tuple(int(b) for b in as_list(c.train.buckets))
    s = RLState(c=c, workdir=workdir, t=t, roles=roles, reflector=c.method == "retroact", ei=ei,
                rl_rows=rl_rows, il_rows=il_rows, buckets=buckets, eos=eos, il_data=il_data,
                collate_kw=dict(max_len=max(buckets), observations=c.train.observations,
                                reflector_reward=c.train.reflector_reward, alpha=float(c.train.alpha)),
                behaviour=behaviour_lib.per_role(t.models, t.tokenizer, c.collect, str(c.train.attention)),
                buffer=replay_lib.ReplayBuffer(_replay_cfg(c)), n_train=n_train, pool=pool,
                backend=c.collect.env_backend or bench.env_backend)
    (workdir / "replay").mkdir(parents=True, exist_ok=True)
    if _total_steps(s) is not None:
        start(s)
    return s


def _replay_cfg(c) -> replay_lib.ReplayConfig:
    return replay_lib.ReplayConfig.from_mapping(to_dict(c.replay))


def _load_il(c, workdir: pathlib.Path, roles, tok, eos) -> dict[str, list[batching.TokenizedSample]]:
    import types
    from retroact_jax.stages import il
    if not roles:
        return {}
    shim = types.SimpleNamespace(seed=int(c.seed), data=c.il_data, validation=c.get("validation"),
                                 train=types.SimpleNamespace(progress=bool(c.train.progress)))
    by_role, _ = il.load_samples(shim, pathlib.Path(c.il_data.expert_workdir or workdir))
    return {r: [batching.tokenize_sample(x, tok, eos_id=eos) for x in by_role[r]] for r in roles}


def _total_steps(s: RLState) -> int | None:
    """The optimizer's horizon: the config's, or iterations x the step count of iteration 1
    (``schedule.json``, written once it is known), or None while unknown."""
    o = s.c.optimizer
    if o.schedule == "constant" or int(o.total_steps):
        return int(o.total_steps)
    if s.total_steps is not None:
        return s.total_steps
    f = s.workdir / "schedule.json"
    return int(json.loads(f.read_text())["total_steps"]) if f.exists() else None


def start(s: RLState) -> None:
    """Learner, checkpoints (the latest restored with its replay buffer), metrics writer."""
    c = s.c
    opt = to_dict(c.optimizer)
    opt["total_steps"] = math.ceil(_total_steps(s) / max(1, int(opt.get("accumulate_steps", 1))))
    rows = {r: s.rl_rows[r] + s.il_rows[r] for r in s.roles}
    setup.start(s.t, c, s.workdir, STAGE, train_roles=s.roles, rows=rows, optimizer=opt,
                loss=losses.LossConfig.from_mapping(to_dict(c.loss)), fresh_log_from=0)
    meta = s.t.meta
    if meta is not None:
        s.iteration, s.it_step, s.it_done = int(meta["iteration"]), int(meta["iteration_step"]), bool(meta["iteration_done"])
        s.buffer = behaviour_lib.load_buffer(s.workdir / "replay" / meta["replay_file"],
                                             meta["replay_sha256"], _replay_cfg(c))
        s.replay_ref = (meta["replay_file"], meta["replay_sha256"])
        s.saved_refs = [meta["replay_file"]]
        refresh(s)
    s.resumed_from_step = s.t.learner.step_count
    s.lag = metrics_lib.Lagged(s.t.learner.check)
    for split, m in s.pending:
        s.t.writer.write(0, m, split=split)
    s.pending.clear()


def refresh(s: RLState) -> None:
    """The learner's parameters into the models, and from them into the behaviour policies."""
    s.t.learner.sync_models()
    for b in {id(b): b for b in s.behaviour.values()}.values():
        b.refresh()


def log_metrics(s: RLState, m: dict, split: str) -> None:
    if s.started:
        s.t.writer.write(s.t.learner.step_count, m, split=split)
    else:
        s.pending.append((split, m))
    s.history.append({split: m})


def save(s: RLState, done: bool) -> None:
    s.t.ckpts.save(s.t.learner, {"stage": STAGE, "iteration": s.iteration, "iteration_step": s.it_step,
                                 "iteration_done": done, "replay_file": s.replay_ref[0],
                                 "replay_sha256": s.replay_ref[1], "config": s.t.config})
    s.saved_refs.append(s.replay_ref[0])
    if distributed.is_main():
        behaviour_lib.prune_buffers(s.workdir / "replay", set(s.saved_refs[-int(s.c.train.keep_checkpoints):]),
                                    s.iteration)


def fix_schedule(s: RLState, steps_per_iteration: int) -> None:
    """First iteration of a run whose lr horizon depends on the buffer: record it, then start."""
    total = max(1, steps_per_iteration * int(s.c.train.iterations))
    if int(s.c.optimizer.warmup_steps) >= total:
        raise StageError(f"config.rl.optimizer.warmup_steps={s.c.optimizer.warmup_steps} must be below the RL "
                         f"run's {total} steps (iterations x the first iteration's steps): lower it, or set "
                         "optimizer.total_steps, or optimizer.schedule=constant")
    setup.write_json_atomic(s.workdir / "schedule.json", {"total_steps": total})
    s.total_steps = total            # not read back: only process 0 writes the file
    log.info("RL lr schedule: %d steps (%d iterations x %d)", total, int(s.c.train.iterations),
             steps_per_iteration)
    start(s)
