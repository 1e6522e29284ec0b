"""Trial records of the agent loop -> ``batching.Sample``s for the planner and the reflector.

A trial record (``agent.loop.TrialRunner._record``; one JSON line of ``trajectories.jsonl``) holds the
planner's spans (``prompt`` / ``generated`` / ``observation``, the exact text the planner saw and
wrote), the trial's ``score`` and ``success``, and, when the trial failed and a reflection followed,
``reflection.spans`` (``prompt`` = the reflector input, ``generated`` = the reflection as sampled,
including its stop string). Those spans are the training samples as they are: the text trained is
the text of inference, with the same boundaries (agent/spans.py).

* ``planner_samples``: one sample per trial record; an RL sample carries ``reward = score`` (R_tau,
  docs/paper.md Eq. 5: HotpotQA F1, ALFWorld success, InterCode IoU reward).
* ``reflector_samples``: one sample per reflection *that preceded a next trial* of the same task:
  the reflection written after trial k is rewarded by what trial k+1 achieved:
  ``last_reward = score(k)``, ``current_reward = score(k+1)`` (docs/paper.md Eq. 6 and §3.2). A reflection
  after the task's last recorded trial has no next trial and gives no sample.
* ``keep`` selects records (planner) or (trial k, trial k+1) pairs (reflector); the IL stage keeps
  successful trials and the reflections that preceded them (docs/paper.md §2.1: ``il_keep_planner``,
  ``il_keep_reflector``); the original RL pipeline drops zero-reward planner trials and reflector
  pairs with equal rewards (``rl_keep_planner``, ``rl_keep_reflector``).

Behaviour log-probs are not taken from the records: the sampler's log-probs are under the sampling
temperature, while the ratio needs the behaviour policy at temperature 1 over exactly the trained
tokens (the scoring pass, docs/design.md); the RL stage fills them. ``metadata`` names the record
(env, split, task index and id, trial) for error messages and for the scoring pass.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from retroact_jax.batching import Sample, SampleError

RecordKeep = Callable[[Mapping[str, Any]], bool]
PairKeep = Callable[[Mapping[str, Any], Mapping[str, Any]], bool]


class RecordError(ValueError):
    """A trial record without the fields a sample needs; the message names the record."""


def _name(rec: Mapping[str, Any]) -> str:
    return (f"{rec.get('env', '?')}/{rec.get('split', '?')} task {rec.get('task_index', '?')} "
            f"({rec.get('task_id', '?')}) trial {rec.get('trial', '?')}")


def _spans(rows: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(rows, (list, tuple)) or not rows:
        raise RecordError(f"{where}: spans must be a non-empty list, got {type(rows).__name__}")
    out = []
    for i, s in enumerate(rows):
        if not isinstance(s, Mapping) or "role" not in s or not isinstance(s.get("text"), str):
            raise RecordError(f"{where}: span {i} is not {{'role', 'text'}}: {s!r:.120}")
        out.append((str(s["role"]), s["text"]))
    return tuple(out)


def _score(rec: Mapping[str, Any]) -> float:
    try:
        return float(rec["score"])
    except (KeyError, TypeError, ValueError):
        raise RecordError(f"{_name(rec)}: the record has no numeric score") from None


def _meta(rec: Mapping[str, Any], **extra) -> dict[str, Any]:
    m = {k: rec.get(k) for k in ("env", "split", "task_index", "task_id", "trial")}
    m.update(extra)
    return m


def task_key(rec: Mapping[str, Any]) -> tuple:
    """Records of one task share this key (env, split, task id)."""
    for k in ("env", "split", "task_id", "trial"):
        if k not in rec:
            raise RecordError(f"a trial record lacks {k!r}: {_name(rec)}")
    return (rec["env"], rec["split"], rec["task_id"])


def planner_samples(records: Iterable[Mapping[str, Any]], objective: str = "il", *,
                    keep: RecordKeep | None = None) -> list[Sample]:
    """One planner sample per (kept) trial record, in record order."""
    out = []
    for rec in records:
        if keep is not None and not keep(rec):
            continue
        where = _name(rec)
        try:
            spans = _spans(rec["planner"]["spans"], where)
        except (KeyError, TypeError):
            raise RecordError(f"{where}: the record has no planner spans") from None
        score = _score(rec)
        try:
            out.append(Sample("planner", spans, objective=objective,
                              reward=score if objective == "rl" else None,
                              metadata=_meta(rec, score=score, success=bool(rec.get("success")))))
        except SampleError as e:
            raise RecordError(f"{where}: {e}") from e
    return out


def reflection_pairs(records: Iterable[Mapping[str, Any]]) -> list[tuple[Mapping, Mapping]]:
    """(trial k, trial k+1) of the same task where trial k carries a reflection; in record order of k."""
    by_key: dict[tuple, dict[int, Mapping]] = {}
    order = []
    for rec in records:
        key = task_key(rec)
        trials = by_key.setdefault(key, {})
        t = int(rec["trial"])
        if t in trials:
            raise RecordError(f"{_name(rec)}: the trial appears twice in the records")
        trials[t] = rec
        order.append((key, t))
    pairs = []
    for key, t in order:
        rec = by_key[key][t]
        if rec.get("reflection") and (t + 1) in by_key[key]:
            pairs.append((rec, by_key[key][t + 1]))
    return pairs


def reflector_samples(records: Iterable[Mapping[str, Any]], objective: str = "il", *,
                      keep: PairKeep | None = None, skip_empty: bool = False) -> list[Sample]:
    """One reflector sample per reflection followed by a next trial (and kept by ``keep(k, k+1)``).

    ``skip_empty``: leave out reflections whose generated text is empty or only its stop string
    (the original kept such rows in its IL data, docs/paper.md §2.3; they teach the reflector to stop).
    """
    out = []
    for prev, nxt in reflection_pairs(records):
        if keep is not None and not keep(prev, nxt):
            continue
        where = _name(prev) + " reflection"
        refl = prev["reflection"]
        try:
            spans = _spans(refl["spans"], where)
        except (KeyError, TypeError):
            raise RecordError(f"{where}: the reflection has no spans") from None
        if skip_empty and not "".join(t for k, t in spans if k != "prompt").strip():
            continue
        last, cur = _score(prev), _score(nxt)
        try:
            out.append(Sample("reflector", spans, objective=objective,
                              last_reward=last if objective == "rl" else None,
                              current_reward=cur if objective == "rl" else None,
                              metadata=_meta(prev, last_reward=last, current_reward=cur,
                                             next_success=bool(nxt.get("success")))))
        except SampleError as e:
            raise RecordError(f"{where}: {e}") from e
    return out


# ------------------------------------------------------------------------------------ selections
def il_keep_planner(rec: Mapping[str, Any]) -> bool:
    """IL (docs/paper.md §2.1): successful trials only (the benchmark evaluator's verdict)."""
    return bool(rec.get("success"))


def il_keep_reflector(prev: Mapping[str, Any], nxt: Mapping[str, Any]) -> bool:
    """IL: the reflection that preceded a successful trial."""
    return bool(nxt.get("success"))


def rl_keep_planner(rec: Mapping[str, Any]) -> bool:
    """The original RL data prep (``filter_json``): planner trials with a non-zero reward."""
    return _score(rec) != 0.0


def rl_keep_reflector(prev: Mapping[str, Any], nxt: Mapping[str, Any]) -> bool:
    """The original (``filter_json`` + ``filter_null``): a non-zero reward on either side, and a change."""
    last, cur = _score(prev), _score(nxt)
    return (last != 0.0 or cur != 0.0) and last != cur


def sample_to_json(s: Sample) -> dict[str, Any]:
    """A JSON-able form of a Sample (for the IL data cache and inspection)."""
    d: dict[str, Any] = {"role": s.role, "objective": s.objective,
                         "spans": [{"role": k, "text": t} for k, t in s.spans],
                         "metadata": dict(s.metadata)}
    for k in ("reward", "last_reward", "current_reward"):
        if getattr(s, k) is not None:
            d[k] = getattr(s, k)
    return d


def sample_from_json(d: Mapping[str, Any]) -> Sample:
    try:
        return Sample(d["role"], tuple((x["role"], x["text"]) for x in d["spans"]),
                      objective=d.get("objective", "il"), reward=d.get("reward"),
                      last_reward=d.get("last_reward"), current_reward=d.get("current_reward"),
                      metadata=d.get("metadata") or {})
    except (KeyError, TypeError) as e:
        raise RecordError(f"not a sample JSON object ({type(e).__name__}: {e}): {str(d)[:120]}") from None


__all__: Sequence[str] = ("RecordError", "planner_samples", "reflector_samples", "reflection_pairs",
                          "il_keep_planner", "il_keep_reflector", "rl_keep_planner", "rl_keep_reflector",
                          "sample_to_json", "sample_from_json", "task_key")
