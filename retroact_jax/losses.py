"""RetroAct's training losses as small pure, jittable functions.

Everything works on right- or left-padded token tensors (see ``batching.Batch``):

* ``token_logprobs`` / ``token_logprobs_and_entropy``: ``logp_BxT[:, t] = log p(tokens[:, t] | tokens[:, <t])``
  (0 at t = 0), computed in float32 from a log-softmax.
* ``il_loss``: teacher-forced cross-entropy (docs/paper.md §2.2).
* ``pg_loss``: the off-policy clipped-ratio policy gradient (docs/paper.md §3.1-3.2), four variants.
* ``reflector_reward``: Eq. 6 or the original code's scaled improvement (docs/paper.md §3.4 item 1).
* ``joint_loss``: planner RL + reflector RL + λ·IL in one batch, with metrics.

Default = the original code (``R:hotpotqa/rl/modeling_policy.py``, docs/paper.md §3.2): a token-level ratio
``rho_t = exp(logp_t - logp_beh_t)``, the *detached* clipped weight ``w_t = sg(clip(rho_t, 1-eps, 1+eps))``,
``loss = mean over all T-1 positions of -w_t * R_t * logp_t`` (masked positions add 0 but count).

Normalisations (per part: planner RL, reflector RL, IL):
* ``"positions"`` (the original RL stage, its policy-gradient term and its IL regulariser): every row's
  masked sum is divided by its own number of shifted positions, ``n_valid - 1`` (padding excluded, prompt
  included), then rows are averaged. With micro-batch 1 (the original's setting) this is exactly its
  ``.mean()``; a batch of B rows equals B accumulated micro-batches.
* ``"tokens"`` (the original IL stage = HF's causal-LM cross-entropy, RLMEC): the batch's masked sum
  divided by its number of trained tokens; with one row per part, HF's mean over that row's label tokens.
Filler rows (no valid token: ``train.collate_step`` pads a step to a fixed row count) never count, in
either normalisation.

Rounding (``LossConfig.behaviour_dtype``): the original collator builds the reward and reference
log-prob vectors as bfloat16 tensors, so its ratio is ``exp(logp_f32 - bf16(logp_beh))`` and its
weight multiplies ``bf16(R)``. ``"bfloat16"`` reproduces that (the original code's numbers, to float32
rounding); ``"float32"`` (default) keeps both exact (the ratio is exactly 1 on-policy).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

ROLES = ("planner", "reflector")   # the one role encoding: a role's id in batches is its index
ROLE_PLANNER, ROLE_REFLECTOR = ROLES.index("planner"), ROLES.index("reflector")
OBJECTIVE_IL, OBJECTIVE_RL = 0, 1

RL_VARIANTS = ("detached_clip", "paper_clip", "ppo_clip", "rlmec_min")
NORMALIZATIONS = ("positions", "tokens")
REFLECTOR_REWARDS = ("delta", "delta_scaled")
ROLE_POOLINGS = ("per_role", "pooled")
BEHAVIOUR_DTYPES = ("float32", "bfloat16")


class LossConfigError(ValueError):
    """An unknown loss variant / normalisation / option; the message lists the valid choices."""


def _check_choice(what: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise LossConfigError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")
    return value


# ----------------------------------------------------------------------------------------------------
# log-probs


def token_logprobs_and_entropy(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Aligned log-probs and predictive entropies, float32.

    ``logp_BxT[:, t] = log softmax(logits[:, t-1])[tokens[:, t]]`` and ``entropy_BxT[:, t]`` is the entropy
    of that same distribution; both are 0 at t = 0 (no prediction for the first token). The entropy is a
    metric: it carries no gradient.
    """
    return shifted_logprobs_and_entropy(logits_BxTxV[:, :-1], tokens_BxT)


def shifted_logprobs_and_entropy(logits_BxSxV: jax.Array, tokens_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``token_logprobs_and_entropy`` from the logits of positions ``0 .. T-2`` only (``S = T - 1``).

    The last position's logits predict nothing that is trained, so a training step computes the head on
    ``hidden[:, :-1]`` and passes them here: no [B, T, V] slice in the forward nor pad in the backward.
    One ``exp`` over the [B, S, V] logits feeds the log-sum-exp, the entropy (read through
    ``stop_gradient``: no backward pass for it) and the softmax of the backward.
    """
    B, T = tokens_BxT.shape
    if logits_BxSxV.shape[:2] != (B, T - 1):
        raise ValueError(f"logits {logits_BxSxV.shape} must be [B, T-1, V] for tokens {tokens_BxT.shape}")
    logp_BxS, ent_BxS = _logp_entropy(logits_BxSxV, tokens_BxT[:, 1:])
    zero_Bx1 = jnp.zeros((B, 1), jnp.float32)
    return jnp.concatenate([zero_Bx1, logp_BxS], axis=1), jnp.concatenate([zero_Bx1, ent_BxS], axis=1)


def _logp_entropy(logits_NxV: jax.Array, next_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-prob of ``next`` and entropy (no gradient) under each row of logits (any leading dims)."""
    logits = logits_NxV.astype(jnp.float32)
    nxt = next_N.astype(jnp.int32)
    # one exp pass over [.., V]: e = exp(logits - max) serves the log-sum-exp, the entropy and the
    # backward (softmax = e / Z); an all -inf row gets max 0 (as jax.nn.logsumexp)
    mx = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    shifted = logits - mx[..., None]
    e = jnp.exp(shifted)
    z = jnp.sum(e, axis=-1)
    log_z = jnp.log(z)
    logp = jnp.take_along_axis(shifted, nxt[..., None], axis=-1)[..., 0] - log_z
    # H = log Z - E_p[logit - max]; -inf logits (e = 0) add 0
    e_sg, sh_sg, z_sg = (jax.lax.stop_gradient(x) for x in (e, shifted, z))
    ent = jax.lax.stop_gradient(log_z) - jnp.sum(jnp.where(e_sg > 0, e_sg * sh_sg, 0.0), axis=-1) / z_sg
    return logp, ent


def head_logprobs_and_entropy(head_fn, h_BxSxD: jax.Array, tokens_BxT: jax.Array,
                              chunk: int = 256, unroll: bool = False) -> tuple[jax.Array, jax.Array]:
    """``shifted_logprobs_and_entropy(head_fn(h_BxSxD), tokens_BxT)`` without the [B, S, V] logits.

    ``head_fn`` maps hidden states [N, D] to logits [N, V] (the model's head). The B*S positions are
    cut into chunks of ``chunk`` rows, mapped one at a time (``lax.map``) under ``jax.checkpoint``:
    the forward keeps only each chunk's log-prob and entropy, the backward recomputes the chunk's
    logits from its hidden states. Live memory: a few [chunk, V] arrays instead of several [B, S, V]
    ones (2047 x 49152 floats = 400 MB each), for one more head matmul in the backward.
    ``chunk <= 0`` = the unchunked computation (one [B, S, V] logits array). ``unroll``: the chunks
    as straight-line code instead of a loop (``sharding.loops_deadlock``: XLA:CPU with several
    devices in one process can deadlock on collectives inside a loop); the same values.
    """
    B, T = tokens_BxT.shape
    S, D = h_BxSxD.shape[1], h_BxSxD.shape[2]
    if (h_BxSxD.shape[0], S) != (B, T - 1):
        raise ValueError(f"hidden {h_BxSxD.shape} must be [B, T-1, D] for tokens {tokens_BxT.shape}")
    if chunk <= 0 or B * S <= chunk:
        return shifted_logprobs_and_entropy(head_fn(h_BxSxD), tokens_BxT)
    n = B * S
    k = -(-n // chunk)
    pad = k * chunk - n
    h_KxCxD = jnp.pad(h_BxSxD.reshape(n, D), ((0, pad), (0, 0))).reshape(k, chunk, D)
    nxt_KxC = jnp.pad(tokens_BxT[:, 1:].reshape(n).astype(jnp.int32), (0, pad)).reshape(k, chunk)

    @jax.checkpoint
    def one(args):
        h_CxD, nxt_C = args
        return _logp_entropy(head_fn(h_CxD), nxt_C)

    if unroll:
        outs = [one((h_KxCxD[i], nxt_KxC[i])) for i in range(k)]
        logp_KxC, ent_KxC = (jnp.stack([o[j] for o in outs]) for j in (0, 1))
    else:
        logp_KxC, ent_KxC = jax.lax.map(one, (h_KxCxD, nxt_KxC))
    logp_BxS = logp_KxC.reshape(-1)[:n].reshape(B, S)
    ent_BxS = ent_KxC.reshape(-1)[:n].reshape(B, S)
    zero_Bx1 = jnp.zeros((B, 1), jnp.float32)
    return jnp.concatenate([zero_Bx1, logp_BxS], axis=1), jnp.concatenate([zero_Bx1, ent_BxS], axis=1)


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
    """``logp_BxT[:, t] = log p(tokens[:, t] | tokens[:, <t])``, 0 at t = 0, float32 (stable log-softmax)."""
    logits = logits_BxTxV[:, :-1].astype(jnp.float32)
    nxt = tokens_BxT[:, 1:].astype(jnp.int32)
    lse_BxT = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, nxt[..., None], axis=-1)[..., 0]
    zero_Bx1 = jnp.zeros((tokens_BxT.shape[0], 1), jnp.float32)
    return jnp.concatenate([zero_Bx1, picked - lse_BxT], axis=1)


# ----------------------------------------------------------------------------------------------------
# normalisation


def _normalize(per_token_BxT: jax.Array, mask_BxT: jax.Array, valid_BxT: jax.Array, rows_B: jax.Array,
               normalization: str) -> jax.Array:
    """Reduce a per-token loss over the rows ``rows_B`` (see the module docstring)."""
    _check_choice("normalization", normalization, NORMALIZATIONS)
    rows_B = rows_B & jnp.any(valid_BxT, axis=1)   # filler rows (all padding) never count
    m = mask_BxT.astype(jnp.float32) * rows_B.astype(jnp.float32)[:, None]
    summed_B = jnp.sum(per_token_BxT * m, axis=1)
    if normalization == "tokens":
        return jnp.sum(summed_B) / jnp.maximum(jnp.sum(m), 1.0)
    positions_B = jnp.maximum(jnp.sum(valid_BxT.astype(jnp.float32), axis=1) - 1.0, 1.0)
    r = rows_B.astype(jnp.float32)
    return jnp.sum(r * summed_B / positions_B) / jnp.maximum(jnp.sum(r), 1.0)


def il_loss(logp_BxT: jax.Array, mask_BxT: jax.Array, valid_BxT: jax.Array, rows_B: jax.Array | None = None,
            normalization: str = "tokens") -> jax.Array:
    """Teacher-forced NLL of the trained tokens (``mask_BxT``) of the rows ``rows_B`` (default: all).

    ``"tokens"``: the HF default of the original IL stage; ``"positions"``: the original RL stage's
    regulariser (mean over all T-1 positions, docs/paper.md §3.2).
    """
    if rows_B is None:
        rows_B = jnp.ones(logp_BxT.shape[:1], bool)
    return _normalize(-logp_BxT, mask_BxT, valid_BxT, rows_B, normalization)


# ----------------------------------------------------------------------------------------------------
# policy gradient


def pg_token_loss(logp_BxT: jax.Array, behaviour_logp_BxT: jax.Array, reward_BxT: jax.Array, *,
                  variant: str = "detached_clip", epsilon: float = 0.3) -> tuple[jax.Array, jax.Array]:
    """Per-token RL loss and the (detached) ratio ``rho_BxT = exp(logp - logp_beh)``.

    * ``detached_clip`` (default, original code): ``-sg(clip(rho)) * R * logp``; the gradient is
      ``-clip(rho) * R * grad logp`` everywhere (never halts).
    * ``paper_clip`` (Eq. 7-8 as written): ``-clip(rho) * R``; gradient ``-rho * R * grad logp`` inside
      ``[1-eps, 1+eps]`` and zero outside.
    * ``ppo_clip`` (PPO-Clip): ``-min(rho * R, clip(rho) * R)``; zero gradient where the clipped term wins.
    * ``rlmec_min`` (RLMEC's code): ``-sg(min(rho * R, clip(rho) * R)) * logp``.
    """
    _check_choice("rl variant", variant, RL_VARIANTS)
    lo, hi = 1.0 - epsilon, 1.0 + epsilon
    rho = jnp.exp(logp_BxT - behaviour_logp_BxT)
    rho_sg = jax.lax.stop_gradient(rho)
    if variant == "detached_clip":
        tok = -jnp.clip(rho_sg, lo, hi) * reward_BxT * logp_BxT
    elif variant == "paper_clip":
        tok = -jnp.clip(rho, lo, hi) * reward_BxT
    elif variant == "ppo_clip":
        tok = -jnp.minimum(rho * reward_BxT, jnp.clip(rho, lo, hi) * reward_BxT)
    else:  # rlmec_min
        w = jnp.minimum(rho_sg * reward_BxT, jnp.clip(rho_sg, lo, hi) * reward_BxT)
        tok = -w * logp_BxT
    return tok, rho_sg


def pg_loss(logp_BxT: jax.Array, behaviour_logp_BxT: jax.Array, reward_BxT: jax.Array, mask_BxT: jax.Array,
            valid_BxT: jax.Array, rows_B: jax.Array | None = None, *, variant: str = "detached_clip",
            epsilon: float = 0.3, normalization: str = "positions") -> jax.Array:
    """The clipped-ratio policy-gradient loss over the trained tokens of the rows ``rows_B``."""
    if rows_B is None:
        rows_B = jnp.ones(logp_BxT.shape[:1], bool)
    tok, _ = pg_token_loss(logp_BxT, behaviour_logp_BxT, reward_BxT, variant=variant, epsilon=epsilon)
    return _normalize(tok, mask_BxT, valid_BxT, rows_B, normalization)


def reflector_reward(last_reward, current_reward, variant: str = "delta_scaled", alpha: float = 1.0):
    """The reflector's reward from the rewards of the trials before (k) and after (k+1) its reflection.

    ``"delta"``: PAPER Eq. 6, ``R_{k+1} - R_k``. ``"delta_scaled"``: the original code,
    ``(R_cur - R_last) * (R_last + alpha) / alpha``. Works on floats, numpy and jax arrays alike.
    """
    _check_choice("reflector reward", variant, REFLECTOR_REWARDS)
    if variant == "delta":
        return current_reward - last_reward
    if alpha == 0:
        raise LossConfigError("reflector reward 'delta_scaled' needs alpha != 0")
    return (current_reward - last_reward) * (last_reward + alpha) / alpha


# ----------------------------------------------------------------------------------------------------
# joint loss


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The joint loss's options (hashable: pass it as a static argument under ``jax.jit``).

    rl_variant: one of RL_VARIANTS (default the original code's ``detached_clip``)
    epsilon: clip range of the ratio (README ``clip_episode`` 0.3)
    rl_normalization / il_normalization: ``positions`` (the original RL stage, both terms) | ``tokens``
        (the original IL stage: HF's mean over label tokens)
    behaviour_dtype: ``float32`` (exact) | ``bfloat16`` (the original collator: behaviour log-probs and
        rewards rounded to bfloat16 before the ratio and the weight)
    il_coef: λ of the IL regulariser (``regular_coefficient`` 1.0)
    role_pooling: ``per_role`` (Eq. 9 + Eq. 10: planner and reflector parts are each a mean over their
        own rows, summed) | ``pooled`` (one mean over all RL rows and one over all IL rows, what the
        original's single model does on a mixed-role file)
    Which tokens are trained and what reward each row has are properties of the batch
    (``batching.collate``'s ``observations`` and ``reflector_reward`` options), not of this config.
    """
    rl_variant: str = "detached_clip"
    epsilon: float = 0.3
    rl_normalization: str = "positions"
    il_normalization: str = "positions"
    il_coef: float = 1.0
    role_pooling: str = "per_role"
    behaviour_dtype: str = "float32"

    def __post_init__(self):
        _check_choice("rl variant", self.rl_variant, RL_VARIANTS)
        _check_choice("rl normalization", self.rl_normalization, NORMALIZATIONS)
        _check_choice("il normalization", self.il_normalization, NORMALIZATIONS)
        _check_choice("role pooling", self.role_pooling, ROLE_POOLINGS)
        _check_choice("behaviour dtype", self.behaviour_dtype, BEHAVIOUR_DTYPES)
        if not 0.0 < float(self.epsilon) < 1.0:
            raise LossConfigError(f"epsilon must lie in (0, 1), got {self.epsilon!r}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "LossConfig":
        """From a dict / ml_collections ConfigDict; unknown keys fail listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(cfg) - set(names))
        if unknown:
            raise LossConfigError(f"unknown loss config keys {unknown}; valid keys: {', '.join(names)}")
        return cls(**dict(cfg))


def _masked_stats(x_BxT: jax.Array, m_BxT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    n = jnp.sum(m_BxT)
    mean = jnp.sum(jnp.where(m_BxT, x_BxT, 0.0)) / jnp.maximum(n, 1)
    mn = jnp.where(n > 0, jnp.min(jnp.where(m_BxT, x_BxT, jnp.inf)), 0.0)
    mx = jnp.where(n > 0, jnp.max(jnp.where(m_BxT, x_BxT, -jnp.inf)), 0.0)
    return mean, mn, mx


def joint_loss(logp_BxT: jax.Array, entropy_BxT: jax.Array, batch: Mapping[str, jax.Array],
               cfg: LossConfig = LossConfig()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Planner RL + reflector RL + ``il_coef`` · IL over one role-masked batch.

    ``batch`` holds ``batching.Batch.arrays()``: ``loss_mask_BxT``, ``valid_BxT``, ``role_B``,
    ``objective_B``, ``reward_BxT``, ``behaviour_logp_BxT``, ``behaviour_mask_BxT``. RL rows are
    ``objective_B == OBJECTIVE_RL``; IL rows (the regulariser) ``OBJECTIVE_IL``. Single-agent training
    passes one model's log-probs for every row; multi-agent passes each row's own model's log-probs
    (the parts then give gradients only to their own parameters).

    Trained RL tokens without a behaviour log-prob (``behaviour_mask_BxT`` False) are treated as
    on-policy (rho = 1) and counted in ``metrics["rl_tokens_missing_behaviour"]``; the trainer must check
    that count is 0 for off-policy data.

    Metrics: each loss part; ratio mean/min/max and clip fraction over trained RL tokens; ``approx_kl``,
    the k3 estimator ``mean((rho - 1) - log rho)`` over trained RL tokens, which is non-negative per
    token and unbiased for KL(pi_beh || pi_theta) because those tokens were sampled from pi_beh;
    ``entropy``, the mean predictive entropy over all trained tokens; trained-token and row counts per
    role and objective.
    """
    mask = batch["loss_mask_BxT"].astype(bool)
    valid = batch["valid_BxT"].astype(bool)
    role, obj = batch["role_B"], batch["objective_B"]
    beh_mask = batch["behaviour_mask_BxT"].astype(bool)
    beh_in, reward = batch["behaviour_logp_BxT"], batch["reward_BxT"]
    if cfg.behaviour_dtype == "bfloat16":   # the original collator's bf16 tensors
        beh_in = jnp.asarray(beh_in).astype(jnp.bfloat16).astype(jnp.float32)
        reward = jnp.asarray(reward).astype(jnp.bfloat16).astype(jnp.float32)
    beh = jnp.where(beh_mask, beh_in, jax.lax.stop_gradient(logp_BxT))
    real = jnp.any(valid, axis=1)           # filler rows count in no part
    is_rl, is_il = (obj == OBJECTIVE_RL) & real, (obj == OBJECTIVE_IL) & real
    is_pl, is_rf = role == ROLE_PLANNER, role == ROLE_REFLECTOR

    tok, rho = pg_token_loss(logp_BxT, beh, reward, variant=cfg.rl_variant, epsilon=cfg.epsilon)
    m: dict[str, jax.Array] = {}
    if cfg.role_pooling == "per_role":
        m["rl_planner"] = _normalize(tok, mask, valid, is_rl & is_pl, cfg.rl_normalization)
        m["rl_reflector"] = _normalize(tok, mask, valid, is_rl & is_rf, cfg.rl_normalization)
        m["il_planner"] = _normalize(-logp_BxT, mask, valid, is_il & is_pl, cfg.il_normalization)
        m["il_reflector"] = _normalize(-logp_BxT, mask, valid, is_il & is_rf, cfg.il_normalization)
        rl = m["rl_planner"] + m["rl_reflector"]
        il = m["il_planner"] + m["il_reflector"]
    else:
        rl = _normalize(tok, mask, valid, is_rl, cfg.rl_normalization)
        il = _normalize(-logp_BxT, mask, valid, is_il, cfg.il_normalization)
    loss = rl + cfg.il_coef * il
    m.update(loss=loss, rl=rl, il=il)

    rl_tok = mask & is_rl[:, None]
    lo, hi = 1.0 - cfg.epsilon, 1.0 + cfg.epsilon
    n_rl = jnp.maximum(jnp.sum(rl_tok), 1)
    m["ratio_mean"], m["ratio_min"], m["ratio_max"] = _masked_stats(rho, rl_tok)
    m["clip_fraction"] = jnp.sum(rl_tok & ((rho < lo) | (rho > hi))) / n_rl
    log_rho = jax.lax.stop_gradient(logp_BxT - beh)
    k3 = (rho - 1.0) - log_rho
    m["approx_kl"] = jnp.sum(jnp.where(rl_tok, k3, 0.0)) / n_rl
    m["entropy"] = jnp.sum(jnp.where(mask, jax.lax.stop_gradient(entropy_BxT), 0.0)) / jnp.maximum(jnp.sum(mask), 1)
    m["rl_tokens_missing_behaviour"] = jnp.sum(rl_tok & ~beh_mask)
    for name, r in (("planner", is_pl), ("reflector", is_rf)):
        for oname, o in (("rl", is_rl), ("il", is_il)):
            m[f"tokens_{oname}_{name}"] = jnp.sum(mask & (r & o)[:, None])
            m[f"rows_{oname}_{name}"] = jnp.sum(r & o & jnp.any(valid, axis=1))
    return loss, m


def joint_loss_from_logits(logits_BxTxV: jax.Array, batch: Mapping[str, jax.Array],
                           cfg: LossConfig = LossConfig()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``joint_loss`` on one model's logits (single-agent, or a multi-agent step that merged its logits)."""
    logp, ent = token_logprobs_and_entropy(logits_BxTxV, batch["tokens_BxT"])
    return joint_loss(logp, ent, batch, cfg)
