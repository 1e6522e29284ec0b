"""The setup both training stages (IL, RL) share, written once: models and LoRA from the config,
the mesh, the learner, checkpoints of the whole train state with the data position (restored with
the stage checked), the metrics writer, held-out loss, progress bar, export.

* ``load_one`` / ``load_models``: models from a source (``hub.load_pretrained``; ``testing`` for
  "tiny-random", a 2-layer random decoder with a byte tokenizer, and its exports), LoRA by config.
  Multi-agent = two models (two loads of the source, independent adapters); single-agent = one
  object for both roles (the Learner then shares its parameters).
* ``TrainCheckpoints``: saves ``learner.state`` (trainable params of every role, optimizer state with
  the schedule step, LoRA-dropout RNG state, step counter) as a flat dict of arrays, and a JSON ``meta``
  (stage name, data positions, anything the stage adds) through ``checkpoint.Checkpointer`` (Orbax,
  atomic). Restoring writes the arrays back into the live learner's tree; the tree's key paths are
  stored in ``meta`` and a checkpoint of another structure is refused with the first difference.
  Typed PRNG keys are saved as their key data and re-wrapped with the live key's implementation.
* ``eval_loss``: the joint loss of a batch under the current parameters, models in eval mode (no
  dropout, no update).
* ``progress``: a tqdm bar over steps starting at the restored step (ETA from tqdm's rate).
* ``export``: each distinct model -> ``<dir>/<name>/lora`` (PEFT adapter, when LoRA) and
  ``<dir>/<name>/hf`` (HF safetensors, adapters merged, tokenizer files copied).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retroact_jax import checkpoint as ckpt_lib
from retroact_jax import batching, distributed, losses, testing, train
from retroact_jax.stages import StageError
from retroact_jax.stages.configs import as_list, to_dict

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ config
def lora_config(m: Any):
    """The ``LoRAConfig`` of a stage's ``model`` block, or None for full fine-tuning."""
    if not m.lora:
        return None
    from retroact_jax.models.lora import LoRAConfig
    return LoRAConfig(rank=int(m.lora_rank), alpha=float(m.lora_alpha), dropout=float(m.lora_dropout),
                      target_modules=tuple(as_list(m.lora_targets)))


def make_mesh(spec: str):
    """``"data=2,fsdp=-1"`` -> a device mesh; "" -> None (one device)."""
    if not spec:
        return None
    from retroact_jax import sharding
    return sharding.make_mesh({k: int(v) for k, v in (a.split("=") for a in as_list(spec))})


def write_json_atomic(path: pathlib.Path, obj) -> str:
    """Write ``obj`` as JSON through a temporary file + fsync + rename; returns its sha256.
    Several processes: process 0 writes, every process gets the sha256."""
    data = json.dumps(obj).encode()
    if not distributed.is_main():
        return hashlib.sha256(data).hexdigest()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ models
def load_one(source: str, param_dtype: str, seed: int):
    """(model, tokenizer, ModelConfig) of one source; the seed only matters for "tiny-random"."""
    if testing.is_tiny(source):
        return testing.load_tiny(source, param_dtype, seed)
    from retroact_jax.models import hub
    return hub.load_pretrained(source, param_dtype=param_dtype)


def load_models(planner: str, reflector: str = "", *, multi_agent: bool = True,
                param_dtype: str = "float32", lora: Any = None, seed: int = 0,
                memory: Mapping[str, Any] | None = None,
                roles: Sequence[str] = train.ROLES):
    """({role: model}, tokenizer, ModelConfig). ``reflector`` "" = the planner's source.
    ``lora``: a ``LoRAConfig`` or None (full fine-tuning). Adapters are initialised from ``seed``
    and the role (deterministic: a restarted run builds the same models before restoring)."""
    from retroact_jax.models import lora as lora_lib
    roles = tuple(roles)
    if not roles or set(roles) - set(train.ROLES):
        raise StageError(f"roles must be a non-empty subset of {train.ROLES}, got {roles}")
    sources = {"planner": planner, "reflector": reflector or planner}
    if not multi_agent and len(roles) == 2 and sources["planner"] != sources["reflector"]:
        raise StageError("single-agent training needs one model source for both roles; got "
                         f"planner={sources['planner']!r} reflector={sources['reflector']!r}")
    models, tok, cfg = {}, None, None
    for i, role in enumerate(roles):
        if not multi_agent and models:
            models[role] = next(iter(models.values()))
            continue
        model, t, c = load_one(sources[role], param_dtype, seed)
        if memory:   # attention form / remat (models/decoder.set_memory_options)
            from retroact_jax.models.decoder import set_memory_options
            set_memory_options(model, **memory)
        if tok is not None and t.vocab_size != tok.vocab_size:
            raise StageError(f"planner and reflector tokenizers differ ({tok.vocab_size} vs "
                             f"{t.vocab_size} tokens): one tokenizer must serve both")
        if lora is not None:
            lora_lib.apply_lora(model, lora, nnx.Rngs(params=seed * 7 + 2 * i + 1,
                                                      dropout=seed * 7 + 2 * i + 2))
        models[role] = model
        tok, cfg = tok or t, cfg or c
    return models, tok, cfg


def n_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))
               if hasattr(x, "shape"))


# ------------------------------------------------------------------------------------- checkpoints
def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flat(state: Any) -> tuple[list[str], list[Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    return [jax.tree_util.keystr(p) for p, _ in leaves], [x for _, x in leaves], treedef


class TrainCheckpoints:
    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        self.ck = ckpt_lib.Checkpointer(directory, max_to_keep=max_to_keep)

    @property
    def latest_step(self) -> int | None:
        return self.ck.latest_step

    def save(self, learner: train.Learner, meta: Mapping[str, Any]) -> int:
        learner.check_latest()        # never save a state whose step was not checked (divergence)
        names, leaves, _ = _flat(learner.state)
        arrays = {f"{i:05d}": (jax.random.key_data(x) if _is_key(x) else x) for i, x in enumerate(leaves)}
        step = learner.step_count
        self.ck.save(step, {"leaves": arrays}, {**dict(meta), "tree": names, "step": step})
        return step

    def restore(self, learner: train.Learner, step: int | None = None) -> dict | None:
        """Load the newest intact (or ``step``) checkpoint into ``learner.state``; its meta, or None
        if none. The run's writer calls this at its start: leftover temporary folders are removed."""
        self.ck.clean_leftovers()
        step = self.latest_step if step is None else step
        if step is None:
            return None
        names, leaves, treedef = _flat(learner.state)

        def abstract(x):
            x = jax.random.key_data(x) if _is_key(x) else x
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        target = {"leaves": {f"{i:05d}": abstract(x) for i, x in enumerate(leaves)}}
        try:
            got, meta = self.ck.restore(target, step)
        except ckpt_lib.CheckpointError as e:
            raise StageError(f"{e}\n(the checkpoint may come from another model, LoRA or role "
                             "configuration than this run's)") from e
        saved = list(meta.get("tree", []))
        if saved != names:
            diff = next((f"{a!r} vs {b!r}" for a, b in zip(saved, names) if a != b),
                        f"{len(saved)} vs {len(names)} leaves")
            raise StageError(f"checkpoint step {step} in {self.ck.directory} has another train-state "
                             f"structure than this run (first difference: {diff})")
        new = []
        for i, live in enumerate(leaves):
            arr = got["leaves"][f"{i:05d}"]
            new.append(jax.random.wrap_key_data(arr, impl=jax.random.key_impl(live)) if _is_key(live) else arr)
        learner.state = jax.tree_util.tree_unflatten(treedef, new)
        if learner.step_count != step:
            raise StageError(f"checkpoint {step} holds train step {learner.step_count}")
        return meta

    def read(self, step: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """({key path: numpy array}, meta) of a checkpoint, without a live learner (tools, tests)."""
        step = self.latest_step if step is None else step
        if step is None:
            raise StageError(f"no checkpoint in {self.ck.directory}")
        got, meta = self.ck.restore(None, step)
        names = meta.get("tree", [])
        return {n: np.asarray(got["leaves"][f"{i:05d}"]) for i, n in enumerate(names)}, meta

    def close(self) -> None:
        self.ck.close()


def restore(ckpts: TrainCheckpoints, learner: train.Learner, stage: str, config: Mapping) -> dict | None:
    """Restore the latest checkpoint of ``stage`` into ``learner`` (None when there is none); a
    checkpoint of another stage is refused, another config only warned about."""
    meta = ckpts.restore(learner)
    if meta is None:
        return None
    where = ckpts.ck.directory
    if meta.get("stage") != stage:
        raise StageError(f"{where} holds a {meta.get('stage')!r} checkpoint, not {stage!r}: use another workdir")
    if meta.get("config") != dict(config):
        log.warning("resuming %s with a config that differs from the checkpoint's", where)
    return meta


def read_checkpoint(workdir: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
    """({key path: array}, meta) of the latest checkpoint of a stage's workdir."""
    ck = TrainCheckpoints(pathlib.Path(workdir) / "checkpoints")
    try:
        return ck.read()
    finally:
        ck.close()


def trained_params(workdir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{key path: array} of the trainable params in the latest checkpoint of a stage's workdir."""
    return {k: v for k, v in read_checkpoint(workdir)[0].items() if k.startswith("['params']")}


# ----------------------------------------------------------------------------------- training run
@dataclasses.dataclass
class Training:
    """What a training stage holds while it runs: ``load`` fills the models, ``start`` the rest."""
    models: dict           # {role: model} of every loaded role (a shared object when single-agent)
    tokenizer: Any
    model_cfg: Any
    lora: Any              # LoRAConfig or None
    mesh: Any = None
    learner: Any = None    # train.Learner
    ckpts: Any = None      # TrainCheckpoints
    config: dict = dataclasses.field(default_factory=dict)  # the stage config, as saved in meta
    meta: dict | None = None   # the restored checkpoint's meta (None: a fresh start)
    writer: Any = None     # metrics.MetricsWriter

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.ckpts is not None:
            self.ckpts.close()


def load(c: Any, roles: Sequence[str] = train.ROLES) -> Training:
    """The models of ``roles`` from ``c.model`` (sources, multi-agent, dtype, LoRA) and ``c.seed``."""
    lcfg = lora_config(c.model)
    models, tok, mcfg = load_models(c.model.planner, c.model.reflector,
                                    multi_agent=bool(c.model.multi_agent), param_dtype=c.model.param_dtype,
                                    lora=lcfg, seed=int(c.seed), roles=roles,
                                    memory={"attention": str(c.model.attention), "remat": str(c.model.remat)})
    if tok.vocab_size < mcfg.vocab_size:
        log.warning("the tokenizer has %d ids, the model %d: sampled ids past the tokenizer decode to "
                    "nothing", tok.vocab_size, mcfg.vocab_size)
    return Training(models, tok, mcfg, lcfg)


def start(t: Training, c: Any, workdir: pathlib.Path, stage: str, *, train_roles: Sequence[str],
          rows: Mapping[str, int], optimizer: Mapping, loss: Any, fresh_log_from: int = -1) -> Training:
    """Mesh, learner over ``train_roles``, checkpoints (the latest restored, ``stage`` checked) and
    the metrics writer (lines after the restored step dropped; a fresh run drops lines after
    ``fresh_log_from``)."""
    from retroact_jax import metrics as metrics_lib
    t.mesh = make_mesh(c.train.mesh)
    t.learner = train.Learner({r: t.models[r] for r in train_roles}, optimizer=dict(optimizer),
                              loss=loss, rows=dict(rows), mesh=t.mesh,
                              max_update_ratio=float(c.train.max_update_ratio), **train.memory_kwargs(c.train))
    t.ckpts = TrainCheckpoints(workdir / "checkpoints", max_to_keep=int(c.train.keep_checkpoints))
    t.config = to_dict(c)
    try:
        t.meta = restore(t.ckpts, t.learner, stage, t.config)
    except BaseException:
        t.ckpts.close()
        raise
    step = t.learner.step_count
    t.writer = (metrics_lib.MetricsWriter(workdir, tensorboard=bool(c.train.tensorboard),
                                          start_step=step if step else fresh_log_from)
                if distributed.is_main() else metrics_lib.NullWriter())
    return t


def finish(t: Training, c: Any, workdir: pathlib.Path) -> dict[str, str]:
    """Export the trained models when the config says so; returns {name: hf dir}."""
    if not c.export.enabled:
        return {}
    return export(t.learner, workdir / "export", t.model_cfg, t.tokenizer, t.lora,
                  dtype=c.export.dtype or None)


def write_summary(workdir: pathlib.Path, stage: str, summary: Mapping) -> dict:
    if distributed.is_main():
        (workdir / f"{stage}_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return dict(summary)


# ------------------------------------------------------------------------------------ eval, export
@functools.partial(nnx.jit, static_argnums=(4,))
def _forward_logp(model, tokens_BxT, positions_BxT, valid_BxT, unroll):
    h, _ = model.hidden(tokens_BxT, positions_BxT, valid_BxT)   # head in chunks: no [B, T, V] logits
    return losses.head_logprobs_and_entropy(model.head, h[:, :-1], tokens_BxT, unroll=unroll)


def eval_loss(learner: train.Learner, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Joint-loss metrics of ``arrays`` (a ``collate_step`` batch) under the learner's current
    parameters, every model in eval mode (no dropout); nothing is updated."""
    learner.sync_models()
    logps, ents, start = [], [], 0
    for role in train.ROLES:
        B = learner.rows[role]
        if not B:
            continue
        model = learner.models[role]
        sl = slice(start, start + B)
        model.eval()
        try:
            lp, ent = _forward_logp(model, *(jnp.asarray(arrays[k][sl]) for k in
                                             ("tokens_BxT", "positions_BxT", "valid_BxT")), learner.unroll)
        finally:
            model.train()
        logps.append(lp)
        ents.append(ent)
        start += B
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    logp = jnp.concatenate(logps)
    _, m = losses.joint_loss(logp, jnp.concatenate(ents), batch, learner.loss_cfg)
    out = {k: float(v) for k, v in m.items()}
    # exact sums, so held-out loss can be aggregated over batches as NLL per trained token
    mask = np.asarray(arrays["loss_mask_BxT"], bool)
    nll = -np.asarray(logp, np.float64)
    role_B = np.asarray(arrays["role_B"])
    for role, rid in batching.ROLES.items():
        m_r = mask & (role_B == rid)[:, None]
        out[f"nll_sum_{role}"] = float(np.sum(np.where(m_r, nll, 0.0)))
        out[f"nll_tokens_{role}"] = int(m_r.sum())
    return out


def progress(total: int, initial: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                disable=not enabled, smoothing=0.1)


def export(learner: train.Learner, out_dir: str | pathlib.Path, model_cfg: Any, tokenizer: Any,
           lora_cfg: Any = None, dtype: str | None = None) -> dict[str, str]:
    """Write each distinct trained model (see the module docstring); returns {name: hf dir}.
    The models are merged in place (their adapters are folded into the kernels): call at the end.
    Several processes: every process calls it (the parameters are gathered), process 0 writes."""
    learner.sync_models()
    out_dir = pathlib.Path(out_dir)
    if not distributed.is_main():
        return {learner.role_name[r]: str(out_dir / learner.role_name[r] / "hf") for r in learner.models}
    written, seen = {}, set()
    for role in train.ROLES:
        if role not in learner.models or id(learner.models[role]) in seen:
            continue
        model, name = learner.models[role], learner.role_name[role]
        seen.add(id(model))
        written[name] = export_model(model, out_dir / name, model_cfg, tokenizer, lora_cfg, dtype)
    return written


def export_model(model: Any, out_dir: pathlib.Path, model_cfg: Any, tokenizer: Any, lora_cfg: Any = None,
                 dtype: str | None = None, save_adapter: bool = True) -> str:
    """One model's export: ``out_dir/lora`` (its adapters, PEFT layout; unless ``save_adapter`` is
    False) and ``out_dir/hf`` (the adapters merged into the kernels, in place); returns the hf dir."""
    from retroact_jax.models import convert, lora as lora_lib, safetensors_io as sio
    src = pathlib.Path(str(getattr(tokenizer, "source", "")))
    tok_files = src.parent if src.is_file() else (src if src.is_dir() else ())
    model.eval()
    if lora_lib.lora_modules(model):
        if save_adapter:
            lora_lib.save_lora(model, out_dir / "lora", lora_cfg or lora_lib.LoRAConfig())
        lora_lib.merge_lora(model)
    hf = sio.write_hf_dir(out_dir / "hf", model_cfg, convert.hf_tensors(model),   # one tensor copied at a time
                          dtype=dtype, tokenizer_files=tok_files)
    if isinstance(tokenizer, testing.ByteTokenizer):
        testing.mark_export(hf)
    return str(hf)
