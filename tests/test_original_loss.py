"""The project's losses against a numpy re-derivation of the original RetroAct training code.

The reference below is written from the original's semantics as docs/paper.md §2.2 / §3.2 describe them
(its SFT collator + HF causal-LM loss; its RL collator + ``LlamaForPolicyLM.forward``), for
micro-batch 1 (the only setting that code supports), one row at a time:

* tokenise ``source = input.strip()`` and ``target = input + output + eos`` with the model family's
  ``tokenizer(text)`` (BOS included), both cut to ``cutoff`` tokens (right truncation);
  labels = target ids with the first ``len(source)`` positions set to -100;
* RL collator: ``rewards = [0]*(T-L) + [R]*L``, ``ref = [0]*(T-L) + ref_prob[:L]`` (L = label count), both
  as bfloat16 tensors;
* RL loss: ``l_t = -CE_t`` (0 where ignored), ``w = clip(exp(l - ref), 1-eps, 1+eps)`` (no gradient),
  ``mean over the T-1 shifted positions of -w * l * R``; regulariser = mean over its T'-1 positions of
  CE (0 where ignored); total = RL + lambda * regulariser; gradient accumulation averages steps;
* SFT loss: HF's mean of CE over the label tokens.

The project computes the same numbers through its own path (Sample -> tokenize_sample -> collate ->
joint_loss) with ``behaviour_dtype="bfloat16"`` (the original's rounding); ``float32`` is shown to differ.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from retroact_jax import batching, losses, train
from retroact_jax.batching import Sample
from retroact_jax.testing import ByteTokenizer

V, EPS, CUTOFF = 259, 0.3, 96
PAD, BOS, EOS = 0, 1, 2


TOK = ByteTokenizer(add_bos=True)


# ------------------------------------------------------------------------------ the reference (numpy)
def bf16(x):
    """torch.tensor(python floats, dtype=bfloat16): float -> bfloat16 (round to nearest even)."""
    return np.asarray(x, np.float64).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def hf_tokenize(text):
    """The original's ``tokenizer(text, max_length=cutoff, truncation=True)`` for one row."""
    return TOK.encode(text, add_bos=True)[:CUTOFF]


def original_labels(inp, out):
    source = hf_tokenize(inp.strip())
    target = (TOK.encode(inp + out, add_bos=True) + [EOS])[:CUTOFF]   # "... + tokenizer.eos_token"
    labels = np.asarray(target, np.int64)
    labels[labels == PAD] = -100
    labels[:len(source)] = -100
    return np.asarray(target), labels


def log_softmax(x):
    x = x.astype(np.float32)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def shifted_ce(logits_TxV, labels):
    """CrossEntropyLoss(reduction='none') of logits[:-1] vs labels[1:]; 0 where ignored."""
    lp = log_softmax(logits_TxV[:-1])
    nxt = labels[1:]
    ce = np.zeros(len(nxt), np.float32)
    keep = nxt != -100
    ce[keep] = -lp[np.flatnonzero(keep), nxt[keep]]
    return ce


def original_rl_loss(row, logits_TxV):
    """One micro-batch of the original RL trainer: policy-gradient part only (its collator + forward)."""
    target, labels = original_labels(row["input"], row["output"])
    T, L = len(target), int(np.sum(labels != -100))
    rewards = bf16([0.0] * (T - L) + [row["R"]] * L)
    ref = bf16([0.0] * (T - L) + list(row["ref_prob"][:L]))
    logp = -shifted_ce(logits_TxV, labels)                       # float32, 0 where ignored
    w = np.clip(np.exp(logp - ref[1:]), 1 - EPS, 1 + EPS)       # f32 minus a bf16 value
    return np.mean(-w * logp * rewards[1:], dtype=np.float32)


def original_regular_loss(row, logits_TxV):
    _, labels = original_labels(row["input"], row["output"])
    return np.mean(shifted_ce(logits_TxV, labels), dtype=np.float32)    # over all T'-1 positions


def hf_sft_loss(row, logits_TxV):
    """The original IL stage: HF's causal-LM loss = mean CE over the label tokens."""
    _, labels = original_labels(row["input"], row["output"])
    ce = shifted_ce(logits_TxV, labels)
    return np.sum(ce) / max(int(np.sum(labels[1:] != -100)), 1)


# ------------------------------------------------------------------------------ random cases
def _text(rng, n, first_letter=True):
    alphabet = list("abcdefghij klmnop:.\nQRSTé")
    s = "".join(rng.choice(alphabet, size=n))
    return ("X" + s[1:]) if first_letter else s


def random_row(rng, role, objective, *, long=False, extra_ref=0):
    inp = _text(rng, int(rng.integers(5, 40))).rstrip() + "?"
    n_out = int(rng.integers(CUTOFF, 2 * CUTOFF)) if long else int(rng.integers(4, 40))
    out = _text(rng, n_out, first_letter=False)
    if role == "planner":   # generated / observation spans at random cut points
        cuts = sorted(set(rng.integers(1, len(out), size=3).tolist()))
        pieces = [out[a:b] for a, b in zip([0] + cuts, cuts + [len(out)])]
        spans = [("prompt", inp)] + [("generated" if i % 2 == 0 else "observation", p) for i, p in enumerate(pieces)]
    else:
        spans = [("prompt", inp), ("generated", out)]
    row = {"input": inp, "output": out, "role": role, "objective": objective, "spans": tuple(spans)}
    if objective == "rl":
        n_label = len(TOK.encode(out)) + 1          # output tokens + eos (what ref_prob.py keeps)
        row["ref_prob"] = (-rng.uniform(0.5, 7.0, size=n_label + extra_ref)).tolist()
        if role == "planner":
            row["reward"] = float(rng.choice([1.0, rng.uniform(0.001, 1.0)]))
            row["R"] = row["reward"]
        else:
            last, cur = float(rng.choice([0.0, 0.18, 0.6, -0.47])), float(rng.choice([1.0, 0.5, 0.0]))
            row.update(last_reward=last, current_reward=cur, R=(cur - last) * (last + 1.0))
    return row


def to_sample(row):
    kw = {}
    if row["objective"] == "rl":
        kw = dict(behaviour_logp=row["ref_prob"], behaviour_alignment="original",
                  reward=row.get("reward"), last_reward=row.get("last_reward"),
                  current_reward=row.get("current_reward"))
    return Sample(row["role"], row["spans"], objective=row["objective"], **kw)


def _logits(rng, T):
    return rng.normal(0.0, 2.0, size=(T, V)).astype(np.float32)


ROWS = 16   # every case padded with filler rows to one shape (one compile; filler rows never count)
_jitted_loss = jax.jit(losses.joint_loss_from_logits, static_argnums=2)


def project_loss(rows, row_logits, cfg):
    tss = [batching.tokenize_sample(to_sample(r), TOK, eos_id=EOS) for r in rows]
    b = batching.collate(tss, [CUTOFF], PAD, max_len=CUTOFF, batch_size=ROWS)
    logits = np.zeros((ROWS, CUTOFF, V), np.float32)
    for i, lg in enumerate(row_logits):
        logits[i, :len(lg)] = lg
    loss, m = _jitted_loss(jnp.asarray(logits), {k: jnp.asarray(v) for k, v in b.arrays().items()}, cfg)
    return float(loss), m, b


ORIGINAL = losses.LossConfig(rl_variant="detached_clip", epsilon=EPS, rl_normalization="positions",
                             il_normalization="positions", il_coef=1.0, role_pooling="pooled",
                             behaviour_dtype="bfloat16")


def _case(seed, n_pairs, *, long_every=0, extra_ref_every=0):
    rng = np.random.default_rng(seed)
    rl, il = [], []
    for k in range(n_pairs):
        long = bool(long_every) and k % long_every == 0
        extra = int(rng.integers(1, 6)) if extra_ref_every and k % extra_ref_every == 0 else 0
        rl.append(random_row(rng, str(rng.choice(["planner", "reflector"])), "rl", long=long, extra_ref=extra))
        il.append(random_row(rng, str(rng.choice(["planner", "reflector"])), "il", long=long and k % 2 == 0))
    targets = [original_labels(r["input"], r["output"])[0] for r in rl + il]
    logits = [_logits(rng, len(t)) for t in targets]
    # behaviour log-probs near the current policy's, so that ratios fall inside and outside the clip range
    for r, lg, t in zip(rl, logits, targets):
        lp = np.concatenate([[0.0], np.take_along_axis(log_softmax(lg[:-1]), t[1:, None], 1)[:, 0]])
        L = int(np.sum(original_labels(r["input"], r["output"])[1] != -100))
        near = (lp[len(t) - L:] + rng.normal(0, 0.25, size=L)).tolist()
        r["ref_prob"] = near + r["ref_prob"][L:]
    return rl, il, logits


def _reference(rl, il, logits):
    n = len(rl)
    parts = [original_rl_loss(r, lg) + 1.0 * original_regular_loss(q, lq)
             for r, q, lg, lq in zip(rl, il, logits[:n], logits[n:])]
    return float(np.mean(parts))   # gradient accumulation over n micro-batches


CASES = [dict(seed=s, n_pairs=n, long_every=le, extra_ref_every=xe)
         for s, (n, le, xe) in enumerate([(1, 0, 0), (1, 1, 0), (1, 0, 1), (2, 0, 0), (3, 2, 1), (4, 0, 2),
                                          (4, 3, 0), (5, 2, 2), (6, 0, 0), (6, 4, 3), (3, 1, 1), (8, 3, 2)])]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c['seed']}-pairs{c['n_pairs']}")
def test_rl_loss_equals_the_original_code(case):
    rl, il, logits = _case(**case)
    ref = _reference(rl, il, logits)
    got, m, b = project_loss(rl + il, logits, ORIGINAL)
    assert abs(got - ref) <= 1e-5, (got, ref)
    assert int(m["rl_tokens_missing_behaviour"]) == 0
    n_extra = sum(max(len(r["ref_prob"]) - (len(TOK.encode(r["output"])) + 1), 0) for r in rl)
    assert b.n_behaviour_cut == n_extra   # over-long ref_prob lists are cut and counted


def test_cases_cover_long_outputs_cut_ref_prob_mixed_roles_and_the_clip_range():
    all_rl = [r for c in CASES for r in _case(**c)[0]]
    assert {r["role"] for r in all_rl} == {"planner", "reflector"}
    assert any(len(original_labels(r["input"], r["output"])[0]) == CUTOFF for r in all_rl)   # truncated
    assert any(len(r["ref_prob"]) > len(TOK.encode(r["output"])) + 1 for r in all_rl)       # cut
    assert any(r["R"] < 0 for r in all_rl) and any(r["R"] > 0 for r in all_rl)
    clip = [float(project_loss(*(lambda a, b, c: (a + b, c))(*_case(**c)), ORIGINAL)[1]["clip_fraction"])
            for c in CASES[:4]]
    assert all(0.0 < f < 1.0 for f in clip)   # ratios inside and outside [1 - eps, 1 + eps]
    mixed = [c for c in CASES if len({r["role"] for r in _case(**c)[0]}) == 2]
    assert len(mixed) >= 4


def test_float32_behaviour_differs_from_the_original_rounding():
    """The option matters: without the bf16 rounding some cases miss the original by more than 1e-5."""
    missed = 0
    for case in CASES:
        rl, il, logits = _case(**case)
        got, _, _ = project_loss(rl + il, logits, dataclasses.replace(ORIGINAL, behaviour_dtype="float32"))
        missed += abs(got - _reference(rl, il, logits)) > 1e-5
    assert missed >= len(CASES) // 2


def test_per_role_pooling_equals_two_original_runs():
    """Multi-agent (Eq. 9 + 10): each role's parts equal an original run on that role's rows."""
    rl, il, logits = _case(seed=40, n_pairs=6, long_every=3, extra_ref_every=2)
    n = len(rl)
    rl = [dict(r, role=role) for r, role in zip(rl, ["planner", "reflector"] * 3)]
    il = [dict(r, role=role) for r, role in zip(il, ["planner", "reflector"] * 3)]
    for r in rl:   # a reflector row needs last/current rewards, a planner row a reward
        if r["role"] == "planner":
            r.update(reward=r["R"], last_reward=None, current_reward=None)
        else:
            r.update(last_reward=0.0, current_reward=r["R"], reward=None)
    want = 0.0
    for role in ("planner", "reflector"):
        idx = [i for i in range(n) if rl[i]["role"] == role]
        want += _reference([rl[i] for i in idx], [il[i] for i in idx], [logits[i] for i in idx] + [logits[n + i] for i in idx])
    got, _, _ = project_loss(rl + il, logits, dataclasses.replace(ORIGINAL, role_pooling="per_role"))
    assert abs(got - want) <= 1e-5


def test_short_ref_prob_fails_as_in_the_original():
    rng = np.random.default_rng(0)
    row = random_row(rng, "planner", "rl")
    row["ref_prob"] = row["ref_prob"][:-1]
    with pytest.raises(batching.SampleError, match="at least one per output token"):
        batching.tokenize_sample(to_sample(row), TOK, eos_id=EOS)


# ------------------------------------------------------------------------------ the IL stage
def _il_stage_loss_config():
    from retroact_jax.stages import il as il_stage
    return losses.LossConfig.from_mapping(dict(il_stage.default_config().loss.to_dict()))


@pytest.mark.parametrize("seed", range(6))
def test_il_stage_default_is_hf_mean_over_label_tokens_and_filler_rows_never_count(seed):
    cfg = _il_stage_loss_config()
    rng = np.random.default_rng(100 + seed)
    rows = {role: random_row(rng, role, "il", long=seed % 3 == 0) for role in ("planner", "reflector")}
    tss = {role: [batching.tokenize_sample(to_sample(r), TOK, eos_id=EOS)] for role, r in rows.items()}
    lg = {role: _logits(rng, len(t[0])) for role, t in tss.items()}
    want = sum(hf_sft_loss(rows[role], lg[role][:CUTOFF]) for role in rows)

    def step_loss(samples, n_rows):
        arrays, _ = train.collate_step(samples, n_rows, [CUTOFF], PAD, max_len=CUTOFF)
        logits = np.zeros(arrays["tokens_BxT"].shape + (V,), np.float32)
        i = 0
        for role in ("planner", "reflector"):
            for _ in samples.get(role, []):
                T = min(len(lg[role]), CUTOFF)
                logits[i, :T] = lg[role][:T]
                i += 1
            i += n_rows.get(role, 0) - len(samples.get(role, []))
        return float(losses.joint_loss_from_logits(jnp.asarray(logits), {k: jnp.asarray(v) for k, v in arrays.items()},
                                                   cfg)[0])

    one = step_loss(tss, {"planner": 1, "reflector": 1})
    assert abs(one - want) <= 1e-5
    # filler rows (rows=2 with one sample per role, or a role with no sample) change nothing
    assert abs(step_loss(tss, {"planner": 2, "reflector": 3}) - one) <= 1e-6
    only = {"planner": tss["planner"]}
    p1 = step_loss(only, {"planner": 1, "reflector": 1})
    assert abs(p1 - hf_sft_loss(rows["planner"], lg["planner"][:CUTOFF])) <= 1e-5
    assert abs(step_loss(only, {"planner": 2, "reflector": 1}) - p1) <= 1e-6
    # the same holds for the "positions" normalisation (the original RL stage's regulariser)
    cfg = dataclasses.replace(cfg, il_normalization="positions")
    base = step_loss(only, {"planner": 1, "reflector": 1})
    assert abs(base - original_regular_loss(rows["planner"], lg["planner"][:CUTOFF])) <= 1e-5
    assert abs(step_loss(only, {"planner": 2, "reflector": 2}) - base) <= 1e-6
