"""Tests for game/defenses.py: every check compares against an independent
closed form (numpy, float64) or finite differences, never the code's output."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from game import defenses as D
from game import example_values as EV

B, V = 3, 7


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    z_T = (2.0 * rng.normal(size=(B, V))).astype(np.float32)
    z_P = (2.0 * rng.normal(size=(B, V))).astype(np.float32)
    return z_T, z_P


# ---------------------------------------------------------------------------
# PoE
# ---------------------------------------------------------------------------


def test_poe_gamma0_equals_standard(logits):
    z_T, z_P = logits
    for tau in (1.0, 0.6):
        a = D.PoE(0.0, tau).logits((z_T, z_P), ())
        b = D.Standard(tau).logits((z_T,), ())
        chex.assert_shape(a, (B, V))
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-6)
        np.testing.assert_allclose(b, z_T / tau, rtol=1e-6)


def test_poe_tau1_is_suppression_by_knowledge_gap(logits):
    z_T, z_P = logits
    gamma = 0.65
    lt, lp = np_log_softmax(z_T), np_log_softmax(z_P)
    p = np.exp(lt) * np.exp(-gamma * (lt - lp))
    p /= p.sum(-1, keepdims=True)
    got = np.exp(np.asarray(D.poe_logprobs(z_T, z_P, gamma, 1.0)))
    np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-7)
    # combiner logits give the same distribution
    comb = D.PoE(gamma).logits((z_T, z_P), ())
    np.testing.assert_allclose(np.exp(np_log_softmax(comb)), p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_poe_temperature_formula(logits, tau):
    z_T, z_P = logits
    gamma = 0.3
    want = np_log_softmax(((1 - gamma) * z_T.astype(np.float64) + gamma * z_P) / tau)
    got = D.poe_logprobs(z_T, z_P, gamma, tau)
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(np_log_softmax(D.PoE(gamma, tau).logits((z_T, z_P), ())), want, atol=2e-6)


def test_poe_per_row_gamma_and_gradient_in_gamma(logits):
    z_T, z_P = logits
    gam = jnp.array([0.0, 0.4, 0.9])
    got = D.poe_logprobs(z_T, z_P, gam, 0.8)
    for i in range(B):
        want = np_log_softmax(((1 - gam[i]) * z_T[i] + gam[i] * z_P[i]) / 0.8)
        np.testing.assert_allclose(got[i], want, atol=2e-6)
    # d/dγ of log p_γ(v) at τ=1 is (z_P - z_T)_v - E_pγ[z_P - z_T]
    g0, v = 0.3, 2
    grad = jax.grad(lambda g: D.poe_logprobs(z_T, z_P, g, 1.0)[0, v])(g0)
    d = z_P[0].astype(np.float64) - z_T[0]
    p = np.exp(np_log_softmax((1 - g0) * z_T[0] + g0 * z_P[0].astype(np.float64)))
    np.testing.assert_allclose(grad, d[v] - (p * d).sum(), rtol=1e-4)


def test_vocab_mismatch_refused():
    with pytest.raises(ValueError, match="vocabulary"):
        D.poe_logprobs(jnp.zeros((2, 5)), jnp.zeros((2, 6)), 0.5)
    with pytest.raises(ValueError, match="vocabulary"):
        D.PoE(0.5).logits((jnp.zeros((2, 5)), jnp.zeros((2, 6))), ())


# ---------------------------------------------------------------------------
# Strategic PoE
# ---------------------------------------------------------------------------


def test_strategic_poe_hand_computed_three_steps():
    # Fixed per-step distributions: p_T = [0.8, 0.2], p_P = [0.4, 0.6].
    # Emitting token 0 adds log(0.8/0.4) = log 2; token 1 adds log(0.2/0.6) = -log 3.
    z_T = jnp.log(jnp.array([[0.8, 0.2], [0.8, 0.2]]))
    z_P = jnp.log(jnp.array([[0.4, 0.6], [0.4, 0.6]]))
    comb = D.StrategicPoE(gamma=0.2, eta=1.0, gamma_max=0.7, temperature=1.0)
    tokens = [jnp.array([0, 1]), jnp.array([0, 1]), jnp.array([1, 0])]
    # row 0: s = 0, log2, 2log2, 2log2-log3 -> γ = .2, .4, .8 -> clip .7, .2*4/3
    # row 1: s = 0, -log3, -2log3, -2log3+log2 -> γ = .2, .2/3, .2/9, .4/9
    want_gamma = [
        [0.2, 0.2],
        [0.4, 0.2 / 3],
        [0.7, 0.2 / 9],
        [0.2 * 4 / 3, 0.4 / 9],
    ]
    carry = comb.init(2)
    chex.assert_shape(carry, (2,))
    assert carry.dtype == jnp.float32
    for step in range(4):
        np.testing.assert_allclose(comb.strength(carry), want_gamma[step], rtol=1e-5)
        lg = comb.logits((z_T, z_P), carry)
        for i in range(2):
            g = want_gamma[step][i]
            want = np_log_softmax((1 - g) * np.log([0.8, 0.2]) + g * np.log([0.4, 0.6]))
            np.testing.assert_allclose(np_log_softmax(lg[i]), want, atol=1e-5)
        if step < 3:
            carry = comb.update((z_T, z_P), carry, tokens[step])
    np.testing.assert_allclose(carry, [2 * math.log(2) - math.log(3), -2 * math.log(3) + math.log(2)], rtol=1e-5)


def test_strategic_increment_ignores_temperature(logits):
    z_T, z_P = logits
    tok = jnp.array([0, 3, 6])
    lt, lp = np_log_softmax(z_T), np_log_softmax(z_P)
    want = lt[np.arange(B), tok] - lp[np.arange(B), tok]
    for tau in (1.0, 0.3):
        comb = D.StrategicPoE(0.5, 1.0, 0.9, temperature=tau)
        np.testing.assert_allclose(comb.update((z_T, z_P), comb.init(B), tok), want, rtol=1e-5)


def test_strategic_poe_eta0_equals_poe(logits):
    rng = np.random.default_rng(1)
    comb, poe = D.StrategicPoE(0.4, 0.0, 0.9, 0.7), D.PoE(0.4, 0.7)
    carry = comb.init(B)
    for _ in range(3):
        outs = tuple(jnp.asarray(rng.normal(size=(B, V)), jnp.float32) for _ in range(2))
        np.testing.assert_allclose(comb.logits(outs, carry), poe.logits(outs, ()), rtol=1e-6)
        carry = comb.update(outs, carry, jnp.asarray(rng.integers(0, V, size=B)))
    assert np.all(np.abs(np.asarray(carry)) > 0)  # s did move; η=0 made it irrelevant


# ---------------------------------------------------------------------------
# ADS with a tiny MLP proxy
# ---------------------------------------------------------------------------

D_IN, H = 4, 8


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def np_mlp(params, x):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h = np.tanh(np.asarray(x, np.float64) @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def heldout_nll(params, x, y):
    lp = jax.nn.log_softmax(mlp(params, x), axis=-1)
    return -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=-1))


@pytest.fixture(scope="module")
def proxy():
    rng = np.random.default_rng(2)

    def f(*s):
        return jnp.asarray(rng.normal(size=s), jnp.float32)

    params = {"w1": f(D_IN, H), "b1": 0.1 * f(H), "w2": f(H, V), "b2": 0.1 * f(V)}
    x_ho, y_ho = f(16, D_IN), jnp.asarray(rng.integers(0, V, size=16))
    g = EV.heldout_gradient(heldout_nll, params, x_ho, y_ho)
    x = f(B, D_IN)  # the current decoding contexts
    z_T = 2.0 * f(B, V)
    return params, g, x, x_ho, y_ho, z_T


def _tangent_expert(params, g, x):
    return jax.jvp(lambda p: mlp(p, x), (params,), (g,))


def test_ads_delta_matches_float64_central_differences(proxy):
    params, g, x, *_ = proxy
    z, dz = _tangent_expert(params, g, x)
    delta = D.ads_delta(z, dz)
    eps = 1e-5
    plus = {k: np.asarray(params[k], np.float64) + eps * np.asarray(g[k], np.float64) for k in params}
    minus = {k: np.asarray(params[k], np.float64) - eps * np.asarray(g[k], np.float64) for k in params}
    fd = (np_log_softmax(np_mlp(plus, x)) - np_log_softmax(np_mlp(minus, x))) / (2 * eps)
    assert np.linalg.norm(delta - fd) / np.linalg.norm(fd) < 1e-4
    # Δ is a difference of log-probs under a normalised family: E_p[Δ] = 0
    p = np.exp(np_log_softmax(np.asarray(z)))
    np.testing.assert_allclose((p * np.asarray(delta)).sum(-1), 0.0, atol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_ads_combiner_closed_form(proxy, tau):
    params, g, x, *_, z_T = proxy
    z, dz = _tangent_expert(params, g, x)
    lam = 0.7
    p = np.exp(np_log_softmax(np.asarray(z)))
    delta = np.asarray(dz, np.float64) - (p * np.asarray(dz)).sum(-1, keepdims=True)
    want = np.asarray(z_T, np.float64) / tau + lam * delta  # τ on the teacher only
    got = D.ADS(lam, tau).logits((z_T, (z, dz)), ())
    chex.assert_shape(got, (B, V))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # λ = 0 is Standard
    np.testing.assert_allclose(
        D.ADS(0.0, tau).logits((z_T, (z, dz)), ()), D.Standard(tau).logits((z_T,), ()), rtol=1e-6
    )


def test_ads_finite_difference_matches_ads(proxy):
    params, g, x, *_, z_T = proxy
    gn = jnp.sqrt(sum(jnp.sum(v**2) for v in g.values()))
    g = {k: v / gn for k, v in g.items()}  # unit direction: ε has a scale
    z, dz = _tangent_expert(params, g, x)
    eps = 1e-2
    zp = mlp({k: params[k] + eps * g[k] for k in params}, x)
    zm = mlp({k: params[k] - eps * g[k] for k in params}, x)
    a = D.ADS(1.5, 0.8).logits((z_T, (z, dz)), ())
    b = D.ADSFiniteDifference(1.5, 0.8, eps).logits((z_T, zp, zm), ())
    np.testing.assert_allclose(a, b, atol=2e-3)
    delta_fd = D.ads_delta_finite_difference(zp, zm, eps)
    assert np.linalg.norm(delta_fd - D.ads_delta(z, dz)) < 1e-2 * np.linalg.norm(D.ads_delta(z, dz))


def test_ads_favours_tokens_that_raise_proxy_heldout_loss(proxy):
    params, g, x, x_ho, y_ho, z_T = proxy
    z, dz = _tangent_expert(params, g, x)
    delta = np.asarray(D.ads_delta(z, dz))
    # g really is an ascent direction of the held-out loss
    L0 = heldout_nll(params, x_ho, y_ho)
    assert heldout_nll({k: params[k] + 1e-3 * g[k] for k in params}, x_ho, y_ho) > L0
    # λ > 0 shifts mass towards Δ > 0: E_ADS[Δ] > E_T[Δ], and the log-ratio is λΔ + const
    lam = 0.5
    p_T = np.exp(np_log_softmax(z_T))
    p_A = np.exp(np_log_softmax(D.ADS(lam).logits((z_T, (z, dz)), ())))
    shift = ((p_A - p_T) * delta).sum(-1)
    assert np.all(shift > 0), shift
    ratio = np.log(p_A / p_T)
    np.testing.assert_allclose(
        ratio - ratio.mean(-1, keepdims=True), lam * (delta - delta.mean(-1, keepdims=True)), atol=1e-4
    )
    # Behaviour: one proxy SGD step on the most-favoured token raises the
    # held-out loss; on the least-favoured token it lowers it.
    for i in range(B):
        for v, sign in ((int(delta[i].argmax()), +1), (int(delta[i].argmin()), -1)):

            def nll_v(p):
                return -jax.nn.log_softmax(mlp(p, x[i : i + 1]))[0, v]

            gv = jax.grad(nll_v)(params)
            stepped = {k: params[k] - 1e-3 * gv[k] for k in params}
            assert sign * (heldout_nll(stepped, x_ho, y_ho) - L0) > 0


def test_ads_is_suppression_by_example_value(proxy):
    """docs/design.md: p_def ∝ p_T · exp(-λ · value); for a one-token example v the
    value ⟨∇(-log p_P(v)), g⟩ (game.students.example_values) equals -Δ(v)."""
    params, g, x, *_ = proxy
    z, dz = _tangent_expert(params, g, x)
    delta = D.ads_delta(z, dz)

    def per_token_loss(p, xi):
        return -jax.nn.log_softmax(mlp(p, xi[None]))[0]  # [V]: loss of each token

    for i in range(B):
        values = EV.example_values(per_token_loss, params, g, x[i])
        np.testing.assert_allclose(values, -delta[i], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Strategic ADS
# ---------------------------------------------------------------------------


def test_strategic_ads_hand_computed_and_uses_primal(proxy):
    params, g, x, *_, z_T = proxy
    z, dz = _tangent_expert(params, g, x)
    comb = D.StrategicADS(lam=0.5, eta=1.0, lam_max=1.0, temperature=0.9)
    carry = comb.init(B)
    np.testing.assert_allclose(
        comb.logits((z_T, (z, dz)), carry), D.ADS(0.5, 0.9).logits((z_T, (z, dz)), ()), rtol=1e-6
    )
    tok = jnp.array([0, 1, 2])
    carry = comb.update((z_T, (z, dz)), carry, tok)
    s = np_log_softmax(z_T)[np.arange(B), tok] - np_log_softmax(z)[np.arange(B), tok]
    np.testing.assert_allclose(carry, s, rtol=1e-5, atol=1e-6)
    lam_t = np.clip(0.5 * np.exp(s), 0.0, 1.0)
    np.testing.assert_allclose(comb.strength(carry), lam_t, rtol=1e-5)
    p = np.exp(np_log_softmax(np.asarray(z)))
    delta = np.asarray(dz, np.float64) - (p * np.asarray(dz)).sum(-1, keepdims=True)
    want = np.asarray(z_T, np.float64) / 0.9 + lam_t[:, None] * delta
    np.testing.assert_allclose(comb.logits((z_T, (z, dz)), carry), want, rtol=1e-5, atol=1e-5)
    # η = 0 is ADS whatever the carry
    c0 = D.StrategicADS(0.5, 0.0, 1.0, 0.9)
    np.testing.assert_allclose(c0.logits((z_T, (z, dz)), carry), D.ADS(0.5, 0.9).logits((z_T, (z, dz)), ()), rtol=1e-6)


def test_strategic_clip_at_lam_max():
    s = jnp.array([-10.0, 0.0, 0.5, 1.0, 100.0])
    want = [0.5 * math.exp(-10), 0.5, 0.5 * math.exp(0.5), 1.0, 1.0]  # 0.5e > 1 -> clipped
    np.testing.assert_allclose(D.strategic_strength(0.5, 1.0, s, 1.0), want, rtol=1e-6)


# ---------------------------------------------------------------------------
# Combiners under jit; top-k; validation
# ---------------------------------------------------------------------------


def test_combiners_are_static_and_jittable(logits):
    z_T, z_P = logits
    assert D.PoE(0.5, 0.7) == D.PoE(0.5, 0.7) and hash(D.PoE(0.5, 0.7)) == hash(D.PoE(0.5, 0.7))
    assert jax.tree_util.tree_leaves(D.StrategicPoE(0.5, 1.0, 0.9)) == []

    @jax.jit
    def step(comb, outs, carry, tok):
        return comb.logits(outs, carry), comb.update(outs, carry, tok)

    for comb in (D.PoE(0.5, 0.7), D.StrategicPoE(0.5, 1.0, 0.9, 0.7)):
        carry = comb.init(B)
        lg, carry2 = step(comb, (z_T, z_P), carry, jnp.zeros((B,), jnp.int32))
        np.testing.assert_allclose(lg, comb.logits((z_T, z_P), carry), rtol=1e-6)
        chex.assert_trees_all_equal_shapes(carry, carry2)


def test_topk_logprobs(logits):
    z_T, _ = logits
    vals, ids = D.topk_logprobs(z_T, 3)
    chex.assert_shape([vals, ids], (B, 3))
    assert ids.dtype == jnp.int32
    lp = np_log_softmax(z_T)
    want_ids = np.argsort(-lp, axis=-1)[:, :3]
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(vals, np.take_along_axis(lp, want_ids, -1), atol=1e-6)


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda: D.PoE(1.2), "PoE gamma=1.2 must be in [0, 1)"),
        (lambda: D.PoE(-0.1), "PoE gamma=-0.1"),
        (lambda: D.PoE(0.5, temperature=0.0), "temperature=0.0"),
        (lambda: D.Standard(-1.0), "temperature=-1.0"),
        (lambda: D.ADS(-0.5), "lam=-0.5"),
        (lambda: D.ADSFiniteDifference(0.5, 1.0, eps=0.0), "eps=0.0"),
        (lambda: D.StrategicPoE(0.5, 1.0, gamma_max=1.0), "gamma_max=1.0"),
        (lambda: D.StrategicPoE(1.0, 1.0, gamma_max=0.9), "gamma=1.0"),
        (lambda: D.StrategicADS(0.5, 1.0, lam_max=-1.0), "lam_max=-1.0"),
        (lambda: D.StrategicADS(0.5, float("nan"), lam_max=1.0), "eta=nan"),
    ],
)
def test_validation_names_parameter(make, msg):
    with pytest.raises(ValueError) as e:
        make()
    assert msg in str(e.value)
