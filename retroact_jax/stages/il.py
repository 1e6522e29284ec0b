"""Stage 1, imitation learning (docs/paper.md §2, Alg. 1 lines 1-2): SFT of the planner and the
reflector on evaluator-filtered expert samples, resumable, with held-out loss, metrics and export.

    summary = run_il(default_config(), workdir)     # the pipeline (stages/pipeline.py) calls this

Data (``config.data``), any mix of
  * ``released``: RetroAct's own IL files (``alfworld_il``, ``intercode_il``; released_data.py);
  * ``expert_envs``: the project's expert rollouts on the train splits (stages/expert.py), cached in
    ``<workdir>/expert/<env>/``;
  * ``files``: JSONL files of samples (``stages.samples.sample_to_json`` rows, e.g. another run's
    ``il_samples.jsonl``).
Samples are tokenised as the agent tokenises at inference (no BOS) with the original's EOS appended
(``append_eos``); rows longer than ``max_tokens`` are truncated (the original's cutoff) or dropped
(``long_rows``). ``eval_rows`` samples per role are held out (seeded), the rest is trained on.

Training: one ``train.Learner`` (multi-agent: two models; single-agent: one shared model) with
IL-only batches of ``rows_planner`` + ``rows_reflector`` rows per step. Each role walks its own
length-grouped epochs (``batching.length_grouped_batches`` from (seed, role, epoch)) for ``epochs``
epochs; a role whose epochs are done contributes empty rows until the other finishes, so each role
sees its data exactly ``epochs`` times (the original trained each file for its epochs).

Resume: every ``checkpoint_every`` steps and at the end, ``setup.TrainCheckpoints`` saves the
train state (trainable params of every role, optimizer + schedule step, dropout RNG state) and meta
(stage name, each role's next batch position (epoch, index), config). A restarted run with the same
config restores the latest checkpoint and continues with the next batch: data order is a function of
(seed, role, epoch) only and dropout keys live in the train state, so it ends with the parameters an
uninterrupted run ends with (tests/test_resume.py kills a run with SIGKILL and checks).

Outputs in ``workdir``: ``checkpoints/``, ``metrics.jsonl`` + ``tb/`` (train every ``log_every`` steps,
eval every ``eval_every``), ``export/<planner|reflector|shared>/{lora,hf}`` and ``il_summary.json``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from typing import Any, Mapping

import numpy as np

from retroact_jax import batching, losses, metrics as metrics_lib, packing, train
from retroact_jax.stages import expert as expert_lib
from retroact_jax.stages import holdout
from retroact_jax.stages import samples as samples_lib
from retroact_jax.stages import setup
from retroact_jax.stages.configs import as_list as _list, il_config as default_config, to_dict as _to_dict
from retroact_jax.stages.setup import StageError

STAGE = "il"
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- data
def load_samples(c: Any, workdir: pathlib.Path) -> tuple[dict[str, list[batching.Sample]], dict]:
    """All IL samples by role from the configured sources, with counts per source."""
    from retroact_jax import released_data
    by_role: dict[str, list] = {"planner": [], "reflector": []}
    counts: dict[str, Any] = {}
    held = holdout.from_config(getattr(c, "validation", None))   # the validation slice: never trained on
    for name in _list(c.data.released):
        loaded = released_data.load_retroact(name, empty_reflections=c.data.empty_reflections)
        if loaded.samples and loaded.samples[0].objective != "il":
            raise StageError(f"config.data.released: {name!r} is not an imitation file")
        got, dropped = holdout.drop_released(loaded.samples, held.instructions if held else ())
        for s in got:
            by_role[s.role].append(s)
        counts[name] = {r: sum(s.role == r for s in got) for r in by_role}
        if held:
            counts[name]["dropped_validation"] = dropped
    ecfg = expert_lib.ExpertConfig(
        expert=str(c.data.expert), trials=int(c.data.expert_trials),
        num_tasks=int(c.data.expert_tasks), reflect_fraction=float(c.data.expert_reflect_fraction),
        seed=int(c.seed), batch_size=int(c.data.expert_batch_size),
        env_workers=int(c.data.expert_env_workers), progress=bool(c.train.progress))
    expert_lib.check(_list(c.data.expert_envs), ecfg)          # every env before any expert runs
    for env in _list(c.data.expert_envs):
        skip = tuple(held.indices) if held and held.env == env else ()
        pl, rf, n = expert_lib.expert_il_data(env, workdir / "expert", dataclasses.replace(ecfg, exclude=skip))
        by_role["planner"] += pl
        by_role["reflector"] += rf
        counts[f"expert:{env}"] = n
    for f in _list(c.data.files):
        rows = metrics_lib.read_jsonl(f)
        got = [samples_lib.sample_from_json(r) for r in rows]
        for s in got:
            if s.objective != "il":
                raise StageError(f"{f}: a sample with objective {s.objective!r} in IL data")
            by_role[s.role].append(s)
        counts[f] = {r: sum(s.role == r for s in got) for r in by_role}
    return by_role, counts


def prepare(c: Any, samples: Mapping[str, list], tok: Any, roles: list[str]):
    """Tokenise, drop/truncate long rows, split held-out rows: {role: (train, heldout)}, counts."""
    if c.data.long_rows not in ("truncate", "drop"):
        raise StageError(f"config.data.long_rows={c.data.long_rows!r}: truncate | drop")
    eos = tok.eos_id if c.data.append_eos else None
    out, counts = {}, {}
    for i, role in enumerate(roles):
        ts = [batching.tokenize_sample(s, tok, eos_id=eos) for s in samples[role]]
        n_long = sum(len(t) > c.data.max_tokens for t in ts)
        if c.data.long_rows == "drop":
            ts = [t for t in ts if len(t) <= c.data.max_tokens]
        if not ts:
            raise StageError(f"no {role} samples after loading and filtering (sources: "
                                    f"{c.data.released!r} {c.data.expert_envs!r} {c.data.files!r}); "
                                    f"drop {role!r} from config.data.roles or add data")
        perm = np.random.default_rng([int(c.seed), i, 3]).permutation(len(ts))
        n_eval = min(int(c.data.eval_rows), len(ts) - 1)
        held = [ts[j] for j in perm[:n_eval]]
        trainset = [ts[j] for j in perm[n_eval:]]
        if c.data.max_rows_per_role > 0:
            trainset = trainset[: int(c.data.max_rows_per_role)]
        out[role] = (trainset, held)
        counts[role] = {"train": len(trainset), "heldout": len(held), "over_max_tokens": n_long,
                        "long_rows": c.data.long_rows}
    return out, counts


class RoleBatches:
    """Each role's epochs, positioned at its next batch (epoch, index). Unpacked (``capacity`` 0):
    length-grouped batches of ``rows`` rows; packed: ``packing.pack_epoch`` rows of up to
    ``capacity`` tokens, ``rows`` packed rows per step. A step is a list of row groups (one sample
    each when unpacked); every sample is in exactly one step per epoch."""

    def __init__(self, lengths: list[int], rows: int, seed: int, role_index: int, epochs: int,
                 capacity: int = 0):
        self.lengths, self.rows, self.epochs, self.capacity = lengths, rows, epochs, int(capacity)
        self.seed = int(seed) * 2 + role_index
        self.pos = (0, 0)
        self._cache: dict[int, list] = {}

    def order(self, epoch: int) -> list[list[np.ndarray]]:
        if epoch not in self._cache:
            if self.capacity:
                groups = packing.pack_epoch(self.lengths, self.capacity, self.seed, epoch)
                self._cache = {epoch: packing.steps_of(groups, self.rows)}
            else:
                self._cache = {epoch: [[np.asarray([i]) for i in b] for b in
                                       batching.length_grouped_batches(self.lengths, self.rows, self.seed, epoch)]}
        return self._cache[epoch]

    def steps_in(self, epoch: int) -> int:
        """Steps of one epoch (packed epochs differ slightly in length)."""
        return len(self.order(epoch)) if self.capacity else math.ceil(len(self.lengths) / self.rows)

    @property
    def total(self) -> int:
        return sum(self.steps_in(e) for e in range(self.epochs))

    def next(self) -> list[np.ndarray]:
        """Row groups of the next step (empty once the epochs are done)."""
        epoch, index = self.pos
        if epoch >= self.epochs:
            return []
        step = self.order(epoch)[index]
        self.pos = (epoch, index + 1) if index + 1 < self.steps_in(epoch) else (epoch + 1, 0)
        return step


def pack_capacity(c: Any, buckets: tuple[int, ...]) -> int:
    """Tokens per packed row (0: packing off); packing needs the ``tokens`` IL normalisation."""
    if not c.train.pack:
        return 0
    if c.loss.il_normalization != "tokens":
        raise StageError(f"config.train.pack=True needs loss.il_normalization='tokens' (got "
                         f"{c.loss.il_normalization!r}: 'positions' divides by each row's positions, so a "
                         "packed row would weight its samples differently); set train.pack=False")
    cap = int(c.train.pack_len) or max(buckets)
    if not 2 <= cap <= max(buckets):
        raise StageError(f"config.train.pack_len={c.train.pack_len}: 0 (the largest bucket) or 2.."
                         f"{max(buckets)} (a packed row must fit a bucket)")
    return cap


# ------------------------------------------------------------------------------------------ stage
def _loss_cfg(c) -> losses.LossConfig:
    return losses.LossConfig.from_mapping(_to_dict(c.loss))


def _heldout_eval(learner, held, rows, buckets, pad, collate_kw) -> dict[str, float]:
    sums = {r: [0.0, 0] for r in held}
    n_batches = max(math.ceil(len(h) / rows[r]) for r, h in held.items())
    for b in range(n_batches):
        part = {r: h[b * rows[r]:(b + 1) * rows[r]] for r, h in held.items()}
        arrays, _ = train.collate_step(part, rows, buckets, pad, **collate_kw)
        m = setup.eval_loss(learner, arrays)
        for r in held:
            sums[r][0] += m[f"nll_sum_{r}"]
            sums[r][1] += m[f"nll_tokens_{r}"]
    out = {f"loss_{r}": s / max(n, 1) for r, (s, n) in sums.items()}
    out.update({f"tokens_{r}": n for r, (_, n) in sums.items()})
    return out


def run_il(config: Any, workdir: str | pathlib.Path) -> dict:
    """Run (or resume, or find finished) the IL stage in ``workdir``; returns the summary."""
    c = config
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    roles = _list(c.data.roles)
    if not roles or set(roles) - set(train.ROLES):
        raise StageError(f"config.data.roles={c.data.roles!r}: a non-empty subset of {train.ROLES}")
    roles = [r for r in train.ROLES if r in roles]
    rows = {r: int(c.train[f"rows_{r}"]) for r in roles}
    if any(v < 1 for v in rows.values()):
        raise StageError(f"config.train.rows_<role> must be >= 1 for trained roles, got {rows}")
    t = setup.load(c, roles)
    tok = t.tokenizer
    raw, source_counts = load_samples(c, workdir)
    data, data_counts = prepare(c, raw, tok, roles)
    buckets = tuple(int(b) for b in _list(c.train.buckets))
    collate_kw = dict(max_len=min(int(c.data.max_tokens), max(buckets)), observations=c.train.observations)
    cap = pack_capacity(c, buckets)
    # packed: the tokens a row takes (truncated at max_len); unpacked: the length-grouped order as ever
    lens = {r: [min(len(x), collate_kw["max_len"]) if cap else len(x) for x in data[r][0]] for r in roles}
    iters = {r: RoleBatches(lens[r], rows[r], int(c.seed), i, int(c.train.epochs), cap)
             for i, r in enumerate(roles)}
    total = max(it.total for it in iters.values())
    if c.train.max_steps > 0:
        total = min(total, int(c.train.max_steps))
    opt_cfg = _to_dict(c.optimizer)
    if not opt_cfg.get("total_steps"):
        opt_cfg["total_steps"] = max(1, math.ceil(total / max(1, int(opt_cfg.get("accumulate_steps", 1)))))
    setup.start(t, c, workdir, STAGE, train_roles=roles, rows=rows, optimizer=opt_cfg, loss=_loss_cfg(c))
    try:
        summary = _train(c, workdir, t, data, iters, rows, buckets, collate_kw, total)
    finally:
        t.close()
    summary.update({"sources": source_counts, "data": data_counts})
    return setup.write_summary(workdir, STAGE, summary)


def _train(c, workdir, t, data, iters, rows, buckets, collate_kw, total) -> dict:
    """The IL steps from the restored position to ``total``, held-out loss, export; the summary."""
    learner, ckpts, writer, mcfg, lcfg, pad = t.learner, t.ckpts, t.writer, t.model_cfg, t.lora, t.pad_id
    roles = list(iters)
    meta = t.meta
    if meta is not None:
        for r in roles:
            pos = tuple(int(x) for x in meta.get("positions", {}).get(r, (-1, -1)))
            if not (pos[0] >= 0 and 0 <= pos[1] < iters[r].steps_in(pos[0])):
                raise StageError(
                    f"checkpoint step {learner.step_count}: {r} data position {pos} does not fit this "
                    f"run's {iters[r].steps_in(max(pos[0], 0))} batches in that epoch (the data changed): "
                    "use a new workdir")
            iters[r].pos = pos
    start = learner.step_count
    n_par = setup.n_params(next(iter(t.models.values())))
    peak = float(c.train.peak_flops) or metrics_lib.peak_flops_per_device()
    thr = metrics_lib.Throughput(peak, n_devices=t.mesh.size if t.mesh is not None else 1)

    def fetch(dev, step):
        return learner.check(dev, step)

    lag = metrics_lib.Lagged(fetch)
    held = {r: data[r][1] for r in roles if data[r][1]}
    eval_every = int(c.train.eval_every)
    last_eval = None

    def evaluate(step):
        nonlocal last_eval
        if held:
            last_eval = _heldout_eval(learner, held, rows, buckets, pad, collate_kw)
            writer.write(step, last_eval, split="eval")

    def save():
        log_train(lag.flush())        # the checkpoint's own step is logged before it is saved
        ckpts.save(learner, {"stage": STAGE, "positions": {r: list(iters[r].pos) for r in roles},
                             "config": t.config})

    def log_train(item):
        if item is None:
            return
        step, m = item
        if step % max(1, int(c.train.log_every)) == 0 or step == total:
            writer.write(step, m)

    if start == 0 and eval_every > 0:
        evaluate(0)
    bar = setup.progress(total, start, f"IL ({'+'.join(roles)})", bool(c.train.progress))
    thr.restart()
    try:
        for step in range(start, total):
            part = {r: [[data[r][0][j] for j in g] for g in iters[r].next()] for r in roles}
            arrays, st = train.collate_step(part, rows, buckets, pad, **collate_kw)
            dev = learner.step(arrays)
            ntok = int(arrays["lengths_B"].sum())
            T = arrays["tokens_BxT"].shape[1]
            flops = ntok * metrics_lib.flops_per_token(n_par, mcfg.num_layers, mcfg.num_heads,
                                                       mcfg.head_dim, T, frozen_base=lcfg is not None)
            host = {"tokens": ntok, "seq_len": T}
            for r in roles:
                host[f"rows_{r}"] = st[r]["rows"]
                host[f"samples_{r}"] = st[r]["samples"]
                host[f"truncated_{r}"] = st[r]["truncated"]
                host[f"epoch_{r}"] = iters[r].pos[0]
            host.update(thr.update(ntok, flops))     # host time of this step's dispatch + the
            log_train(lag.push(step + 1, dev, host))  # previous step's fetch: the step rate
            bar.update(1)
            done = step + 1
            if eval_every > 0 and done % eval_every == 0 and done != total:
                evaluate(done)
                thr.restart()
            if c.train.checkpoint_every > 0 and done % int(c.train.checkpoint_every) == 0 and done != total:
                save()
                thr.restart()
        log_train(lag.flush())
        if start < total or ckpts.latest_step != total:
            save()
        if eval_every > 0 and start < total:
            evaluate(total)
        elif last_eval is None:          # a finished run restarted: its last held-out figures
            ev = [r for r in metrics_lib.read_jsonl(writer.path) if r.get("split") == "eval"]
            last_eval = ({k: v for k, v in ev[-1].items() if k not in ("step", "split", "time")}
                         if ev else None)
        exported = setup.finish(t, c, workdir)
    finally:
        bar.close()
    return {"stage": STAGE, "steps": total, "resumed_from": start, "roles": roles, "eval": last_eval,
            "export": exported, "multi_agent": bool(c.model.multi_agent),
            "lora": dataclasses.asdict(lcfg) if lcfg else None}


trained_params = setup.trained_params


def main(argv=None) -> None:
    """``python -m retroact_jax.stages.il WORKDIR [OVERRIDES_JSON]``: the IL stage alone, the
    defaults updated with a JSON object of flattened keys (``{"train.epochs": 2}``)."""
    import sys
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2:
        raise SystemExit("usage: python -m retroact_jax.stages.il WORKDIR [OVERRIDES_JSON]")
    c = default_config()
    if len(args) == 2:
        over = json.loads(pathlib.Path(args[1]).read_text())
        unknown = [k for k in over if k.split(".")[0] not in c]
        if unknown:
            raise StageError(f"unknown config keys {unknown}")
        c.update_from_flattened_dict(over)
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run_il(c, args[0]), default=str))


if __name__ == "__main__":
    main()
