"""Tests for the student maths (game/example_values.py, example_weights.py, student_losses.py, trace_filter.py and
the recipes in students.py) against closed forms and hand computations."""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from game import example_values as EV
from game import example_weights as EW
from game import student_losses as SL
from game import students as S
from game import trace_filter as TF

# ---------------------------------------------------------------------------
# A logistic-regression "student": per-example gradients in closed form.
#   ℓ_i(θ) = softplus(-y_i (x_i·w + b)),  y_i ∈ {±1}
#   ∇_w ℓ_i = -y_i σ(-y_i m_i) x_i,  ∇_b ℓ_i = -y_i σ(-y_i m_i),  m_i = x_i·w + b
# ---------------------------------------------------------------------------

D = 5


def logistic_losses(params, x, y):
    m = x @ params["w"] + params["b"]
    return jax.nn.softplus(-y * m)


def np_grads(params, x, y):
    w, b = np.asarray(params["w"], np.float64), float(params["b"])
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = x @ w + b
    s = 1.0 / (1.0 + np.exp(y * m))  # σ(-y m)
    return -(y * s)[:, None] * x, -(y * s)  # [B, D], [B]


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=D), jnp.float32), "b": jnp.float32(0.3)}
    x = jnp.asarray(rng.normal(size=(6, D)), jnp.float32)
    y = jnp.asarray(rng.choice([-1.0, 1.0], size=6), jnp.float32)
    x_ho = jnp.asarray(rng.normal(size=(10, D)), jnp.float32)
    y_ho = jnp.asarray(rng.choice([-1.0, 1.0], size=10), jnp.float32)
    return params, x, y, x_ho, y_ho


def mean_logistic(params, x, y):
    return jnp.mean(logistic_losses(params, x, y))


def test_heldout_gradient_closed_form(problem):
    params, _, _, x_ho, y_ho = problem
    g = EV.heldout_gradient(mean_logistic, params, x_ho, y_ho)
    gw, gb = np_grads(params, x_ho, y_ho)
    np.testing.assert_allclose(g["w"], gw.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g["b"], gb.mean(), rtol=1e-5, atol=1e-7)


def test_example_values_equal_per_example_gradient_dot_g(problem):
    params, x, y, x_ho, y_ho = problem
    g = EV.heldout_gradient(mean_logistic, params, x_ho, y_ho)
    v = EV.example_values(logistic_losses, params, g, x, y)
    chex.assert_shape(v, (6,))
    assert v.dtype == jnp.float32
    gw, gb = np_grads(params, x, y)
    want = gw @ np.asarray(g["w"], np.float64) + gb * float(g["b"])
    np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-7)
    # and with jax.grad per example, in a loop
    for i in range(6):
        gi = jax.grad(lambda p: logistic_losses(p, x[i : i + 1], y[i : i + 1])[0])(params)
        dot = float(jnp.vdot(gi["w"], g["w"]) + gi["b"] * g["b"])
        np.testing.assert_allclose(v[i], dot, rtol=1e-5, atol=1e-7)


def test_example_values_fd_matches_jvp(problem):
    params, x, y, x_ho, y_ho = problem
    g = EV.heldout_gradient(mean_logistic, params, x_ho, y_ho)
    v = EV.example_values(logistic_losses, params, g, x, y)
    v_fd = EV.example_values_fd(logistic_losses, params, g, x, y, eps=1e-2)
    np.testing.assert_allclose(v_fd, v, rtol=1e-3, atol=1e-4)


def test_reference_code_compat_is_negated(problem):
    params, x, y, x_ho, y_ho = problem
    g = EV.heldout_gradient(mean_logistic, params, x_ho, y_ho)
    v = np.asarray(EV.example_values(logistic_losses, params, g, x, y))
    c32 = EV.example_values_reference_code_compat(logistic_losses, params, g, x, y, eps=1e-2, dtype=jnp.float32)
    np.testing.assert_allclose(c32, -v, rtol=1e-3, atol=1e-4)
    cbf = np.asarray(EV.example_values_reference_code_compat(logistic_losses, params, g, x, y, eps=0.1))
    big = np.abs(v) > 0.3 * np.abs(v).max()
    assert np.all(np.sign(cbf[big]) == -np.sign(v[big]))


def test_example_values_casts_to_float32_and_skips_int_leaves(problem):
    params, x, y, x_ho, y_ho = problem
    g = EV.heldout_gradient(mean_logistic, params, x_ho, y_ho)
    p16 = {"w": params["w"].astype(jnp.bfloat16), "b": params["b"].astype(jnp.bfloat16), "step": jnp.int32(7)}
    g16 = {"w": g["w"].astype(jnp.bfloat16), "b": g["b"].astype(jnp.bfloat16), "step": jnp.int32(0)}

    def loss(p, x, y):
        assert p["w"].dtype == jnp.float32  # cast happened before the jvp
        return logistic_losses(p, x, y)

    v = EV.example_values(loss, p16, g16, x, y)
    p_r = {k: np.asarray(p16[k], np.float32) for k in ("w", "b")}
    g_r = {k: np.asarray(g16[k], np.float64) for k in ("w", "b")}
    gw, gb = np_grads(p_r, x, y)
    np.testing.assert_allclose(v, gw @ g_r["w"] + gb * g_r["b"], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Aligned vs opposed examples (least squares: ∇ℓ_i = (x_i·θ - y_i) x_i)
# ---------------------------------------------------------------------------


def sq_losses(theta, x, y):
    return 0.5 * (x @ theta - y) ** 2


def test_adaptive_student_prefers_aligned_example():
    theta = jnp.array([0.5, -1.0, 2.0])
    x_h, y_h = jnp.array([[1.0, 2.0, 0.5]]), jnp.array([3.0])
    g = EV.heldout_gradient(lambda t, x, y: jnp.mean(sq_losses(t, x, y)), theta, x_h, y_h)
    r_h = float(x_h[0] @ theta - y_h[0])
    np.testing.assert_allclose(g, r_h * x_h[0], rtol=1e-6)
    # example 0: same residual -> ∇ℓ = g (aligned); example 1: negated residual
    # -> ∇ℓ = -g (opposed); example 2: orthogonal input -> value 0.
    x_orth = jnp.array([2.0, -1.0, 0.0])  # ⟂ x_h
    x = jnp.stack([x_h[0], x_h[0], x_orth])
    y = jnp.array([y_h[0], 2 * float(x_h[0] @ theta) - y_h[0], 0.0])
    v = EV.example_values(sq_losses, theta, g, x, y)
    gg = float(g @ g)
    np.testing.assert_allclose(v, [gg, -gg, 0.0], rtol=1e-5, atol=1e-5)

    # "positive = useful": a gradient step on the aligned example lowers held-out loss
    def L(t):
        return float(jnp.mean(sq_losses(t, x_h, y_h)))

    for i, sign in ((0, -1), (1, +1)):
        step = theta - 1e-3 * jax.grad(lambda t: sq_losses(t, x[i : i + 1], y[i : i + 1])[0])(theta)
        assert sign * (L(step) - L(theta)) > 0
    w_adapt = EW.adaptive_weights(v, beta=0.1)
    w_pass = EW.adaptive_weights(v, beta=0.0)
    w_rev = EW.adaptive_weights(v, beta=-0.1)
    assert w_adapt[0] > w_adapt[2] > w_adapt[1]
    np.testing.assert_array_equal(w_pass, np.ones(3, np.float32))
    assert w_rev[1] > w_rev[2] > w_rev[0]


# ---------------------------------------------------------------------------
# adaptive_weights
# ---------------------------------------------------------------------------


def test_adaptive_weights_uncapped_closed_form():
    v = np.array([0.3, -1.0, 2.0, 0.0, 0.7])
    beta = 0.8
    u = np.exp(beta * v)
    want = u / u.mean()
    np.testing.assert_allclose(EW.adaptive_weights(v, beta, max_weight=None), want, rtol=1e-5)
    np.testing.assert_allclose(EW.adaptive_weights(v, beta, max_weight=100.0), want, rtol=1e-5)


def test_adaptive_weights_cap_hand_computed():
    v = np.array([math.log(100.0), 0.0, 0.0, 0.0])
    # u = [100, 1, 1, 1]; cap 2: [2, c, c, c] with 2 + 3c = 4 -> c = 2/3
    w = EW.adaptive_weights(v, 1.0, max_weight=2.0)
    np.testing.assert_allclose(w, [2.0, 2 / 3, 2 / 3, 2 / 3], rtol=1e-6)
    # masking the last one: [2, c, c, 0] with 2 + 2c = 3 -> c = 1/2
    w = EW.adaptive_weights(v, 1.0, max_weight=2.0, mask_b=np.array([1, 1, 1, 0], bool))
    np.testing.assert_allclose(w, [2.0, 0.5, 0.5, 0.0], rtol=1e-6)
    # extreme β: the others underflow in exp but are floored, still mean 1, no NaN
    w = EW.adaptive_weights(np.array([1.0, 0.0, 0.0, 0.0]), 1e4, max_weight=2.0)
    np.testing.assert_allclose(w, [2.0, 2 / 3, 2 / 3, 2 / 3], rtol=1e-6)


def test_adaptive_weights_random_cap_properties():
    rng = np.random.default_rng(3)
    for trial in range(5):
        n = 12
        v = rng.normal(size=n) * 2
        mask = rng.random(n) < 0.8
        mask[0] = True
        M = 1.5 + trial
        w = np.asarray(EW.adaptive_weights(v, 1.3, max_weight=M, mask_b=mask))
        assert np.all(w[~mask] == 0)
        np.testing.assert_allclose(w[mask].mean(), 1.0, rtol=1e-5)
        assert w.max() <= M + 1e-6
        # uncapped valid weights keep the exp(βv) ratios
        free = mask & (w < M - 1e-4)
        r = w[free] / np.exp(1.3 * v[free])
        np.testing.assert_allclose(r, r[0], rtol=1e-4)
        # capped ones are exactly those with the largest v
        if (mask & ~free).any():
            assert v[mask & ~free].min() >= v[free].max()


def test_adaptive_weights_standardize():
    v = np.array([0.01, -0.02, 0.03, 0.0])
    mask = np.array([1, 1, 1, 0], bool)
    std = v[mask].std()
    want = np.exp(2.0 * v / std) * mask
    want = want / want[mask].mean()
    got = EW.adaptive_weights(v, 2.0, mask_b=mask, standardize=True, max_weight=None)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    got_scaled = EW.adaptive_weights(1000 * v, 2.0, mask_b=mask, standardize=True, max_weight=None)
    np.testing.assert_allclose(got_scaled, want, rtol=1e-4)


def test_adaptive_weights_validation():
    with pytest.raises(ValueError, match="max_weight=0.5"):
        EW.adaptive_weights(np.zeros(3), 1.0, max_weight=0.5)
    np.testing.assert_array_equal(EW.adaptive_weights(np.zeros(3), 1.0, mask_b=np.zeros(3, bool)), np.zeros(3))


# ---------------------------------------------------------------------------
# NLL averaging, soft targets
# ---------------------------------------------------------------------------

LOGP = np.array([[-1.0, -2.0, -3.0], [-4.0, -np.inf, np.nan]], np.float32)
MASK = np.array([[1, 1, 1], [1, 0, 0]], bool)


def test_sequence_nll_hand():
    np.testing.assert_allclose(SL.sequence_nll(LOGP, MASK), [2.0, 4.0])


def test_weighted_nll_token_vs_sequence_hand():
    assert float(SL.weighted_nll(LOGP, MASK, None, "token")) == pytest.approx(10 / 4)
    assert float(SL.weighted_nll(LOGP, MASK, None, "sequence")) == pytest.approx(3.0)
    w = np.array([0.5, 1.5])
    assert float(SL.weighted_nll(LOGP, MASK, w, "token")) == pytest.approx((0.5 * 6 + 1.5 * 4) / 4)
    assert float(SL.weighted_nll(LOGP, MASK, w, "sequence")) == pytest.approx((0.5 * 2 + 1.5 * 4) / 2)
    # an excluded example (mask row zeroed) leaves both denominators
    m2 = MASK.copy()
    m2[1] = False
    assert float(SL.weighted_nll(LOGP, m2, w, "sequence")) == pytest.approx(0.5 * 2)
    assert float(SL.weighted_nll(LOGP, m2, w, "token")) == pytest.approx(0.5 * 6 / 3)
    with pytest.raises(ValueError, match="averaging='tokens'"):
        SL.weighted_nll(LOGP, MASK, w, "tokens")


def test_soft_target_loss_hand():
    rng = np.random.default_rng(4)
    Bn, T, V, K = 2, 3, 6, 3
    s_logits = rng.normal(size=(Bn, T, V))
    s_logp = s_logits - np.log(np.exp(s_logits).sum(-1, keepdims=True))
    ids = np.stack([rng.permutation(V)[:K] for _ in range(Bn * T)]).reshape(Bn, T, K)
    t_logp = np.log(rng.dirichlet(np.ones(V), size=(Bn, T)))
    t_top = np.take_along_axis(t_logp, ids, -1)
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    w = np.array([2.0, 0.5])
    ce = np.zeros((Bn, T))
    for b in range(Bn):
        for t in range(T):
            p = np.exp(t_top[b, t]) / np.exp(t_top[b, t]).sum()
            ce[b, t] = -(p * s_logp[b, t, ids[b, t]]).sum()
    tok = (w[:, None] * ce * mask).sum() / mask.sum()
    seq = (w * (ce * mask).sum(1) / mask.sum(1)).mean()
    args = (jnp.asarray(s_logp, jnp.float32), ids, jnp.asarray(t_top, jnp.float32), mask, w)
    assert float(SL.soft_target_loss(*args, averaging="token")) == pytest.approx(tok, rel=1e-5)
    assert float(SL.soft_target_loss(*args, averaging="sequence")) == pytest.approx(seq, rel=1e-5)


# ---------------------------------------------------------------------------
# Degenerate traces
# ---------------------------------------------------------------------------


def test_degenerate_mask_hand():
    a, b, c, d = 1, 2, 3, 4
    pad = 0
    seqs = [
        [a, b, a, b, a, b, c, pad],  # bigram x3 -> drop (k=3)
        [a, b, a, b, a, c, d, pad],  # bigram x2.5 -> keep
        [c, c, c, d, a, b, pad, pad],  # unigram x3 -> drop
        [d, a, c, c, pad, pad, pad, pad],  # c c then padding zeros: the run is past len -> keep
        [a, b, c, d, 9, a, b, pad],  # junk id 9 -> drop
        [a, b, c, d, a, 9, pad, pad],  # junk after len=5 -> keep
        [a, b, c, d, a, b, c, d],  # 4-gram x2 only -> keep
    ]
    lens = [7, 7, 6, 4, 7, 5, 8]
    keep = TF.degenerate_mask(jnp.array(seqs), jnp.array(lens), min_repeats=3, junk_ids=(9,))
    np.testing.assert_array_equal(keep, [False, True, False, True, False, True, True])
    # a 3-gram repeated 3x is found only when n=3 is checked
    tri = jnp.array([[a, b, c, a, b, c, a, b, c, d]])
    assert not bool(TF.degenerate_mask(tri, jnp.array([10]), min_repeats=3)[0])
    assert bool(TF.degenerate_mask(tri, jnp.array([10]), max_repeat_ngram=2, min_repeats=3)[0])
    # the same 3-gram cut off by len before the third copy ends -> keep
    assert bool(TF.degenerate_mask(tri, jnp.array([8]), min_repeats=3)[0])


# ---------------------------------------------------------------------------
# Inverting PoE
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_invert_poe_recovers_teacher(tau):
    rng = np.random.default_rng(5)
    Bn, V, K = 3, 11, 4
    z_T = rng.normal(size=(Bn, V)) * 2
    z_P = rng.normal(size=(Bn, V)) * 2
    gamma = np.array([0.2, 0.5, 0.8])
    mixed = ((1 - gamma[:, None]) * z_T + gamma[:, None] * z_P) / tau
    logp_g = mixed - np.log(np.exp(mixed).sum(-1, keepdims=True))  # numpy PoE, float64
    lt = z_T - np.log(np.exp(z_T).sum(-1, keepdims=True))
    got = SL.invert_poe(jnp.asarray(logp_g, jnp.float32), jnp.asarray(z_P, jnp.float32), gamma, tau)
    np.testing.assert_allclose(got, lt, atol=1e-4)
    # top-k subset exposed by the API: recovers the teacher renormalised over those ids
    ids = np.argsort(-logp_g, axis=-1)[:, :K]

    def sub(a):
        return np.take_along_axis(a, ids, -1)

    got_k = SL.invert_poe(jnp.asarray(sub(logp_g), jnp.float32), jnp.asarray(sub(z_P), jnp.float32), gamma, tau)
    want_k = sub(z_T) - np.log(np.exp(sub(z_T)).sum(-1, keepdims=True))
    np.testing.assert_allclose(got_k, want_k, atol=1e-4)
    # not the identity: the defended distribution itself is far from the teacher's
    assert np.abs(logp_g - lt).max() > 0.1


def test_invert_poe_validation():
    with pytest.raises(ValueError, match="gamma=1.0"):
        SL.invert_poe(jnp.zeros((1, 3)), jnp.zeros((1, 3)), 1.0)
    with pytest.raises(ValueError, match="temperature=0"):
        SL.invert_poe(jnp.zeros((1, 3)), jnp.zeros((1, 3)), 0.5, 0)


# ---------------------------------------------------------------------------
# Attacker recipes (Recipe, recipe_loss, dataset_weights)
# ---------------------------------------------------------------------------


def test_reference_recipe_scores_are_minus_design_values_up_to_bf16_rounding():
    # Constructed so that only the bf16 rounding of the two losses can differ from -v:
    # quadratic losses (the central difference is exact), θ = 0 and g a vector of powers of
    # two (θ ± εg is exact in bf16), losses computed in float32 from the exact point.
    theta = jnp.zeros(3, jnp.float32)
    g = jnp.array([1.0, -0.5, 0.25], jnp.float32)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=64) * 3, jnp.float32)
    v = np.asarray(EV.example_values(sq_losses, theta, g, x, y))
    a = np.asarray(S.recipe_scores(S.REFERENCE_RECIPE, sq_losses, theta, g, x, y))
    np.testing.assert_array_equal(a, EV.example_values_reference_code_compat(sq_losses, theta, g, x, y, eps=0.01))
    eps = float(jnp.asarray(0.01, jnp.bfloat16))  # the step actually taken
    lp = np.asarray(sq_losses(theta + eps * g, x, y), np.float64)
    lm = np.asarray(sq_losses(theta - eps * g, x, y), np.float64)
    u = 2.0**-8  # bf16 unit roundoff (8 significant bits)
    bound = u * (np.abs(lp) + np.abs(lm)) / (2 * eps) * 1.01 + 2 * u * np.abs(v) + 1e-6
    assert np.all(np.abs(a + v) <= bound)
    # ... and that rounding is not a nicety: it is exactly the quantisation the paper's weights show
    assert np.mean(a == 0) > 0.1 and np.all(v != 0)
    assert len(np.unique(a)) < 0.6 * len(np.unique(v))
    # in float32 the same recipe is -v to O(float32) (the difference is exact for a quadratic)
    a32 = S.recipe_scores(dataclasses.replace(S.REFERENCE_RECIPE, fd_dtype="float32"), sq_losses, theta, g, x, y)
    np.testing.assert_allclose(a32, -v, rtol=2e-3, atol=2e-3)
    # the design's sign, same precision: +v
    flip = dataclasses.replace(S.REFERENCE_RECIPE, sign=1)
    np.testing.assert_array_equal(S.recipe_scores(flip, sq_losses, theta, g, x, y), -a)


def test_recipe_weights_closed_forms():
    a = np.array([0.4, -2.0, 30.0, 0.0, -15.0, 1.0])
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    # reference: clamp to ±10, exp(β a), mean 1 over the valid, no cap, no standardisation
    want = np.exp(0.5 * np.clip(a, -10, 10)) * mask
    want = want / want[mask].mean()
    np.testing.assert_allclose(S.recipe_weights(S.REFERENCE_RECIPE, a, 0.5, mask), want, rtol=1e-5)
    # one-sided filter on standardised scores: min(1, exp(β a / std)), never renormalised
    filt = S.Recipe(weighting="filter", standardize=True)
    std = a[mask].std()
    want_f = np.minimum(1.0, np.exp(1.5 * a / std)) * mask
    got_f = np.asarray(S.recipe_weights(filt, a, 1.5, mask))
    np.testing.assert_allclose(got_f, want_f, rtol=1e-5, atol=1e-30)
    assert got_f.max() <= 1.0 and got_f[mask].mean() < 1.0  # it only ever down-weights
    # passive: ones on the valid examples
    np.testing.assert_array_equal(S.recipe_weights(S.PASSIVE_RECIPE, a, 3.0, mask), mask.astype(np.float32))
    # design: the old adaptive_weights call
    design = S.Recipe(standardize=True, max_weight=5.0)
    np.testing.assert_allclose(
        S.recipe_weights(design, a, 1.0, mask),
        EW.adaptive_weights(a, 1.0, max_weight=5.0, mask_b=mask, standardize=True),
        rtol=1e-6,
    )


def test_shuffled_weights_keep_the_multiset():
    rng = np.random.default_rng(11)
    w = rng.exponential(size=20).astype(np.float32)
    mask = rng.random(20) < 0.7
    w = np.where(mask, w, 0.0).astype(np.float32)
    moved = 0
    for trial in range(4):
        s = np.asarray(EW.shuffle_weights(w, mask, rng.random(20)))
        np.testing.assert_array_equal(np.sort(s[mask]), np.sort(w[mask]))  # same multiset on the valid examples
        assert np.all(s[~mask] == 0)
        moved += np.sum(s != w)
    assert moved > 20  # really permuted


def test_ess_fraction_closed_forms():
    assert float(EW.ess_fraction(np.ones(8))) == pytest.approx(1.0)
    assert float(EW.ess_fraction(np.array([4.0, 0, 0, 0]))) == pytest.approx(0.25)
    w = np.array([2.0, 1.0, 1.0, 0.0, 7.0])
    m = np.array([1, 1, 1, 1, 0], bool)
    assert float(EW.ess_fraction(w, m)) == pytest.approx(16 / (4 * 6))


def _toy_token_problem(seed=0, B=6, T=4):
    """Token losses of a per-position logistic model: loss_bt = softplus(-y_bt (x_bt·θ))."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    y = jnp.asarray(rng.choice([-1.0, 1.0], size=(B, T)), jnp.float32)
    mask = np.ones((B, T), np.float32)
    mask[0, 2:] = 0
    mask[3] = 0  # an example with no target tokens
    mask = jnp.asarray(mask)
    theta = jnp.asarray(rng.normal(size=D), jnp.float32)

    def token_loss(th, x=x, y=y, mask=mask):
        return (jax.nn.softplus(-y * (x @ th)), mask)

    return theta, x, y, mask, token_loss


def test_recipe_loss_per_batch_equals_hand_assembly():
    theta, x, y, mask, token_loss = _toy_token_problem()
    xh, yh = x[:2] * 0.5 + 0.1, -y[:2]

    def held(th):
        return jnp.mean(jax.nn.softplus(-yh * (xh @ th)))

    g = jax.grad(held)(theta)

    def per_ex(th):
        return SL.sequence_nll(-token_loss(th)[0], mask)

    v = EV.example_values(per_ex, theta, g)
    mask_b = np.asarray(mask.sum(-1) > 0)
    for recipe, beta in [
        (S.Recipe(averaging="sequence", max_weight=2.0), 1.0),
        (S.Recipe(weighting="filter"), 2.0),
        (S.Recipe(averaging="token", standardize=False, max_weight=None, sign=-1), 3.0),
    ]:
        w = S.recipe_weights(recipe, recipe.sign * v, beta, mask_b)
        want = SL.weighted_nll(-token_loss(theta)[0], mask, w, recipe.averaging)
        loss, aux = S.recipe_loss(recipe, beta, token_loss, theta, heldout_loss_fn=held)
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        np.testing.assert_allclose(aux["ess_fraction"], EW.ess_fraction(w, mask_b), rtol=1e-6)
        assert float(aux["ess_fraction"]) < 1.0
        # weights carry no gradient: ∇loss = Σ w_i ∇ℓ_i / n with w held fixed
        grad = jax.grad(lambda th: S.recipe_loss(recipe, beta, token_loss, th, heldout_loss_fn=held)[0])(theta)
        want_grad = jax.grad(lambda th: SL.weighted_nll(-token_loss(th)[0], mask, w, recipe.averaging))(theta)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    # passive: the plain token mean, ESS 1
    loss, aux = S.recipe_loss(S.PASSIVE_RECIPE, 5.0, token_loss, theta)
    np.testing.assert_allclose(loss, SL.weighted_nll(-token_loss(theta)[0], mask), rtol=1e-6)
    assert float(aux["ess_fraction"]) == 1.0
    # precomputed (dataset-level) weights are used as given
    w_given = jnp.arange(6, dtype=jnp.float32)
    loss, _ = S.recipe_loss(S.REFERENCE_RECIPE, 0.5, token_loss, theta, weights_b=w_given)
    want = np.sum(np.asarray(w_given) * np.asarray(per_ex(theta))) / 5  # Σ w ℓ / #examples with tokens
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_dataset_gradient_and_weights_match_whole_set():
    rng = np.random.default_rng(2)
    N, T = 11, 3  # not a multiple of the chunk: padding must not count
    data = {
        "x": jnp.asarray(rng.normal(size=(N, T, D)), jnp.float32),
        "y": jnp.asarray(rng.choice([-1.0, 1.0], size=(N, T)), jnp.float32),
        "m": jnp.asarray((rng.random((N, T)) < 0.8).astype(np.float32)),
    }
    theta = jnp.asarray(rng.normal(size=D), jnp.float32)

    def tok(th, r):
        return jax.nn.softplus(-r["y"] * (r["x"] @ th)) * r["m"]

    def sum_loss(th, r):
        return (jnp.sum(tok(th, r)), jnp.sum(r["m"]))

    g = S.dataset_gradient(sum_loss, theta, data, chunk=4)
    want_g = jax.grad(lambda th: jnp.sum(tok(th, data)) / jnp.sum(data["m"]))(theta)
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-7)

    def per_ex(th, r):
        return SL.sequence_nll(-tok(th, r), r["m"])

    mask_n = np.asarray(data["m"].sum(-1) > 0)
    for recipe in (S.Recipe(refresh_every=0), dataclasses.replace(S.REFERENCE_RECIPE, fd_dtype="float32")):
        w = S.dataset_weights(recipe, 1.0, per_ex, theta, g, data, mask_n, chunk=4)
        a = S.recipe_scores(recipe, per_ex, theta, g, data)
        np.testing.assert_allclose(w, S.recipe_weights(recipe, a, 1.0, mask_n), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(w)[mask_n].mean(), 1.0, rtol=1e-5)
    sh = S.dataset_weights(
        dataclasses.replace(S.Recipe(refresh_every=0), shuffle=True),
        1.0,
        per_ex,
        theta,
        g,
        data,
        mask_n,
        chunk=4,
        shuffle_u_n=rng.random(N),
    )
    w = S.dataset_weights(S.Recipe(refresh_every=0), 1.0, per_ex, theta, g, data, mask_n, chunk=4)
    np.testing.assert_allclose(np.sort(np.asarray(sh)), np.sort(np.asarray(w)), rtol=1e-6)


def test_recipe_validation():
    S.REFERENCE_RECIPE.validate()
    for bad, key in [
        (dict(weighting="soft"), "weighting"),
        (dict(sign=0), "sign"),
        (dict(value="grad"), "value"),
        (dict(refresh_every=-1), "refresh_every"),
        (dict(max_weight=0.5), "max_weight"),
        (dict(fd_dtype="int8"), "fd_dtype"),
        (dict(averaging="tokens"), "averaging"),
    ]:
        with pytest.raises(ValueError, match=f"r.{key}="):
            S.Recipe(**bad).validate("r")
