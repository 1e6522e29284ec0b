"""losses.py against straightforward numpy re-derivations (values and gradients w.r.t. logits)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retroact_jax import losses

B, T, V = 4, 9, 13
EPS = 0.2


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_token_logprobs(logits, tokens):
    out = np.zeros(tokens.shape)
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            out[b, t] = _np_log_softmax(logits[b, t - 1])[tokens[b, t]]
    return out


def np_token_entropy(logits):
    out = np.zeros(logits.shape[:2])
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            ls = _np_log_softmax(logits[b, t - 1])
            out[b, t] = -(np.exp(ls) * ls).sum()
    return out


def np_weights(norm, mask, valid, rows):
    """d loss / d (per-token loss): the normaliser of every token under each normalisation."""
    w = np.zeros(mask.shape)
    if norm == "tokens":
        n = sum(mask[b].sum() for b in range(mask.shape[0]) if rows[b])
        for b in range(mask.shape[0]):
            if rows[b]:
                w[b] = mask[b] / max(n, 1)
    else:
        n_rows = max(rows.sum(), 1)
        for b in range(mask.shape[0]):
            if rows[b]:
                w[b] = mask[b] / max(valid[b].sum() - 1, 1) / n_rows
    return w


def np_pg(variant, logp, beh, R, eps):
    """Per-token loss value and d loss_t / d logp_t of each variant, written out case by case."""
    rho = np.exp(logp - beh)
    clip = np.clip(rho, 1 - eps, 1 + eps)
    inside = (rho >= 1 - eps) & (rho <= 1 + eps)
    if variant == "detached_clip":
        return -clip * R * logp, -clip * R
    if variant == "paper_clip":
        return -clip * R, -R * rho * inside
    if variant == "ppo_clip":
        unclipped_active = (rho * R <= clip * R) | inside
        return -np.minimum(rho * R, clip * R), -R * rho * unclipped_active
    if variant == "rlmec_min":
        w = np.minimum(rho * R, clip * R)
        return -w * logp, -w
    raise AssertionError(variant)


def np_grad_logits(logits, tokens, g_logp):
    """Chain rule through logp[b, t] = log_softmax(logits[b, t-1])[tokens[b, t]]."""
    out = np.zeros(logits.shape)
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            p = np.exp(_np_log_softmax(logits[b, t - 1]))
            onehot = np.eye(logits.shape[-1])[tokens[b, t]]
            out[b, t - 1] += g_logp[b, t] * (onehot - p)
    return out


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)) * 2.0
    tokens = rng.integers(0, V, size=(B, T))
    lengths = np.array([T, T - 2, 5, T - 1])
    valid = np.arange(T)[None, :] < lengths[:, None]
    prompt_len = np.array([3, 2, 1, 4])
    mask = valid & (np.arange(T)[None, :] >= prompt_len[:, None])
    mask[2, 3] = False  # an observation token left untrained
    logp = np_token_logprobs(logits, tokens)
    beh = logp + rng.normal(scale=0.4, size=logp.shape)  # ratios on both sides of the clip range
    reward = np.array([1.0, 0.5, -0.7, 0.25])
    R = np.where(valid & (np.arange(T)[None, :] >= prompt_len[:, None]), reward[:, None], 0.0)
    rows = np.array([True, True, False, True])
    return dict(logits=logits, tokens=tokens, valid=valid, mask=mask, logp=logp, beh=beh, R=R, rows=rows)


def test_token_logprobs_and_entropy_match_numpy_and_are_aligned():
    d = make_inputs()
    logp = losses.token_logprobs(jnp.asarray(d["logits"], jnp.float32), jnp.asarray(d["tokens"]))
    logp2, ent = losses.token_logprobs_and_entropy(jnp.asarray(d["logits"], jnp.float32), jnp.asarray(d["tokens"]))
    assert logp.dtype == jnp.float32 and logp.shape == (B, T)
    np.testing.assert_allclose(logp, d["logp"], atol=1e-5)
    np.testing.assert_allclose(logp2, d["logp"], atol=1e-5)
    np.testing.assert_allclose(ent, np_token_entropy(d["logits"]), atol=1e-5)
    assert np.all(np.asarray(logp)[:, 0] == 0)


@pytest.mark.parametrize("chunk,unroll", [(0, False), (5, False), (7, False), (64, False), (7, True)])
def test_chunked_head_logprobs_equal_unchunked_values_and_gradients(chunk, unroll):
    """The chunked head + log-prob (recomputed in the backward) = head then log-prob, in values
    and in the gradients w.r.t. hidden states and head weights (chunks need not divide B*(T-1)),
    looped or unrolled."""
    rng = np.random.default_rng(3)
    D = 6
    h = jnp.asarray(rng.normal(size=(B, T - 1, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    g_lp = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)

    def f(h, w, fn):
        lp, ent = fn(h, w)
        return jnp.sum(lp * g_lp) + jnp.sum(jax.lax.stop_gradient(ent)), (lp, ent)

    ref = lambda h, w: losses.shifted_logprobs_and_entropy(h @ w, tokens)  # noqa: E731
    got = lambda h, w: losses.head_logprobs_and_entropy(lambda x: x @ w, h, tokens, chunk, unroll)  # noqa: E731
    (_, (lp0, ent0)), g0 = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w, ref)
    (_, (lp1, ent1)), g1 = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True),
                                   static_argnums=2)(h, w, got)
    np.testing.assert_allclose(lp1, lp0, atol=1e-5)
    np.testing.assert_allclose(ent1, ent0, atol=1e-5)
    np.testing.assert_allclose(lp1, np_token_logprobs(np.einsum("bsd,dv->bsv", h, w), tokens), atol=1e-4)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_token_logprobs_stable_for_huge_logits_and_bf16():
    logits = jnp.asarray([[[1e4, 0.0, -1e4], [3e4, 3e4, 0.0]]], jnp.bfloat16)
    logp = losses.token_logprobs(logits, jnp.asarray([[0, 1]]))
    assert np.all(np.isfinite(logp))
    np.testing.assert_allclose(logp[0, 1], -1e4, rtol=1e-2)
    masked = jnp.asarray([[[0.0, -jnp.inf, 0.0], [0.0, 0.0, 0.0]]], jnp.float32)  # a vocabulary-masked logit
    logp, ent = losses.token_logprobs_and_entropy(masked, jnp.asarray([[0, 2]]))
    np.testing.assert_allclose(logp[0, 1], np.log(0.5), rtol=1e-6)
    np.testing.assert_allclose(ent[0, 1], np.log(2.0), rtol=1e-6)


def test_token_logprobs_gradient_matches_finite_differences():
    d = make_inputs(1)
    w = np.random.default_rng(2).normal(size=(B, T))
    f = lambda lg: jnp.sum(losses.token_logprobs(lg, jnp.asarray(d["tokens"])) * w)  # noqa: E731
    g = jax.grad(f)(jnp.asarray(d["logits"], jnp.float32))
    np.testing.assert_allclose(g, np_grad_logits(d["logits"], d["tokens"], w), atol=1e-5)
    h = 1e-3
    for b, t, v in [(0, 2, 5), (1, 0, 3), (3, 6, 12)]:
        e = np.zeros_like(d["logits"])
        e[b, t, v] = h
        fd = ((np_token_logprobs(d["logits"] + e, d["tokens"]) - np_token_logprobs(d["logits"] - e, d["tokens"]))
              * w).sum() / (2 * h)
        np.testing.assert_allclose(g[b, t, v], fd, atol=1e-4)


@pytest.mark.parametrize("norm", losses.NORMALIZATIONS)
def test_il_loss_value_and_gradient(norm):
    d = make_inputs(3)
    lg = jnp.asarray(d["logits"], jnp.float32)
    f = lambda lg: losses.il_loss(losses.token_logprobs(lg, jnp.asarray(d["tokens"])),  # noqa: E731
                                  jnp.asarray(d["mask"]), jnp.asarray(d["valid"]), jnp.asarray(d["rows"]), norm)
    w = np_weights(norm, d["mask"], d["valid"], d["rows"])
    np.testing.assert_allclose(f(lg), np.sum(-d["logp"] * w), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(f)(lg), np_grad_logits(d["logits"], d["tokens"], -w), atol=1e-6)


def test_il_positions_is_the_original_mean_over_all_shifted_positions():
    """B=1, no padding: sum of masked NLL / (T-1), prompt positions counted (docs/paper.md §3.2)."""
    d = make_inputs(4)
    v = losses.il_loss(jnp.asarray(d["logp"][:1], jnp.float32), jnp.asarray(d["mask"][:1]),
                       jnp.asarray(d["valid"][:1]), normalization="positions")
    np.testing.assert_allclose(v, (-d["logp"][0] * d["mask"][0]).sum() / (T - 1), rtol=1e-5)
    v = losses.il_loss(jnp.asarray(d["logp"][:1], jnp.float32), jnp.asarray(d["mask"][:1]),
                       jnp.asarray(d["valid"][:1]), normalization="tokens")
    np.testing.assert_allclose(v, (-d["logp"][0] * d["mask"][0]).sum() / d["mask"][0].sum(), rtol=1e-5)


@pytest.mark.parametrize("variant,norm", list(itertools.product(losses.RL_VARIANTS, losses.NORMALIZATIONS)))
def test_pg_loss_value_and_gradient_match_numpy(variant, norm):
    d = make_inputs(5)
    lg = jnp.asarray(d["logits"], jnp.float32)

    def f(lg):
        logp = losses.token_logprobs(lg, jnp.asarray(d["tokens"]))
        return losses.pg_loss(logp, jnp.asarray(d["beh"], jnp.float32), jnp.asarray(d["R"], jnp.float32),
                              jnp.asarray(d["mask"]), jnp.asarray(d["valid"]), jnp.asarray(d["rows"]),
                              variant=variant, epsilon=EPS, normalization=norm)

    tok, g_tok = np_pg(variant, d["logp"], d["beh"], d["R"], EPS)
    w = np_weights(norm, d["mask"], d["valid"], d["rows"])
    rho = np.exp(d["logp"] - d["beh"])[d["mask"] & d["rows"][:, None]]
    assert (rho < 1 - EPS).any() and (rho > 1 + EPS).any() and (abs(rho - 1) < EPS).any()
    np.testing.assert_allclose(f(lg), np.sum(tok * w), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(jax.grad(f)(lg), np_grad_logits(d["logits"], d["tokens"], g_tok * w), atol=2e-6)


def test_detached_clip_gradient_is_clipped_ratio_times_reward_times_grad_logp_over_n():
    """The original code's gradient: -(1/(T-1)) sum_t clip(rho_t) R grad log pi(x_t) (docs/paper.md §3.2)."""
    d = make_inputs(6)
    b = 0  # one full-length row, micro-batch 1 as in the original
    lg = jnp.asarray(d["logits"][b:b + 1], jnp.float32)
    tokens = jnp.asarray(d["tokens"][b:b + 1])
    args = (jnp.asarray(d["beh"][b:b + 1], jnp.float32), jnp.asarray(d["R"][b:b + 1], jnp.float32),
            jnp.asarray(d["mask"][b:b + 1]), jnp.asarray(d["valid"][b:b + 1]))
    g = jax.grad(lambda lg: losses.pg_loss(losses.token_logprobs(lg, tokens), *args, epsilon=EPS))(lg)
    rho = np.exp(d["logp"][b] - d["beh"][b])
    coef = np.clip(rho, 1 - EPS, 1 + EPS) * d["R"][b] * d["mask"][b] / (T - 1)
    # grad(logp_t) by jax itself, independent of the numpy chain rule
    jac = jax.jacobian(lambda lg: losses.token_logprobs(lg, tokens)[0])(lg)  # [T, 1, T, V]
    expect = -np.einsum("t,tbsv->bsv", coef, np.asarray(jac, np.float64))
    np.testing.assert_allclose(g, expect, atol=1e-6)
    # the detached variant's gradient never vanishes outside the trust region; the paper's form does
    g_paper = jax.grad(lambda lg: losses.pg_loss(losses.token_logprobs(lg, tokens), *args, epsilon=EPS,
                                                 variant="paper_clip"))(lg)
    t_out = int(np.flatnonzero(d["mask"][b] & (np.abs(rho - 1) > EPS))[0])
    assert np.abs(np.asarray(g)[0, t_out - 1]).max() > 1e-4
    # logits[t_out - 1] only feed token t_out, whose ratio is outside the range: the paper form gives 0
    np.testing.assert_allclose(np.asarray(g_paper)[0, t_out - 1], 0.0, atol=1e-8)


def test_paper_and_ppo_variants_match_finite_differences_of_the_numpy_loss():
    d = make_inputs(7)

    def np_loss(logits, variant):
        logp = np_token_logprobs(logits, d["tokens"])
        tok, _ = np_pg(variant, logp, d["beh"], d["R"], EPS)
        return np.sum(tok * np_weights("positions", d["mask"], d["valid"], d["rows"]))

    for variant in ("paper_clip", "ppo_clip"):
        g = jax.grad(lambda lg: losses.pg_loss(
            losses.token_logprobs(lg, jnp.asarray(d["tokens"])), jnp.asarray(d["beh"], jnp.float32),
            jnp.asarray(d["R"], jnp.float32), jnp.asarray(d["mask"]), jnp.asarray(d["valid"]),
            jnp.asarray(d["rows"]), variant=variant, epsilon=EPS))(jnp.asarray(d["logits"], jnp.float32))
        h = 1e-5
        for b, t, v in [(0, 3, 2), (1, 4, 7), (3, 5, 0), (0, 7, 11)]:
            e = np.zeros_like(d["logits"])
            e[b, t, v] = h
            fd = (np_loss(d["logits"] + e, variant) - np_loss(d["logits"] - e, variant)) / (2 * h)
            np.testing.assert_allclose(g[b, t, v], fd, atol=1e-5)


@pytest.mark.parametrize("variant", ["delta", "delta_scaled"])
def test_reflector_reward(variant):
    last = np.array([0.0, 0.18, 0.25, 0.5, -0.47, 1.0])
    cur = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    alpha = 1.0
    expect = cur - last if variant == "delta" else np.array(
        [(c - lst) * (lst + alpha) / alpha for lst, c in zip(last, cur)])
    np.testing.assert_allclose(losses.reflector_reward(last, cur, variant, alpha), expect)
    np.testing.assert_allclose(losses.reflector_reward(jnp.asarray(last), jnp.asarray(cur), variant), expect,
                               rtol=1e-6)
    if variant == "delta_scaled":  # docs/paper.md §3.3: 1.18*0.82, 1.25*0.75, 1.5*0.5, 0.53*1.47
        np.testing.assert_allclose(expect[1:5], [1.18 * 0.82, 1.25 * 0.75, 1.5 * 0.5, 0.53 * 1.47])
        np.testing.assert_allclose(losses.reflector_reward(0.5, 1.0, variant, alpha=2.0), 0.5 * 2.5 / 2)


def test_unknown_names_fail_listing_choices():
    with pytest.raises(losses.LossConfigError, match="detached_clip, paper_clip, ppo_clip, rlmec_min"):
        losses.LossConfig(rl_variant="ppo")
    with pytest.raises(losses.LossConfigError, match="positions, tokens"):
        losses.LossConfig(rl_normalization="sequence")
    with pytest.raises(losses.LossConfigError, match="delta, delta_scaled"):
        losses.reflector_reward(0.0, 1.0, "scaled")
    with pytest.raises(losses.LossConfigError, match="valid keys"):
        losses.LossConfig.from_mapping({"rl_varient": "paper_clip"})
    with pytest.raises(losses.LossConfigError, match="epsilon"):
        losses.LossConfig(epsilon=1.5)
    with pytest.raises(losses.LossConfigError, match="per_role, pooled"):
        losses.LossConfig(role_pooling="mean")
    assert losses.LossConfig.from_mapping({"rl_variant": "paper_clip"}).rl_variant == "paper_clip"


# ------------------------------------------------------------------------------------------------
# joint loss


def make_batch(seed=8):
    d = make_inputs(seed)
    role = np.array([losses.ROLE_PLANNER, losses.ROLE_REFLECTOR, losses.ROLE_PLANNER, losses.ROLE_REFLECTOR])
    obj = np.array([losses.OBJECTIVE_RL, losses.OBJECTIVE_RL, losses.OBJECTIVE_IL, losses.OBJECTIVE_IL])
    beh_mask = d["mask"].copy()
    batch = dict(tokens_BxT=d["tokens"].astype(np.int32), loss_mask_BxT=d["mask"], valid_BxT=d["valid"],
                 role_B=role.astype(np.int32), objective_B=obj.astype(np.int32),
                 reward_BxT=d["R"].astype(np.float32), behaviour_logp_BxT=np.where(beh_mask, d["beh"], 0.0).astype(np.float32),
                 behaviour_mask_BxT=beh_mask)
    return d, batch


@pytest.mark.parametrize("pooling", losses.ROLE_POOLINGS)
@pytest.mark.parametrize("variant", ["detached_clip", "paper_clip"])
def test_joint_loss_parts_metrics_and_gradient(pooling, variant):
    d, batch = make_batch()
    cfg = losses.LossConfig(rl_variant=variant, epsilon=EPS, il_coef=0.7, role_pooling=pooling,
                            rl_normalization="positions", il_normalization="tokens")
    f = jax.jit(lambda lg, b: losses.joint_loss_from_logits(lg, b, cfg))
    loss, m = f(jnp.asarray(d["logits"], jnp.float32), batch)
    role, obj, mask, valid = batch["role_B"], batch["objective_B"], d["mask"], d["valid"]
    tok, g_tok = np_pg(variant, d["logp"], d["beh"], d["R"], EPS)
    il_tok = -d["logp"]
    parts, grad_logp = {}, np.zeros((B, T))
    groups = ([("planner", role == 0), ("reflector", role == 1)] if pooling == "per_role"
              else [("all", np.ones(B, bool))])
    for name, r in groups:
        w_rl = np_weights("positions", mask, valid, r & (obj == 1))
        w_il = np_weights("tokens", mask, valid, r & (obj == 0))
        parts["rl_" + name], parts["il_" + name] = np.sum(tok * w_rl), np.sum(il_tok * w_il)
        grad_logp += g_tok * w_rl - 0.7 * w_il
    rl = sum(v for k, v in parts.items() if k.startswith("rl_"))
    il = sum(v for k, v in parts.items() if k.startswith("il_"))
    np.testing.assert_allclose(loss, rl + 0.7 * il, rtol=2e-5)
    np.testing.assert_allclose(m["rl"], rl, rtol=2e-5)
    np.testing.assert_allclose(m["il"], il, rtol=2e-5)
    if pooling == "per_role":
        for k in ("rl_planner", "rl_reflector", "il_planner", "il_reflector"):
            np.testing.assert_allclose(m[k], parts[k], rtol=2e-5, atol=1e-7)
    g = jax.grad(lambda lg: losses.joint_loss_from_logits(lg, batch, cfg)[0])(jnp.asarray(d["logits"], jnp.float32))
    np.testing.assert_allclose(g, np_grad_logits(d["logits"], d["tokens"], grad_logp), atol=2e-6)

    rl_tok = mask & (obj == 1)[:, None]
    rho = np.exp(d["logp"] - d["beh"])[rl_tok]
    np.testing.assert_allclose([m["ratio_mean"], m["ratio_min"], m["ratio_max"]],
                               [rho.mean(), rho.min(), rho.max()], rtol=1e-5)
    n_out = int(((rho < 1 - EPS) | (rho > 1 + EPS)).sum())
    assert 0 < n_out < rho.size
    np.testing.assert_allclose(m["clip_fraction"], n_out / rho.size, rtol=1e-6)
    np.testing.assert_allclose(m["approx_kl"], np.mean(rho - 1 - np.log(rho)), rtol=1e-4)
    np.testing.assert_allclose(m["entropy"], np_token_entropy(d["logits"])[mask].mean(), rtol=1e-5)
    assert int(m["tokens_rl_planner"]) == mask[0].sum() and int(m["tokens_rl_reflector"]) == mask[1].sum()
    assert int(m["tokens_il_planner"]) == mask[2].sum() and int(m["tokens_il_reflector"]) == mask[3].sum()
    assert int(m["rows_rl_planner"]) == 1 and int(m["rl_tokens_missing_behaviour"]) == 0


def test_ratio_is_one_on_policy_and_missing_behaviour_is_counted():
    d, batch = make_batch(9)
    batch["behaviour_logp_BxT"] = np.where(batch["behaviour_mask_BxT"], d["logp"], 0.0).astype(np.float32)
    cfg = losses.LossConfig(epsilon=EPS)
    _, m = losses.joint_loss_from_logits(jnp.asarray(d["logits"], jnp.float32), batch, cfg)
    for k in ("ratio_mean", "ratio_min", "ratio_max"):
        np.testing.assert_allclose(m[k], 1.0, atol=1e-5)
    assert float(m["clip_fraction"]) == 0.0
    np.testing.assert_allclose(m["approx_kl"], 0.0, atol=1e-6)
    # on-policy: all variants give the REINFORCE gradient -R grad logp / N
    grads = [jax.grad(lambda lg, v=v: losses.joint_loss_from_logits(
        lg, batch, losses.LossConfig(rl_variant=v, il_coef=0.0))[0])(jnp.asarray(d["logits"], jnp.float32))
        for v in losses.RL_VARIANTS]
    for g in grads[1:]:
        np.testing.assert_allclose(g, grads[0], atol=1e-5)
    # a trained RL token without a behaviour log-prob: treated as rho = 1 and counted
    batch["behaviour_mask_BxT"] = batch["behaviour_mask_BxT"].copy()
    batch["behaviour_mask_BxT"][0, -1] = False
    batch["behaviour_logp_BxT"] = np.where(batch["behaviour_mask_BxT"], d["beh"], 0.0).astype(np.float32)
    _, m = losses.joint_loss_from_logits(jnp.asarray(d["logits"], jnp.float32), batch, cfg)
    assert int(m["rl_tokens_missing_behaviour"]) == 1


def test_empty_parts_give_zero_not_nan():
    d, batch = make_batch(10)
    batch["objective_B"] = np.full(B, losses.OBJECTIVE_IL, np.int32)
    loss, m = losses.joint_loss_from_logits(jnp.asarray(d["logits"], jnp.float32), batch, losses.LossConfig())
    assert float(m["rl"]) == 0.0 and np.isfinite(loss)
    assert float(m["ratio_min"]) == 0.0 and float(m["clip_fraction"]) == 0.0
