"""The RL replay buffer: behaviour-scored samples of past collections, with their policy version.

docs/paper.md §3.1 trains on "replay buffers of historical trajectories" (D^RL_planner, D^RL_reflector);
the original code trained on one collection round (§3.3). An entry is one ``batching.Sample`` with
objective ``"rl"`` (planner: ``reward`` = R_tau, the trial's environment reward, Eq. 5; reflector:
``last_reward`` / ``current_reward`` = the rewards of the trials before / after the reflection, from
which the loss's reward variant is computed at collate time, ``delta`` or ``delta_scaled``), its
behaviour log-probs (one per non-prompt token, scored by the parameters that collected it), the
RL iteration that collected it (its policy version) and its token count.

Expert iteration keeps imitation samples (objective ``"il"``, successes only) in the same buffer:
they need no behaviour log-probs and only the empty / over-long filters apply to them.

Admission filters (``admit``), as the original data prep (docs/paper.md §3.2), each counted by reason:
  * ``drop_zero_reward`` (default True, ``filter_json``): planner rows with reward 0 are dropped;
    reflector rows whose last and current rewards are both 0 are dropped;
  * reflector rows with ``last_reward == current_reward`` (``filter_null``; their Δ is 0 anyway);
  * rows with an empty output (no non-prompt text, or a reflection that is only its stop string);
  * over-long rows: more than ``max_chars`` characters (``filter_null``'s 5000) or more than
    ``max_tokens`` tokens (dropped rather than truncated, so every trained token has its ratio).
Retention: an entry collected at iteration i is evicted once ``iteration - i >= max_age`` (0: never);
beyond ``capacity`` entries per role the oldest go first (FIFO by insertion order; 0: unbounded).

Sampling is deterministic: ``epoch_batches(role, rows, seed, epoch)`` gives an epoch of
length-grouped batches (``batching.length_grouped_batches``, the original's ``group_by_length``)
from ``(seed, role, epoch)`` and the buffer's content. ``to_json`` / ``from_json`` round-trip the
whole buffer exactly (floats as JSON numbers, Python's repr round-trips float32 values), so a
resumed run trains on the same buffer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from retroact_jax import batching, losses
from retroact_jax.stages import samples as samples_lib

ROLES = losses.ROLES
FORMAT = 1


class ReplayError(ValueError):
    """A bad buffer config, a sample the buffer cannot hold, or a buffer file that does not parse."""


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    capacity: int = 0               # entries per role; beyond it the oldest are evicted (0: unbounded)
    max_age: int = 0                # iterations an entry stays (1: only the latest collection; 0: forever)
    drop_zero_reward: bool = True   # the original filter_json
    max_chars: int = 5000           # the original filter_null: len(input) + len(output) (0: off)
    max_tokens: int = 0             # rows over this many tokens are dropped (0: off)

    def __post_init__(self):
        for k in ("capacity", "max_age", "max_chars", "max_tokens"):
            if int(getattr(self, k)) < 0:
                raise ReplayError(f"replay.{k} must be >= 0, got {getattr(self, k)}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "ReplayConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(m) - set(names))
        if unknown:
            raise ReplayError(f"unknown replay config keys {unknown}; valid: {', '.join(names)}")
        return cls(**dict(m))


@dataclasses.dataclass(frozen=True)
class Entry:
    sample: batching.Sample
    iteration: int                  # the RL iteration (policy version) that collected it
    uid: int                        # insertion order (FIFO eviction, stable sampling order)
    n_tokens: int                   # tokenised length (length grouping, over-long filter)


def _output_text(s: batching.Sample) -> str:
    return "".join(t for k, t in s.spans if k != "prompt")


def reject_reason(s: batching.Sample, cfg: ReplayConfig, n_tokens: int | None = None,
                  stop: Sequence[str] = ("\n",)) -> str | None:
    """Why the buffer would not admit ``s`` (None: admitted). ``stop``: the reflector's stop strings
    (a reflection made of nothing but its stop string is empty)."""
    out = _output_text(s)
    bare = out
    for st in stop:
        if st and bare.endswith(st):
            bare = bare[: -len(st)]
    if not bare.strip():
        return "empty_output"
    if s.objective == "il":                     # expert iteration: successes, no reward rules
        pass
    elif s.role == "planner":
        if s.reward is None:
            raise ReplayError(f"an RL planner sample without reward ({s.metadata})")
        if cfg.drop_zero_reward and float(s.reward) == 0.0:
            return "zero_reward"
    else:
        if s.last_reward is None or s.current_reward is None:
            raise ReplayError(f"an RL reflector sample without last/current reward ({s.metadata})")
        last, cur = float(s.last_reward), float(s.current_reward)
        if cfg.drop_zero_reward and last == 0.0 and cur == 0.0:
            return "zero_reward"
        if last == cur:
            return "no_reward_change"
    if cfg.max_chars and len(s.text) > cfg.max_chars:
        return "over_max_chars"
    if cfg.max_tokens and n_tokens is not None and n_tokens > cfg.max_tokens:
        return "over_max_tokens"
    return None


def admit(samples: Iterable[batching.Sample], cfg: ReplayConfig, n_tokens: Sequence[int] | None = None,
          stop: Sequence[str] = ("\n",)) -> tuple[list[int], dict[str, int]]:
    """Indices of the admitted samples and the count of each rejection reason (by role)."""
    kept, counts = [], {}
    for i, s in enumerate(samples):
        why = reject_reason(s, cfg, None if n_tokens is None else int(n_tokens[i]), stop)
        if why is None:
            kept.append(i)
        else:
            key = f"{s.role}_{why}"
            counts[key] = counts.get(key, 0) + 1
    return kept, counts


class ReplayBuffer:
    def __init__(self, cfg: ReplayConfig = ReplayConfig()):
        self.cfg = cfg
        self.entries: dict[str, list[Entry]] = {r: [] for r in ROLES}
        self.next_uid = 0
        self.evicted = {"age": 0, "capacity": 0}

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def size(self, role: str) -> int:
        return len(self.entries[role])

    def add(self, samples: Sequence[batching.Sample], iteration: int, n_tokens: Sequence[int]) -> int:
        """Append admitted, behaviour-scored samples of ``iteration``; then apply age and capacity."""
        if len(samples) != len(n_tokens):
            raise ReplayError(f"{len(samples)} samples but {len(n_tokens)} token counts")
        for s, n in zip(samples, n_tokens):
            if s.objective == "rl" and s.behaviour_logp is None:
                raise ReplayError(f"an RL sample without behaviour log-probs ({s.metadata})")
            self.entries[s.role].append(Entry(s, int(iteration), self.next_uid, int(n)))
            self.next_uid += 1
        self.evict(iteration)
        return len(samples)

    def evict(self, iteration: int) -> None:
        """Drop entries older than ``max_age`` iterations, then the oldest beyond ``capacity``."""
        for role in ROLES:
            es = self.entries[role]
            if self.cfg.max_age:
                keep = [e for e in es if iteration - e.iteration < self.cfg.max_age]
                self.evicted["age"] += len(es) - len(keep)
                es = keep
            if self.cfg.capacity and len(es) > self.cfg.capacity:
                es = sorted(es, key=lambda e: e.uid)
                self.evicted["capacity"] += len(es) - self.cfg.capacity
                es = es[len(es) - self.cfg.capacity:]
            self.entries[role] = es

    def epoch_batches(self, role: str, rows: int, seed: int, epoch: int) -> list[list[Entry]]:
        """One epoch over the role's entries in length-grouped batches of ``rows`` (deterministic)."""
        es = self.entries[role]
        if not es:
            return []
        role_seed = int(seed) * 2 + ROLES.index(role)
        order = batching.length_grouped_batches([e.n_tokens for e in es], rows, role_seed, epoch)
        return [[es[int(j)] for j in b] for b in order]

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role in ROLES:
            es = self.entries[role]
            out[f"replay_{role}"] = len(es)
            if es:
                its = [e.iteration for e in es]
                out[f"replay_{role}_oldest_iteration"] = min(its)
                if es[0].sample.objective == "rl":
                    rewards = [float(e.sample.reward) if role == "planner" else
                               float(e.sample.current_reward) - float(e.sample.last_reward) for e in es]
                    out[f"replay_{role}_reward_mean"] = float(np.mean(rewards))
        out["replay_evicted_age"] = self.evicted["age"]
        out["replay_evicted_capacity"] = self.evicted["capacity"]
        return out

    # -------------------------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        rows = []
        for role in ROLES:
            for e in self.entries[role]:
                d = samples_lib.sample_to_json(e.sample)
                if e.sample.behaviour_logp is not None:
                    d["behaviour_logp"] = list(e.sample.behaviour_logp)
                rows.append({"sample": d, "iteration": e.iteration, "uid": e.uid, "n_tokens": e.n_tokens})
        return {"format": FORMAT, "config": dataclasses.asdict(self.cfg), "next_uid": self.next_uid,
                "evicted": dict(self.evicted), "entries": rows}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], cfg: ReplayConfig | None = None) -> "ReplayBuffer":
        """Rebuild a buffer; ``cfg`` (the live run's) must equal the saved one when given."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ReplayError(f"not a replay buffer of format {FORMAT}: "
                              f"{d.get('format') if isinstance(d, Mapping) else type(d).__name__}")
        saved = ReplayConfig.from_mapping(d["config"])
        if cfg is not None and cfg != saved:
            raise ReplayError(f"the saved replay buffer was made with {saved}, this run has {cfg}")
        buf = cls(saved)
        for i, row in enumerate(d["entries"]):
            try:
                sd = row["sample"]
                s = samples_lib.sample_from_json(sd)
                if "behaviour_logp" in sd:
                    s = dataclasses.replace(s, behaviour_logp=tuple(float(x) for x in sd["behaviour_logp"]))
                buf.entries[s.role].append(Entry(s, int(row["iteration"]), int(row["uid"]), int(row["n_tokens"])))
            except (KeyError, TypeError, ValueError) as e:
                raise ReplayError(f"replay entry {i} does not parse ({type(e).__name__}: {e})") from None
        for role in ROLES:
            buf.entries[role].sort(key=lambda e: e.uid)
        buf.next_uid = int(d["next_uid"])
        buf.evicted = {k: int(v) for k, v in d.get("evicted", {}).items()} or buf.evicted
        return buf
