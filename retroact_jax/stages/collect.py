"""RL collection (Algorithm 1, line "roll out pi_theta and mu_phi on the training envs"): trials of the
current policies on train tasks -> RL samples -> behaviour log-probs by a scoring pass.

* ``task_indices``: the tasks of iteration k: the next ``per_iteration`` tasks of a seeded stream of
  permutations of the train split (one epoch = one pass over all train tasks), so the data position
  is a pure function of (seed, iteration) and a resumed run picks the same tasks.
* ``rollout``: the tasks through the agent's ``TrialRunner`` (``agent.rollout.evaluate``: batched,
  K trials, reflections after failed trials) into ``<run_dir>/trajectories.jsonl``; an interrupted
  collection resumes from that file and never re-plays a finished trial. Several processes: each
  plays its share into ``<run_dir>/process-<p>-of-<n>/`` and every process gets all the records.
* ``rl_samples``: trial records -> planner / reflector samples (``rl.samples``; planner R = the trial's
  score, reflector (last, current) = scores of trials k and k+1).
* ``score_behaviour``: the behaviour log-probs of docs/design.md, RetroAct's ``ref_prob.py``: the
  parameters that collected the data score, at temperature 1, exactly the token sequence training
  will use (``batching.tokenize_sample`` of the sample, EOS appended as the original); one value per
  non-prompt token. The sampler's own log-probs of the generated spans are compared with them as a
  health metric (``behaviour_gap_*``): at temperature 1 with top-p 1 they are the same numbers up to
  float error, wherever the whole text re-tokenises into the sampled ids with the same prefix;
  generated spans that do not (non-canonical sampled tokenisations, merges across a span boundary)
  are counted in ``spans_retokenized`` and are exactly why the scoring pass exists.
  ``score_shared``: the same split between processes (every n-th sample in length order each),
  the log-probs and health counts gathered.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from retroact_jax import batching
from retroact_jax.stages import samples as samples_lib


class CollectError(RuntimeError):
    pass


def task_indices(n_all: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """Task indices of RL iteration ``iteration`` (1-based): chunk ``iteration - 1`` of the stream
    of seeded permutations of ``range(n_all)``; ``per_iteration <= 0`` or ``>= n_all``: all tasks."""
    if n_all < 1:
        raise CollectError("the train split has no tasks")
    if per_iteration <= 0 or per_iteration >= n_all:
        return list(range(n_all))
    start = (iteration - 1) * per_iteration
    out: list[int] = []
    while len(out) < per_iteration:
        epoch, offset = divmod(start + len(out), n_all)
        perm = np.random.default_rng([int(seed), int(epoch), 13]).permutation(n_all)
        out += [int(i) for i in perm[offset: offset + per_iteration - len(out)]]
    return sorted(out)


def rollout(env_name: str, split: str, indices: Sequence[int], planner, reflector, agent_cfg,
            run_dir: str | pathlib.Path, *, env_backend: str = "threads",
            show_progress: bool = False) -> tuple[list[dict], dict]:
    """(records of the tasks in (task, trial) order, evaluation summary) after running or resuming
    the collection; with several processes each plays its share and gets every record."""
    from retroact_jax.agent import rollout as rollout_lib
    return rollout_lib.evaluate_shared(env_name, split, indices, planner, reflector, agent_cfg, run_dir,
                                       env_backend=env_backend, show_progress=show_progress)


def rl_samples(records: Sequence[Mapping[str, Any]], roles: Sequence[str]) -> list[batching.Sample]:
    """Unfiltered RL samples of the roles (the replay buffer's ``admit`` filters them)."""
    out: list[batching.Sample] = []
    if "planner" in roles:
        out += samples_lib.planner_samples(records, "rl")
    if "reflector" in roles:
        out += samples_lib.reflector_samples(records, "rl")
    return out


def ei_samples(records: Sequence[Mapping[str, Any]], roles: Sequence[str]) -> list[batching.Sample]:
    """Expert iteration (docs/paper.md §3.1 baselines): successful trials and the reflections that
    preceded them, as imitation samples."""
    out: list[batching.Sample] = []
    if "planner" in roles:
        out += samples_lib.planner_samples(records, "il", keep=samples_lib.il_keep_planner)
    if "reflector" in roles:
        out += samples_lib.reflector_samples(records, "il", keep=samples_lib.il_keep_reflector)
    return out


def _record_spans(records: Sequence[Mapping[str, Any]]) -> dict[tuple, list[dict]]:
    """(role, task_index, trial) -> the raw span dicts (with sampler token ids / log-probs)."""
    out = {}
    for r in records:
        k = (int(r["task_index"]), int(r["trial"]))
        out[("planner",) + k] = r["planner"]["spans"]
        if r.get("reflection"):
            out[("reflector",) + k] = r["reflection"]["spans"]
    return out


def tokenize(samples: Sequence[batching.Sample], tokenizer, eos_id: int | None):
    return [batching.tokenize_sample(s, tokenizer, eos_id=eos_id) for s in samples]


def with_behaviour(ts: batching.TokenizedSample, scored: batching.Sample) -> batching.TokenizedSample:
    """``ts`` (the tokenisation that was scored) carrying ``scored``'s behaviour log-probs, one per
    non-prompt token: the training row without tokenising the sample again."""
    nonprompt = ts.kinds != batching.KIND_PROMPT
    beh = np.zeros(len(ts), np.float32)
    beh[nonprompt] = np.asarray(scored.behaviour_logp, np.float32)
    return dataclasses.replace(ts, sample=scored, behaviour_logp=beh, behaviour_mask=nonprompt)


def score_behaviour(samples: Sequence[batching.Sample], scorers: Mapping[str, Any], tokenizer, *,
                    eos_id: int | None, records: Sequence[Mapping[str, Any]] = (),
                    batch_rows: int = 8, tokenized: Sequence[batching.TokenizedSample] | None = None,
                    ) -> tuple[list[batching.Sample], list[int], dict[str, float]]:
    """Behaviour log-probs for ``samples`` (``scorers[role]``: a ``scoring.Scorer`` holding the
    parameters that collected them). Returns (samples with ``behaviour_logp``, token counts, health).

    ``records``: the trial records the samples came from, for the sampler-vs-scorer comparison.
    ``tokenized``: the samples' tokenisation when the caller has it (a sample is tokenised once).
    """
    spans_of = _record_spans(records)
    tss = list(tokenized) if tokenized is not None else tokenize(samples, tokenizer, eos_id)
    order = sorted(range(len(tss)), key=lambda i: len(tss[i]))
    out: list[batching.Sample | None] = [None] * len(samples)
    gaps: list[np.ndarray] = []
    health = {"spans_compared": 0, "spans_retokenized": 0, "spans_without_sampler_logprobs": 0}
    for b0 in range(0, len(order), batch_rows):
        idx = order[b0:b0 + batch_rows]
        roles = {samples[i].role for i in idx}
        for role in roles:
            rows = [i for i in idx if samples[i].role == role]
            if role not in scorers:
                raise CollectError(f"no behaviour scorer for role {role!r}")
            T = max(len(tss[i]) for i in rows)
            tokens = np.zeros((len(rows), T), np.int32)
            valid = np.zeros((len(rows), T), bool)
            for j, i in enumerate(rows):
                tokens[j, :len(tss[i])] = tss[i].ids
                valid[j, :len(tss[i])] = True
            logp = scorers[role](tokens, valid)
            for j, i in enumerate(rows):
                ts = tss[i]
                lp = np.asarray(logp[j, :len(ts)], np.float64)
                beh = lp[ts.kinds != batching.KIND_PROMPT]
                out[i] = dataclasses.replace(samples[i], behaviour_logp=tuple(float(x) for x in beh))
                m = samples[i].metadata
                raw = spans_of.get((role, int(m.get("task_index", -1)), int(m.get("trial", -1))))
                if raw is not None:
                    gaps += _compare(samples[i], raw, ts, lp, tokenizer, health)
    scored = [s for s in out if s is not None]
    g = np.concatenate(gaps) if gaps else np.zeros(0)
    health["generated_tokens_compared"] = int(g.size)
    health["behaviour_gap_mean_abs"] = float(g.mean()) if g.size else float("nan")
    health["behaviour_gap_max_abs"] = float(g.max()) if g.size else float("nan")
    return scored, [len(t) for t in tss], health


def _compare(sample, raw: Sequence[Mapping], ts, logp: np.ndarray, tokenizer, health) -> list[np.ndarray]:
    """|scored - sampler| log-probs of the generated spans whose sampled ids are exactly the
    training ids at that place, with the same token prefix (see the module docstring)."""
    if len(raw) != len(sample.spans) or not hasattr(tokenizer, "encode_pieces"):
        return []
    pieces = [t for _, t in sample.spans]
    bos = [int(tokenizer.bos_id)] if getattr(tokenizer, "add_bos", False) else []   # as tokenize_sample
    ids, owner = tokenizer.encode_pieces(pieces)
    ids, owner = bos + list(ids), [0] * len(bos) + list(owner)
    ids, owner = np.asarray(ids, np.int64), np.asarray(owner, np.int64)
    if not np.array_equal(ids, ts.ids[:len(ids)]):
        raise CollectError(f"the scored tokens are not the tokenisation of the sample ({sample.metadata})")
    out = []
    for i, span in enumerate(raw):
        if span.get("role") != "generated" or not span.get("text"):
            continue
        if span.get("token_ids") is None or span.get("logprobs") is None:
            health["spans_without_sampler_logprobs"] += 1
            continue
        pos = np.flatnonzero(owner == i)
        sampled = np.asarray(span["token_ids"], np.int64)
        same = (pos.size == sampled.size and pos.size > 0 and np.all(np.diff(pos) == 1)
                and np.array_equal(ids[pos], sampled)
                and np.array_equal(ids[:pos[0]], np.asarray(bos + list(tokenizer.encode("".join(pieces[:i]))), np.int64)))
        if not same:
            health["spans_retokenized"] += 1
            continue
        health["spans_compared"] += 1
        out.append(np.abs(logp[pos] - np.asarray(span["logprobs"], np.float64)))
    return out


def score_shared(samples: Sequence[batching.Sample], scorers: Mapping[str, Any], tokenizer, *,
                 eos_id: int | None, records: Sequence[Mapping[str, Any]],
                 batch_rows: int, tokenized: Sequence[batching.TokenizedSample],
                 ) -> tuple[list[batching.Sample], list[int], dict[str, float]]:
    """``score_behaviour`` with the work split between processes (every process holds the same
    ``samples``; each scores every n-th one in length order) and the results gathered: the same
    return value on every process. Every process must call it (a collective)."""
    from retroact_jax import distributed
    if distributed.count() == 1:
        return score_behaviour(samples, scorers, tokenizer, eos_id=eos_id, records=records,
                               batch_rows=batch_rows, tokenized=tokenized)
    mine = distributed.share(sorted(range(len(tokenized)), key=lambda i: len(tokenized[i])))
    scored, _, health = score_behaviour([samples[i] for i in mine], scorers, tokenizer, eos_id=eos_id,
                                        records=records, batch_rows=batch_rows,
                                        tokenized=[tokenized[i] for i in mine])
    parts = distributed.allgather_json({"index": mine, "logp": [list(s.behaviour_logp) for s in scored],
                                        "health": health})
    out = list(samples)
    for p in parts:
        for i, lp in zip(p["index"], p["logp"]):
            out[i] = dataclasses.replace(samples[i], behaviour_logp=tuple(float(x) for x in lp))
    hs = [p["health"] for p in parts]
    total = {k: sum(int(h[k]) for h in hs) for k in ("spans_compared", "spans_retokenized",
                                                      "spans_without_sampler_logprobs",
                                                      "generated_tokens_compared")}
    n = total["generated_tokens_compared"]
    total["behaviour_gap_mean_abs"] = (sum(h["behaviour_gap_mean_abs"] * h["generated_tokens_compared"]
                                           for h in hs if h["generated_tokens_compared"]) / n
                                       if n else float("nan"))
    total["behaviour_gap_max_abs"] = (max(h["behaviour_gap_max_abs"] for h in hs if h["generated_tokens_compared"])
                                      if n else float("nan"))
    return out, [len(t) for t in tokenized], total
