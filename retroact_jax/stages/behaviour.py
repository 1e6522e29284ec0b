"""What the RL stage keeps beside its learner: the behaviour policy (sampler + scorer over the
parameters that collect the data) and the replay buffer's files.

* ``Behaviour``: one sampler and one scorer over a model in eval mode (no LoRA dropout), refreshed
  from the model after every update; the RL stage has one per distinct model (one when single-agent).
  The scorer runs the train step's attention (``train.attention``: blockwise by default, no [T, T]
  scores), so behaviour and learner log-probs come from the same computation.
* ``save_buffer`` / ``load_buffer``: ``replay/buffer-<k>.json`` written atomically with its sha256,
  which the checkpoint's meta records; a resumed run reads it back and checks the sha256.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

from flax import nnx

from retroact_jax.stages import replay as replay_lib
from retroact_jax.stages.setup import StageError, as_list, write_json_atomic

BUCKET_KEYS = ("batch_buckets", "chunk_buckets", "cache_buckets", "new_token_buckets", "score_buckets")


class Behaviour:
    """Sampler + scorer over one model in eval mode, refreshed from it (``refresh``)."""

    def __init__(self, model, tok, collect_cfg: Any, score_attention: str = ""):
        from retroact_jax import sampling, scoring
        from retroact_jax.models.decoder import set_memory_options
        self.model = model
        gd, st = self._split()
        own = model.cfg                 # the scorer computes what the train step computes: its attention
        if score_attention:
            set_memory_options(model, attention=score_attention)
        try:
            score_gd, _ = self._split()
        finally:
            model.cfg = own
        b = {k: tuple(int(x) for x in as_list(collect_cfg[k])) for k in BUCKET_KEYS if as_list(collect_cfg[k])}
        kw = {k: b[k] for k in ("batch_buckets", "chunk_buckets", "new_token_buckets") if k in b}
        if "cache_buckets" in b:
            kw["length_buckets"] = b["cache_buckets"]
        pad = tok.pad_id if tok.pad_id is not None else 0
        self.sampler = sampling.Sampler(graphdef=gd, params=st, pad_id=pad, eos_ids=tok.eos_ids, **kw)
        skw = {k: v for k, v in (("batch_buckets", b.get("batch_buckets")),
                                 ("length_buckets", b.get("score_buckets"))) if v}
        self.scorer = scoring.Scorer(graphdef=score_gd, params=st, **skw)

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


def per_role(models: dict, tok, collect_cfg: Any, score_attention: str = "") -> dict[str, Behaviour]:
    """{role: Behaviour}, one object per distinct model; ``score_attention``: the scorer's attention
    (the train step's, ``train.attention``; "" = the model's)."""
    by_id: dict[int, Behaviour] = {}
    for m in models.values():
        if id(m) not in by_id:
            by_id[id(m)] = Behaviour(m, tok, collect_cfg, score_attention)
    return {r: by_id[id(m)] for r, m in models.items()}


def save_buffer(directory: pathlib.Path, iteration: int, buffer: replay_lib.ReplayBuffer) -> tuple[str, str]:
    """(file name, sha256) of the buffer written as ``buffer-<iteration>.json``."""
    name = f"buffer-{iteration:04d}.json"
    return name, write_json_atomic(directory / name, buffer.to_json())


def load_buffer(path: pathlib.Path, sha: str, cfg: replay_lib.ReplayConfig | None) -> replay_lib.ReplayBuffer:
    if not path.exists():
        raise StageError(f"the checkpoint's replay buffer {path} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise StageError(f"{path} does not match the checkpoint's sha256 (changed or torn)")
    return replay_lib.ReplayBuffer.from_json(json.loads(data), cfg)


def prune_buffers(directory: pathlib.Path, keep: set[str], before_iteration: int) -> None:
    """Delete buffer files no kept checkpoint names, older than ``before_iteration``."""
    for p in directory.glob("buffer-*.json"):
        if p.name not in keep and int(p.stem.split("-")[1]) < before_iteration:
            p.unlink()
