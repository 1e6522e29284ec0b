"""Stage 1, imitation learning (PAPER.md §2, Alg. 1 lines 1-2): SFT of the planner and the
reflector on evaluator-filtered expert samples, resumable, with held-out loss, metrics and export.

    summary = run_il(default_config(), workdir)     # experiments/run.py calls this

Data (``config.data``), any mix of
  * ``released``: RetroAct's own IL files (``alfworld_il``, ``intercode_il``; released_data.py);
  * ``expert_envs``: the project's expert rollouts on the train splits (rl/expert.py), cached in
    ``<workdir>/expert/<env>/``;
  * ``files``: JSONL files of samples (``rl.samples.sample_to_json`` rows, e.g. another run's
    ``il_samples.jsonl``).
Samples are tokenised as the agent tokenises at inference (no BOS) with the original's EOS appended
(``append_eos``); rows longer than ``max_tokens`` are truncated (the original's cutoff) or dropped
(``long_rows``). ``eval_rows`` samples per role are held out (seeded), the rest is trained on.

Training: one ``train.Learner`` (multi-agent: two models; single-agent: one shared model) with
IL-only batches of ``rows_planner`` + ``rows_reflector`` rows per step. Each role walks its own
length-grouped epochs (``batching.length_grouped_batches`` from (seed, role, epoch)) for ``epochs``
epochs; a role whose epochs are done contributes empty rows until the other finishes, so each role
sees its data exactly ``epochs`` times (the original trained each file for its epochs).

Resume: every ``checkpoint_every`` steps and at the end, ``stages.TrainCheckpoints`` saves the
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

import ml_collections as mlc
import numpy as np

from retroact_jax import batching, losses, metrics as metrics_lib, stages, train
from retroact_jax.rl import expert as expert_lib
from retroact_jax.rl import samples as samples_lib

STAGE = "il"
log = logging.getLogger(__name__)


def default_config() -> mlc.ConfigDict:
    """IL defaults = RetroAct's (PAPER.md §4): LoRA r 8 / alpha 16 / dropout 0.05 on q, v; lr 1e-4,
    100 warmup steps, linear decay, AdamW without weight decay, clip 1.0; 5 epochs; batch 1 per role."""
    c = mlc.ConfigDict()
    c.seed = 0                        # data order, held-out split, LoRA init, expert task subset
    c.model = mlc.ConfigDict()
    c.model.planner = "embedded"      # "embedded" | HF dir | .gguf | "tiny-random" (tests)
    c.model.reflector = ""            # "" = the planner's source
    c.model.multi_agent = True        # two models (planner, reflector); False: one shared model
    c.model.param_dtype = "float32"   # float32 (CPU) | bfloat16 (accelerators)
    c.model.attention = "default"     # default (CPU) | dot_product (cuDNN on GPU) | blockwise (any; long rows)
    c.model.remat = "none"            # per-layer rematerialisation: none | dots | full
    c.model.lora = True               # LoRA adapters (False: full fine-tuning)
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.lora_dropout = 0.05
    c.model.lora_targets = "q_proj,v_proj"
    c.data = mlc.ConfigDict()
    c.data.roles = "planner,reflector"  # roles trained
    c.data.released = "alfworld_il"   # comma list of released files ("" none): alfworld_il, intercode_il
    c.data.expert_envs = ""           # comma list: hotpotqa, alfworld, intercode_sql ("" none)
    c.data.expert = "gold"            # gold (scripted) | model source: few-shot LLM expert (HotpotQA)
    c.data.expert_tasks = -1          # tasks per expert env (seeded; 0 all; -1 hotpotqa all, others 100)
    c.data.expert_trials = 0          # trials per task (0: gold 2, model 10)
    c.data.expert_reflect_fraction = 0.3  # expert tasks failing trial 1 on purpose (reflector data)
    c.data.expert_batch_size = 8
    c.data.expert_env_workers = 4
    c.data.files = ""                 # comma list of sample JSONL files
    c.data.empty_reflections = "keep"  # released InterCode rows with empty reflections: keep | skip
    c.data.append_eos = True          # train input + output + eos (the original)
    c.data.max_tokens = 2048          # the original's cutoff_len
    c.data.long_rows = "truncate"     # truncate (original) | drop rows over max_tokens
    c.data.max_rows_per_role = 0      # cap on training rows per role after shuffling (0: all)
    c.data.eval_rows = 16             # held-out rows per role (eval loss)
    c.train = mlc.ConfigDict()
    c.train.epochs = 5
    c.train.max_steps = 0             # stop after this many steps (0: the epochs decide)
    c.train.rows_planner = 1          # planner rows per step (the original: batch 1)
    c.train.rows_reflector = 1
    c.train.buckets = "256,512,1024,2048"  # padded row lengths (one compile each)
    c.train.observations = "trained"  # trained (original: whole output) | masked
    c.train.mesh = ""                 # e.g. "data=2,fsdp=-1" ("" single device)
    c.train.head_chunk = 256          # vocabulary head + log-prob in chunks of this many positions (0: whole)
    c.train.attention = "blockwise"   # train-step attention: default | dot_product | blockwise (no [T, T] scores)
    c.train.remat = "none"            # per-layer recompute in the backward: none | dots | full
    c.train.log_every = 10
    c.train.eval_every = 200          # held-out loss every N steps (and before / after); 0 off
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.max_update_ratio = 10.0   # stop when a role's update norm passes this x its param norm (0: off)
    c.train.progress = True
    c.train.peak_flops = 0.0          # per-device peak for MFU (0: known accelerators only)
    c.train.tensorboard = True
    c.loss = mlc.ConfigDict()
    c.loss.il_normalization = "tokens"  # tokens (original SFT: HF mean over label tokens) | positions
    c.optimizer = mlc.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.kwargs = mlc.ConfigDict({"weight_decay": 0.0})  # HF Trainer default
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "linear"
    c.optimizer.warmup_steps = 100
    c.optimizer.total_steps = 0       # 0: the stage's step count (/ accumulate_steps)
    c.optimizer.end_lr_ratio = 0.0
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.accumulate_steps = 1
    c.export = mlc.ConfigDict()
    c.export.enabled = True           # HF safetensors (LoRA merged) + PEFT adapters at the end
    c.export.dtype = ""               # "" keep, or bfloat16 / float32
    return c


def _memory_options(m) -> dict:
    return {"attention": str(m.attention), "remat": str(m.remat)}


def _list(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def _to_dict(c: Any) -> dict:
    return c.to_dict() if hasattr(c, "to_dict") else json.loads(json.dumps(c))


# ------------------------------------------------------------------------------------------- data
def load_samples(c: Any, workdir: pathlib.Path) -> tuple[dict[str, list[batching.Sample]], dict]:
    """All IL samples by role from the configured sources, with counts per source."""
    from retroact_jax import released_data
    by_role: dict[str, list] = {"planner": [], "reflector": []}
    counts: dict[str, Any] = {}
    for name in _list(c.data.released):
        loaded = released_data.load_retroact(name, empty_reflections=c.data.empty_reflections)
        if loaded.samples and loaded.samples[0].objective != "il":
            raise stages.StageError(f"config.data.released: {name!r} is not an imitation file")
        for s in loaded.samples:
            by_role[s.role].append(s)
        counts[name] = {r: sum(s.role == r for s in loaded.samples) for r in by_role}
    ecfg = expert_lib.ExpertConfig(
        expert=str(c.data.expert), trials=int(c.data.expert_trials),
        num_tasks=int(c.data.expert_tasks), reflect_fraction=float(c.data.expert_reflect_fraction),
        seed=int(c.seed), batch_size=int(c.data.expert_batch_size),
        env_workers=int(c.data.expert_env_workers), progress=bool(c.train.progress))
    expert_lib.check(_list(c.data.expert_envs), ecfg)
    for env in _list(c.data.expert_envs):
        pl, rf, n = expert_lib.expert_il_data(env, workdir / "expert", ecfg)
        by_role["planner"] += pl
        by_role["reflector"] += rf
        counts[f"expert:{env}"] = n
    for f in _list(c.data.files):
        rows = metrics_lib.read_jsonl(f)
        got = [samples_lib.sample_from_json(r) for r in rows]
        for s in got:
            if s.objective != "il":
                raise stages.StageError(f"{f}: a sample with objective {s.objective!r} in IL data")
            by_role[s.role].append(s)
        counts[f] = {r: sum(s.role == r for s in got) for r in by_role}
    return by_role, counts


def prepare(c: Any, samples: Mapping[str, list], tok: Any, roles: list[str]):
    """Tokenise, drop/truncate long rows, split held-out rows: {role: (train, heldout)}, counts."""
    if c.data.long_rows not in ("truncate", "drop"):
        raise stages.StageError(f"config.data.long_rows={c.data.long_rows!r}: truncate | drop")
    eos = tok.eos_id if c.data.append_eos else None
    out, counts = {}, {}
    for i, role in enumerate(roles):
        ts = [batching.tokenize_sample(s, tok, eos_id=eos) for s in samples[role]]
        n_long = sum(len(t) > c.data.max_tokens for t in ts)
        if c.data.long_rows == "drop":
            ts = [t for t in ts if len(t) <= c.data.max_tokens]
        if not ts:
            raise stages.StageError(f"no {role} samples after loading and filtering (sources: "
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
    """Each role's length-grouped epochs, positioned at its next batch (epoch, index)."""

    def __init__(self, lengths: list[int], rows: int, seed: int, role_index: int, epochs: int):
        self.lengths, self.rows, self.epochs = lengths, rows, epochs
        self.seed = int(seed) * 2 + role_index
        self.pos = (0, 0)
        self._cache: dict[int, list] = {}

    def order(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._cache:
            self._cache = {epoch: batching.length_grouped_batches(self.lengths, self.rows, self.seed, epoch)}
        return self._cache[epoch]

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / self.rows)

    def next(self) -> np.ndarray:
        """Row indices of the next batch (empty once the epochs are done)."""
        epoch, index = self.pos
        if epoch >= self.epochs:
            return np.zeros(0, np.int64)
        batch = self.order(epoch)[index]
        self.pos = (epoch, index + 1) if index + 1 < self.per_epoch else (epoch + 1, 0)
        return batch


# ------------------------------------------------------------------------------------------ stage
def _loss_cfg(c) -> losses.LossConfig:
    return losses.LossConfig.from_mapping(_to_dict(c.loss))


def _heldout_eval(learner, held, rows, buckets, pad, collate_kw) -> dict[str, float]:
    sums = {r: [0.0, 0] for r in held}
    n_batches = max(math.ceil(len(h) / rows[r]) for r, h in held.items())
    for b in range(n_batches):
        part = {r: h[b * rows[r]:(b + 1) * rows[r]] for r, h in held.items()}
        arrays, _ = train.collate_step(part, rows, buckets, pad, **collate_kw)
        m = stages.eval_loss(learner, arrays)
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
        raise stages.StageError(f"config.data.roles={c.data.roles!r}: a non-empty subset of {train.ROLES}")
    roles = [r for r in train.ROLES if r in roles]
    lcfg = None
    if c.model.lora:
        from retroact_jax.models.lora import LoRAConfig
        lcfg = LoRAConfig(rank=int(c.model.lora_rank), alpha=float(c.model.lora_alpha),
                          dropout=float(c.model.lora_dropout),
                          target_modules=tuple(_list(c.model.lora_targets)))
    models, tok, mcfg = stages.load_models(c.model.planner, c.model.reflector,
                                           multi_agent=bool(c.model.multi_agent),
                                           param_dtype=c.model.param_dtype, lora=lcfg,
                                           memory=_memory_options(c.model),
                                           seed=int(c.seed), roles=roles)
    raw, source_counts = load_samples(c, workdir)
    data, data_counts = prepare(c, raw, tok, roles)
    rows = {r: int(c.train[f"rows_{r}"]) for r in roles}
    if any(v < 1 for v in rows.values()):
        raise stages.StageError(f"config.train.rows_<role> must be >= 1 for trained roles, got {rows}")
    buckets = tuple(int(b) for b in _list(c.train.buckets))
    pad = tok.pad_id if tok.pad_id is not None else 0
    collate_kw = dict(max_len=min(int(c.data.max_tokens), max(buckets)), observations=c.train.observations)
    iters = {r: RoleBatches([len(t) for t in data[r][0]], rows[r], int(c.seed), i, int(c.train.epochs))
             for i, r in enumerate(roles)}
    total = max(it.per_epoch * it.epochs for it in iters.values())
    if c.train.max_steps > 0:
        total = min(total, int(c.train.max_steps))
    opt_cfg = _to_dict(c.optimizer)
    if not opt_cfg.get("total_steps"):
        opt_cfg["total_steps"] = max(1, math.ceil(total / max(1, int(opt_cfg.get("accumulate_steps", 1)))))
    mesh = None
    if c.train.mesh:
        from retroact_jax import sharding
        mesh = sharding.make_mesh({k: int(v) for k, v in (a.split("=") for a in _list(c.train.mesh))})
    learner = train.Learner(models, optimizer=opt_cfg, loss=_loss_cfg(c), rows=rows, mesh=mesh,
                            max_update_ratio=float(c.train.max_update_ratio), **train.memory_kwargs(c.train))

    ckpts = stages.TrainCheckpoints(workdir / "checkpoints", max_to_keep=int(c.train.keep_checkpoints))
    cfg_json = _to_dict(c)
    meta = ckpts.restore(learner)
    if meta is not None:
        if meta.get("stage") != STAGE:
            raise stages.StageError(f"{workdir / 'checkpoints'} holds a {meta.get('stage')!r} checkpoint, "
                                    f"not {STAGE!r}: use another workdir")
        if meta.get("config") != cfg_json:
            log.warning("resuming %s with a config that differs from the checkpoint's", workdir)
        for r in roles:
            pos = tuple(int(x) for x in meta.get("positions", {}).get(r, (-1, -1)))
            if not (0 <= pos[1] < iters[r].per_epoch and pos[0] >= 0):
                raise stages.StageError(
                    f"checkpoint step {learner.step_count}: {r} data position {pos} does not fit this "
                    f"run's {iters[r].per_epoch} batches per epoch (the data changed): use a new workdir")
            iters[r].pos = pos
    start = learner.step_count
    # a fresh run drops any log of an earlier attempt; a resumed one what came after its checkpoint
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=bool(c.train.tensorboard),
                                       start_step=start if start else -1)
    any_model = next(iter(models.values()))
    n_par = stages.n_params(any_model)
    peak = float(c.train.peak_flops) or metrics_lib.peak_flops_per_device()
    thr = metrics_lib.Throughput(peak, n_devices=mesh.size if mesh is not None else 1)

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
                             "config": cfg_json})

    def log_train(item):
        if item is None:
            return
        step, m = item
        if step % max(1, int(c.train.log_every)) == 0 or step == total:
            writer.write(step, m)

    if start == 0 and eval_every > 0:
        evaluate(0)
    bar = stages.progress(total, start, f"IL ({'+'.join(roles)})", bool(c.train.progress))
    thr.restart()
    try:
        for step in range(start, total):
            part = {r: [data[r][0][j] for j in iters[r].next()] for r in roles}
            arrays, st = train.collate_step(part, rows, buckets, pad, **collate_kw)
            dev = learner.step(arrays)
            ntok = int(arrays["lengths_B"].sum())
            T = arrays["tokens_BxT"].shape[1]
            flops = ntok * metrics_lib.flops_per_token(n_par, mcfg.num_layers, mcfg.num_heads,
                                                       mcfg.head_dim, T, frozen_base=lcfg is not None)
            host = {"tokens": ntok, "seq_len": T}
            for r in roles:
                host[f"rows_{r}"] = st[r]["rows"]
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
        exported = {}
        if c.export.enabled:
            exported = stages.export(learner, workdir / "export", mcfg, tok, lcfg,
                                     dtype=c.export.dtype or None)
    finally:
        bar.close()
        writer.close()
        ckpts.close()
    summary = {"stage": STAGE, "steps": total, "resumed_from": start, "roles": roles,
               "sources": source_counts, "data": data_counts, "eval": last_eval, "export": exported,
               "multi_agent": bool(c.model.multi_agent), "lora": dataclasses.asdict(lcfg) if lcfg else None}
    (workdir / "il_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def trained_params(workdir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{key path: array} of the trainable params in the latest checkpoint of an IL run."""
    ck = stages.TrainCheckpoints(pathlib.Path(workdir) / "checkpoints")
    try:
        flat, _ = ck.read()
    finally:
        ck.close()
    return {k: v for k, v in flat.items() if k.startswith("['params']")}


def main(argv=None) -> None:
    """``python -m retroact_jax.rl.il_stage WORKDIR [OVERRIDES_JSON]``: the IL stage alone, the
    defaults updated with a JSON object of flattened keys (``{"train.epochs": 2}``)."""
    import sys
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2:
        raise SystemExit("usage: python -m retroact_jax.rl.il_stage WORKDIR [OVERRIDES_JSON]")
    c = default_config()
    if len(args) == 2:
        over = json.loads(pathlib.Path(args[1]).read_text())
        unknown = [k for k in over if k.split(".")[0] not in c]
        if unknown:
            raise stages.StageError(f"unknown config keys {unknown}")
        c.update_from_flattened_dict(over)
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run_il(c, args[0]), default=str))


if __name__ == "__main__":
    main()
