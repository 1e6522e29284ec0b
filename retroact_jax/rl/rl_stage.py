"""Stage 2, the off-policy joint policy gradient with IL regularisation (PAPER.md §3, Algorithm 1):

    for k in 1..iterations:
        collect   roll out the current planner / reflector (temperature 1) on train tasks
                  (rl/collect.py), score the behaviour log-probs, add to the replay buffer (rl/replay.py)
        update    epochs over the buffer: each step = RL rows of both roles + lambda * IL rows drawn
                  from the IL data, one jitted joint step (train.Learner)
        evaluate  optional hook: greedy trials on the test split, logged as eval metrics

    summary = run_rl(default_config(), workdir)      # experiments/run.py calls this

Methods (``config.method``): ``retroact`` (both roles trained), ``sft_rl`` (the planner only; the
reflector, if any, is used frozen for the rollouts), ``sft_ei`` (expert iteration: the successes of
each collection become imitation samples, trained with the IL loss; PAPER.md §3.1 baselines).
``model.multi_agent = False`` is the single-agent setting (one model, shared parameters). Start from
the SFT models by pointing ``model.planner`` / ``model.reflector`` at the IL stage's exported HF
directories (``<il_workdir>/export/<name>/hf``): fresh LoRA adapters go on top, as the original.

Defaults = the original code (PAPER.md §3.2, §4): detached clipped token ratio, eps 0.3, lambda 1,
mean over all positions, observation tokens trained, reflector reward ``(R_cur - R_last)(R_last+a)/a``
with a = 1, zero-reward planner trials dropped, sampling temperature 1, IL pairs drawn with
replacement from a seed. Everything else by config (see ``default_config``).

Resume: a checkpoint (``stages.TrainCheckpoints``: trainable params of every role, optimizer state
with the schedule step, dropout RNG state) is saved every ``checkpoint_every`` steps and at the end
of each iteration; its meta holds the RL iteration, the step within it, and the replay buffer file
(``replay/buffer-<k>.json``, sha256-checked). Task choice, rollout seeds, buffer batches and IL
draws are pure functions of (seed, iteration, step), and rollouts resume from their trajectory
files, so a run killed at any point continues with the parameters and buffer an uninterrupted run has.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import types
from typing import Any, Mapping

import ml_collections as mlc
import numpy as np
from flax import nnx

from retroact_jax import batching, losses, metrics as metrics_lib, stages, train
from retroact_jax.rl import collect as collect_lib
from retroact_jax.rl import replay as replay_lib

STAGE = "rl"
METHODS = ("retroact", "sft_rl", "sft_ei")
log = logging.getLogger(__name__)


def default_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0                        # task stream, rollout seeds, buffer order, IL draws, LoRA init
    c.method = "retroact"             # retroact (both roles) | sft_rl (planner only) | sft_ei (expert iteration)
    c.env = "hotpotqa"                # hotpotqa | alfworld | intercode_sql | intercode_bash
    c.model = mlc.ConfigDict()
    c.model.planner = "embedded"      # the SFT planner: an HF dir (IL export), .gguf, "embedded", "tiny-random"
    c.model.reflector = ""            # "" = the planner's source
    c.model.multi_agent = True        # False: single agent, one model with shared parameters
    c.model.param_dtype = "float32"
    c.model.attention = "default"     # default (CPU) | dot_product (cuDNN on GPU) | blockwise (any; long rows)
    c.model.remat = "none"            # per-layer rematerialisation: none | dots | full
    c.model.lora = True               # fresh LoRA on the SFT weights (the original); False: full fine-tune
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.lora_dropout = 0.05
    c.model.lora_targets = "q_proj,v_proj"
    c.collect = mlc.ConfigDict()
    c.collect.split = "train"
    c.collect.tasks_per_iteration = 0  # tasks rolled out per iteration (0: the whole train split)
    c.collect.trials = 10             # K trials per task (reflections between them)
    c.collect.temperature = 1.0       # exploration temperature (PAPER.md §4)
    c.collect.reflector_temperature = 1.0
    c.collect.top_p = 1.0
    c.collect.min_new_tokens = 1      # no stop/EOS in a completion's first n tokens (vLLM min_tokens)
    c.collect.batch_size = 8          # tasks in flight
    c.collect.env_workers = 4
    c.collect.env_backend = ""        # "" = the env's default (ALFWorld processes, else threads)
    c.collect.max_steps = 0           # 0: the env's default
    c.collect.planner_max_tokens = 0  # 0: the protocol's default
    c.collect.reflector_max_tokens = 0
    c.collect.score_rows = 8          # rows per behaviour-scoring call
    c.collect.batch_buckets = ""      # sampler / scorer shape buckets, comma lists ("" = powers of two);
    c.collect.chunk_buckets = ""      #   fewer buckets = fewer compilations, more padding
    c.collect.cache_buckets = ""      #   (KV-cache lengths)
    c.collect.new_token_buckets = ""
    c.collect.score_buckets = ""      #   (behaviour scoring: sequence lengths)
    c.replay = mlc.ConfigDict()
    c.replay.capacity = 0             # entries per role (0: unbounded), FIFO beyond it
    c.replay.max_age = 0              # iterations an entry stays (1: latest collection only; 0: forever)
    c.replay.drop_zero_reward = True  # the original filter_json
    c.replay.max_chars = 5000         # the original filter_null (0: off)
    c.replay.max_tokens = 2048        # drop rows longer than this (0: off; else rows are cut at the bucket)
    c.il_data = mlc.ConfigDict()      # the IL regulariser's data (rl/il_stage.load_samples sources)
    c.il_data.released = ""           # alfworld_il | intercode_il (comma list)
    c.il_data.expert_envs = ""        # expert rollouts (cached in <workdir>/expert)
    c.il_data.expert = "gold"
    c.il_data.expert_tasks = -1
    c.il_data.expert_trials = 0
    c.il_data.expert_reflect_fraction = 0.3
    c.il_data.expert_batch_size = 8
    c.il_data.expert_env_workers = 4
    c.il_data.files = ""              # sample JSONL files, e.g. <il_workdir>/expert/<env>/il_samples.jsonl
    c.il_data.empty_reflections = "keep"
    c.train = mlc.ConfigDict()
    c.train.iterations = 3            # RL iterations (collect + update); not stated by the paper
    c.train.epochs = 1                # passes over the buffer per iteration (the original: 3 over one round)
    c.train.rows_planner = 1          # RL rows per step (the original: batch 1)
    c.train.rows_reflector = 1
    c.train.il_rows_planner = 1       # IL regulariser rows per step with planner RL rows (1:1 as the original)
    c.train.il_rows_reflector = 1
    c.train.append_eos = True         # train input + output + eos (the original)
    c.train.buckets = "256,512,1024,2048"
    c.train.observations = "trained"  # trained (original) | masked
    c.train.reflector_reward = "delta_scaled"  # delta_scaled (original code) | delta (paper Eq. 6)
    c.train.alpha = 1.0               # reflector reward coefficient
    c.train.mesh = ""
    c.train.head_chunk = 256          # vocabulary head + log-prob in chunks of this many positions (0: whole)
    c.train.attention = "blockwise"   # train-step attention: default | dot_product | blockwise (no [T, T] scores)
    c.train.remat = "none"            # per-layer recompute in the backward: none | dots | full
    c.train.log_every = 10
    c.train.checkpoint_every = 200    # also at the end of every iteration
    c.train.keep_checkpoints = 2
    c.train.max_update_ratio = 10.0   # stop when a role's update norm passes this x its param norm (0: off)
    c.train.progress = True
    c.train.tensorboard = True
    c.train.peak_flops = 0.0
    c.loss = mlc.ConfigDict()
    c.loss.rl_variant = "detached_clip"  # detached_clip (original) | paper_clip | ppo_clip | rlmec_min
    c.loss.epsilon = 0.3
    c.loss.rl_normalization = "positions"
    c.loss.il_normalization = "positions"
    c.loss.il_coef = 1.0              # lambda
    c.loss.role_pooling = "per_role"
    c.loss.behaviour_dtype = "float32"  # float32 (exact) | bfloat16 (the original collator's rounding)
    c.optimizer = mlc.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.kwargs = mlc.ConfigDict({"weight_decay": 0.0})
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "constant"  # iterated RL has no known horizon; "linear" needs total_steps
    c.optimizer.warmup_steps = 100
    c.optimizer.total_steps = 0
    c.optimizer.end_lr_ratio = 0.0
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.accumulate_steps = 1
    c.eval = mlc.ConfigDict()
    c.eval.every = 0                  # evaluate after every n-th iteration (0: off); agent limits = collect's
    c.eval.split = "test"
    c.eval.num_tasks = 100
    c.eval.trials = 10
    c.eval.batch_size = 8
    c.eval.temperature = 0.0
    c.export = mlc.ConfigDict()
    c.export.enabled = True
    c.export.dtype = ""
    return c


def _memory_options(m) -> dict:
    return {"attention": str(m.attention), "remat": str(m.remat)}


def _list(s) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def _to_dict(c: Any) -> dict:
    return c.to_dict() if hasattr(c, "to_dict") else json.loads(json.dumps(c))


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------------- components
class _Behaviour:
    """Sampler + scorer over one model in eval mode (no LoRA dropout), refreshed from the learner."""

    def __init__(self, model, tok, cc):
        from retroact_jax import sampling, scoring
        self.model = model
        gd, st = self._split()
        pad = tok.pad_id if tok.pad_id is not None else 0
        b = {k: tuple(int(x) for x in _list(cc[k])) for k in
             ("batch_buckets", "chunk_buckets", "cache_buckets", "new_token_buckets", "score_buckets")
             if _list(cc[k])}
        kw = {k: b[k] for k in ("batch_buckets", "chunk_buckets", "new_token_buckets") if k in b}
        if "cache_buckets" in b:
            kw["length_buckets"] = b["cache_buckets"]
        self.sampler = sampling.Sampler(graphdef=gd, params=st, pad_id=pad, eos_ids=tok.eos_ids, **kw)
        skw = {k: v for k, v in (("batch_buckets", b.get("batch_buckets")),
                                 ("length_buckets", b.get("score_buckets"))) if v}
        self.scorer = scoring.Scorer(graphdef=gd, params=st, **skw)

    def _split(self):
        self.model.eval()
        try:
            return nnx.split(self.model)
        finally:
            self.model.train()

    def refresh(self) -> None:
        _, st = self._split()
        self.sampler.set_params(st)
        self.scorer.set_params(st)


def _load_il(c, workdir: pathlib.Path, roles, tok, eos) -> dict[str, list[batching.TokenizedSample]]:
    from retroact_jax.rl import il_stage
    d = c.il_data
    shim = types.SimpleNamespace(seed=int(c.seed), data=d, train=types.SimpleNamespace(progress=bool(c.train.progress)))
    by_role, _ = il_stage.load_samples(shim, workdir)
    return {r: [batching.tokenize_sample(s, tok, eos_id=eos) for s in by_role[r]] for r in roles}


def _write_json_atomic(path: pathlib.Path, obj) -> str:
    data = json.dumps(obj).encode()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def _read_buffer(path: pathlib.Path, sha: str, cfg: replay_lib.ReplayConfig) -> replay_lib.ReplayBuffer:
    if not path.exists():
        raise stages.StageError(f"the checkpoint's replay buffer {path} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise stages.StageError(f"{path} does not match the checkpoint's sha256 (changed or torn)")
    return replay_lib.ReplayBuffer.from_json(json.loads(data), cfg)


# ----------------------------------------------------------------------------------------- stage
def run_rl(config: Any, workdir: str | pathlib.Path) -> dict:
    """Run (or resume, or find finished) the RL stage in ``workdir``; returns the summary."""
    import envs
    from retroact_jax.agent import loop
    from retroact_jax.agent.lm_policy import LMPolicy
    from retroact_jax.rl import expert as expert_lib

    c = config
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if c.method not in METHODS:
        raise stages.StageError(f"config.method={c.method!r}: choose one of {METHODS}")
    if c.env not in envs.REGISTRY:
        raise stages.StageError(f"config.env={c.env!r}: known envs are {sorted(envs.REGISTRY)}")
    trained = ["planner"] if c.method == "sft_rl" else ["planner", "reflector"]
    ei = c.method == "sft_ei"
    lcfg = None
    if c.model.lora:
        from retroact_jax.models.lora import LoRAConfig
        lcfg = LoRAConfig(rank=int(c.model.lora_rank), alpha=float(c.model.lora_alpha),
                          dropout=float(c.model.lora_dropout), target_modules=tuple(_list(c.model.lora_targets)))
    models, tok, mcfg = stages.load_models(c.model.planner, c.model.reflector,
                                           multi_agent=bool(c.model.multi_agent),
                                           param_dtype=c.model.param_dtype, lora=lcfg,
                                           memory=_memory_options(c.model), seed=int(c.seed))
    if tok.vocab_size < mcfg.vocab_size:
        log.warning("the tokenizer has %d ids, the model %d: sampled ids past the tokenizer decode to "
                    "nothing", tok.vocab_size, mcfg.vocab_size)
    eos = tok.eos_id if c.train.append_eos else None
    rl_rows = {r: int(c.train[f"rows_{r}"]) for r in trained}
    il_rows = {r: (int(c.train[f"il_rows_{r}"]) if float(c.loss.il_coef) != 0.0 and not ei else 0)
               for r in trained}
    if any(v < 1 for v in rl_rows.values()) or any(v < 0 for v in il_rows.values()):
        raise stages.StageError(f"config.train.rows_<role> must be >= 1 and il_rows_<role> >= 0: "
                                f"{rl_rows} {il_rows}")
    rows = {r: rl_rows[r] + il_rows[r] for r in trained}
    buckets = tuple(int(b) for b in _list(c.train.buckets))
    pad = tok.pad_id if tok.pad_id is not None else 0
    collate_kw = dict(max_len=max(buckets), observations=c.train.observations,
                      reflector_reward=c.train.reflector_reward, alpha=float(c.train.alpha))
    loss_cfg = losses.LossConfig.from_mapping(_to_dict(c.loss))
    rcfg = replay_lib.ReplayConfig.from_mapping(_to_dict(c.replay))
    il_data = _load_il(c, workdir, [r for r in trained if il_rows[r]], tok, eos) if any(il_rows.values()) else {}
    for r in trained:
        if il_rows[r] and not il_data.get(r):
            raise stages.StageError(f"config.train.il_rows_{r}={il_rows[r]} but config.il_data gives no {r} "
                                    "samples: add IL data or set il_rows_<role> = 0 / loss.il_coef = 0")
    opt_cfg = _to_dict(c.optimizer)
    if opt_cfg.get("schedule") != "constant" and not opt_cfg.get("total_steps"):
        raise stages.StageError("config.optimizer.schedule linear/cosine needs optimizer.total_steps "
                                "(the RL stage's step count depends on the buffer)")
    mesh = None
    if c.train.mesh:
        from retroact_jax import sharding
        mesh = sharding.make_mesh({k: int(v) for k, v in (a.split("=") for a in _list(c.train.mesh))})
    learner = train.Learner({r: models[r] for r in trained}, optimizer=opt_cfg, loss=loss_cfg, rows=rows, mesh=mesh,
                            max_update_ratio=float(c.train.max_update_ratio), **train.memory_kwargs(c.train))
    behaviour: dict[int, _Behaviour] = {}
    for r in ("planner", "reflector"):
        if id(models[r]) not in behaviour:
            behaviour[id(models[r])] = _Behaviour(models[r], tok, c.collect)
    beh = {r: behaviour[id(models[r])] for r in ("planner", "reflector")}

    probe = envs.make(c.env, c.collect.split)
    try:
        n_train = len(probe.tasks)
    finally:
        probe.close()
    backend = c.collect.env_backend or expert_lib.ENV_BACKENDS.get(c.env, "threads")

    ckpts = stages.TrainCheckpoints(workdir / "checkpoints", max_to_keep=int(c.train.keep_checkpoints))
    (workdir / "replay").mkdir(exist_ok=True)
    cfg_json = _to_dict(c)
    meta = ckpts.restore(learner)
    buffer = replay_lib.ReplayBuffer(rcfg)
    iteration, it_step, it_done = 0, 0, True
    if meta is not None:
        if meta.get("stage") != STAGE:
            raise stages.StageError(f"{workdir / 'checkpoints'} holds a {meta.get('stage')!r} checkpoint, "
                                    f"not {STAGE!r}: use another workdir")
        if meta.get("config") != cfg_json:
            log.warning("resuming %s with a config that differs from the checkpoint's", workdir)
        iteration, it_step, it_done = int(meta["iteration"]), int(meta["iteration_step"]), bool(meta["iteration_done"])
        buffer = _read_buffer(workdir / "replay" / meta["replay_file"], meta["replay_sha256"], rcfg)
    replay_ref = (meta or {}).get("replay_file"), (meta or {}).get("replay_sha256")
    learner.sync_models()
    for b in behaviour.values():
        b.refresh()
    start = learner.step_count
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=bool(c.train.tensorboard), start_step=start)
    lag = metrics_lib.Lagged(learner.check)
    tok_cache: dict[int, batching.TokenizedSample] = {}
    history: list[dict] = []
    roles_idx = {r: i for i, r in enumerate(train.ROLES)}

    saved_refs = [replay_ref[0]]

    def save(done: bool):
        ckpts.save(learner, {"stage": STAGE, "iteration": iteration, "iteration_step": it_step,
                             "iteration_done": done, "replay_file": replay_ref[0],
                             "replay_sha256": replay_ref[1], "config": cfg_json})
        saved_refs.append(replay_ref[0])
        keep = set(saved_refs[-int(c.train.keep_checkpoints):])
        for p in (workdir / "replay").glob("buffer-*.json"):   # files no kept checkpoint names
            if p.name not in keep and int(p.stem.split("-")[1]) < iteration:
                p.unlink()

    def policies(temperature_cfg: bool):
        kw = dict(top_p=float(c.collect.top_p) if temperature_cfg else 1.0, min_new_tokens=int(c.collect.min_new_tokens))
        pl, rf = LMPolicy(beh["planner"].sampler, tok, **kw), LMPolicy(beh["reflector"].sampler, tok, **kw)
        return pl, rf

    # step / token limits of the agent (collection and the eval hook alike)
    limits = dict(max_steps=int(c.collect.max_steps) or None,
                  planner_max_tokens=int(c.collect.planner_max_tokens) or None,
                  reflector_max_tokens=int(c.collect.reflector_max_tokens) or None)

    def collect(k: int) -> None:
        nonlocal replay_ref
        idx = collect_lib.task_indices(n_train, int(c.collect.tasks_per_iteration), int(c.seed), k)
        acfg = loop.AgentConfig(trials=int(c.collect.trials), batch_size=int(c.collect.batch_size),
                                temperature=float(c.collect.temperature),
                                reflector_temperature=float(c.collect.reflector_temperature),
                                seed=_seed(int(c.seed), k, "collect"), env_workers=int(c.collect.env_workers),
                                **limits)
        pl, rf = policies(True)
        recs, summ = collect_lib.rollout(c.env, c.collect.split, idx, pl, rf, acfg,
                                         workdir / "rollouts" / f"iter-{k:04d}", env_backend=backend,
                                         show_progress=bool(c.train.progress))
        samples = collect_lib.ei_samples(recs, trained) if ei else collect_lib.rl_samples(recs, trained)
        tss = collect_lib.tokenize(samples, tok, eos)
        from retroact_jax.agent import protocols
        stop = tuple(protocols.protocol_for(c.env).reflector_stop)
        kept, rejected = replay_lib.admit(samples, rcfg, [len(t) for t in tss], stop=stop)
        samples = [samples[i] for i in kept]
        health: dict[str, float] = {}
        if ei:
            n_tok = [len(tss[i]) for i in kept]
        else:
            samples, n_tok, health = collect_lib.score_behaviour(
                samples, {r: beh[r].scorer for r in trained}, tok, eos_id=eos, records=recs,
                batch_rows=int(c.collect.score_rows))
            if not (float(c.collect.temperature) == 1.0 and float(c.collect.top_p) == 1.0):
                health = {k2: v for k2, v in health.items() if not k2.startswith("behaviour_gap")}
        buffer.add(samples, k, n_tok)
        name = f"buffer-{k:04d}.json"
        replay_ref = (name, _write_json_atomic(workdir / "replay" / name, buffer.to_json()))
        m = {"iteration": k, "tasks": len(idx), "trials": len(recs), "added": len(samples),
             **{f"rejected_{a}": b for a, b in rejected.items()}, **health, **buffer.stats()}
        prim = summ["primary"]
        for key in ("IR", "FR", "AR"):
            m[f"train_{prim}_{key}"] = summ["metrics"][prim][key]
        writer.write(learner.step_count, m, split="collect")
        history.append({"collect": m})

    def plan(k: int) -> list[dict[str, list]]:
        """Each step's buffer entries per role for iteration k (deterministic)."""
        per_role = {}
        for r in trained:
            seq = []
            for e in range(int(c.train.epochs)):
                seq += buffer.epoch_batches(r, rl_rows[r], _seed(int(c.seed), k, "epochs"), e)
            per_role[r] = seq
        n = max([len(v) for v in per_role.values()] + [0])
        return [{r: (per_role[r][j] if j < len(per_role[r]) else []) for r in trained} for j in range(n)]

    def tokenized(e: replay_lib.Entry) -> batching.TokenizedSample:
        if e.uid not in tok_cache:
            tok_cache[e.uid] = batching.tokenize_sample(e.sample, tok, eos_id=eos)
        return tok_cache[e.uid]

    def evaluate(k: int) -> None:
        out = workdir / "eval" / f"iter-{k:04d}"
        if (out / "summary.json").exists() or not int(c.eval.every) or k % int(c.eval.every):
            return
        from retroact_jax.agent import rollout as rollout_lib
        probe = envs.make(c.env, c.eval.split)
        try:
            n = min(len(probe.tasks), int(c.eval.num_tasks))
        finally:
            probe.close()
        acfg = loop.AgentConfig(trials=int(c.eval.trials), batch_size=int(c.eval.batch_size),
                                temperature=float(c.eval.temperature),
                                reflector_temperature=float(c.eval.temperature), seed=int(c.seed),
                                env_workers=int(c.collect.env_workers), **limits)
        pl, rf = policies(False)
        summ = rollout_lib.evaluate(c.env, c.eval.split, list(range(n)), pl, rf, acfg, out,
                                    env_backend=backend, show_progress=bool(c.train.progress))
        _write_json_atomic(out / "summary.json", summ)
        m = {"iteration": k}
        for metric, v in summ["metrics"].items():
            for key in ("IR", "FR", "AR"):
                m[f"{metric}_{key}"] = v[key]
        writer.write(learner.step_count, m, split="eval")
        history.append({"eval": m})

    def log_train(item):
        if item is not None and (item[0] % max(1, int(c.train.log_every)) == 0 or item[1].get("last")):
            item[1].pop("last", None)
            writer.write(item[0], item[1])

    try:
        if meta is not None and it_done:
            evaluate(iteration)
        while not (it_done and iteration >= int(c.train.iterations)):
            if it_done:
                iteration, it_step, it_done = iteration + 1, 0, False
                collect(iteration)
                live = {e.uid for es in buffer.entries.values() for e in es}
                tok_cache = {u: t for u, t in tok_cache.items() if u in live}
            steps = plan(iteration)
            bar = stages.progress(len(steps), it_step, f"RL iteration {iteration}", bool(c.train.progress))
            for j in range(it_step, len(steps)):
                part = {r: [tokenized(e) for e in steps[j][r]] for r in trained}
                gstep = learner.step_count
                for r in trained:
                    if part[r] and il_rows[r]:
                        rng = np.random.default_rng([int(c.seed), gstep, roles_idx[r], 17])
                        part[r] += [il_data[r][int(i)] for i in rng.choice(len(il_data[r]), il_rows[r])]
                arrays, st = train.collate_step(part, rows, buckets, pad, **collate_kw)
                dev = learner.step(arrays)
                host = {"iteration": iteration, "tokens": int(arrays["lengths_B"].sum()),
                        "seq_len": int(arrays["tokens_BxT"].shape[1]),
                        **{f"rows_{r}": st[r]["rows"] for r in trained},
                        **{f"truncated_{r}": st[r]["truncated"] for r in trained},
                        "last": j + 1 == len(steps)}
                item = lag.push(learner.step_count, dev, host)
                if item is not None and not ei and item[1].get("rl_tokens_missing_behaviour", 0):
                    raise stages.StageError(f"step {item[0]}: RL tokens without behaviour log-probs")
                log_train(item)
                bar.update(1)
                it_step = j + 1
                if (int(c.train.checkpoint_every) > 0 and learner.step_count % int(c.train.checkpoint_every) == 0
                        and it_step < len(steps)):
                    save(False)
            bar.close()
            log_train(lag.flush())
            it_done = True
            if steps:
                save(True)
            else:
                log.warning("RL iteration %d: the replay buffer has no rows to train on", iteration)
            learner.sync_models()
            for b in behaviour.values():
                b.refresh()
            evaluate(iteration)
        exported = {}
        if c.export.enabled:
            exported = stages.export(learner, workdir / "export", mcfg, tok, lcfg, dtype=c.export.dtype or None)
    finally:
        writer.close()
        ckpts.close()
    summary = {"stage": STAGE, "method": c.method, "iterations": iteration, "steps": learner.step_count,
               "resumed_from_step": start, "roles": trained, "multi_agent": bool(c.model.multi_agent),
               "replay": buffer.stats(), "history": history, "export": exported,
               "lora": dataclasses.asdict(lcfg) if lcfg else None}
    (workdir / "rl_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def trained_params(workdir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{key path: array} of the trainable params in the latest checkpoint of an RL run."""
    ck = stages.TrainCheckpoints(pathlib.Path(workdir) / "checkpoints")
    try:
        flat, _ = ck.read()
    finally:
        ck.close()
    return {k: v for k, v in flat.items() if k.startswith("['params']")}


def read_buffer(workdir: str | pathlib.Path) -> replay_lib.ReplayBuffer:
    """The replay buffer the latest checkpoint of an RL run refers to."""
    ck = stages.TrainCheckpoints(pathlib.Path(workdir) / "checkpoints")
    try:
        _, meta = ck.read()
    finally:
        ck.close()
    return _read_buffer(pathlib.Path(workdir) / "replay" / meta["replay_file"], meta["replay_sha256"], None)


__all__ = ("default_config", "run_rl", "trained_params", "read_buffer", "METHODS")
