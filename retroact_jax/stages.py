"""Run-loop helpers shared by the training stages (IL, RL): models from config, checkpoints of the
whole train state with the data position, held-out loss, progress bar, export.

* ``load_models``: the roles' models from one source (``hub.load_pretrained``; "tiny-random" = a
  2-layer random decoder with a byte tokenizer, for tests and smoke runs), LoRA applied by config.
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

import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retroact_jax import checkpoint as ckpt_lib
from retroact_jax import losses, train
from retroact_jax import tokenizer as tokenizer_lib

TINY_RANDOM = "tiny-random"


class StageError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ models
class ByteTokenizer(tokenizer_lib.Tokenizer):
    """UTF-8 bytes as ids 3..258 (0 pad, 1 bos, 2 eos): the tokenizer of the tiny random model."""

    def __init__(self):
        self.bos_id, self.eos_ids, self.pad_id = 1, (2,), 0
        self.chat_template = self.bos_token = self.eos_token = None
        self.source = TINY_RANDOM

    @property
    def vocab_size(self) -> int:
        return 259

    def _encode_offsets(self, text):
        ids, offsets = [], []
        for i, ch in enumerate(text):
            for b in ch.encode("utf-8"):
                ids.append(3 + b)
                offsets.append((i, i + 1))
        return ids, offsets

    def decode(self, ids, skip_special=False):
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")

    def _piece_text(self, token_id):
        return "" if not 3 <= token_id < 259 else bytes([token_id - 3]).decode("utf-8", errors="replace")


def _load_one(source: str, param_dtype: str, seed: int):
    if source == TINY_RANDOM:
        from retroact_jax.models.config import tiny
        from retroact_jax.models.decoder import Decoder
        cfg = tiny(vocab_size=ByteTokenizer().vocab_size, param_dtype=param_dtype, dtype=param_dtype)
        return Decoder(cfg, rngs=nnx.Rngs(seed)), ByteTokenizer(), cfg
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
        model, t, c = _load_one(sources[role], param_dtype, seed)
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


# ------------------------------------------------------------------------------------ eval, export
@nnx.jit
def _forward_logp(model, tokens_BxT, positions_BxT, valid_BxT):
    h, _ = model.hidden(tokens_BxT, positions_BxT, valid_BxT)   # head in chunks: no [B, T, V] logits
    return losses.head_logprobs_and_entropy(model.head, h[:, :-1], tokens_BxT)


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
                                             ("tokens_BxT", "positions_BxT", "valid_BxT")))
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
    for role, rid in (("planner", losses.ROLE_PLANNER), ("reflector", losses.ROLE_REFLECTOR)):
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
    The models are merged in place (their adapters are folded into the kernels): call at the end."""
    from retroact_jax.models import convert, lora as lora_lib, safetensors_io as sio
    learner.sync_models()
    out_dir = pathlib.Path(out_dir)
    src = pathlib.Path(str(getattr(tokenizer, "source", "")))
    tok_files = src.parent if src.is_file() else (src if src.is_dir() else ())
    written, seen = {}, set()
    for role in train.ROLES:
        if role not in learner.models or id(learner.models[role]) in seen:
            continue
        model, name = learner.models[role], learner.role_name[role]
        seen.add(id(model))
        model.eval()
        if lora_lib.lora_modules(model):
            lora_lib.save_lora(model, out_dir / name / "lora", lora_cfg or lora_lib.LoRAConfig())
            lora_lib.merge_lora(model)
        hf = sio.write_hf_dir(out_dir / name / "hf", model_cfg, convert.to_hf_state_dict(model),
                              dtype=dtype, tokenizer_files=tok_files)
        written[name] = str(hf)
    return written
