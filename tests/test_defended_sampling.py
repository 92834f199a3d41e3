"""Defenses inside the real sampler, checked against full uncached forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from game import defenses as dfn
from models import transformer as tfm
from models.sampling import ExpertSpec, generate

VOCAB = 19
T_CFG = tfm.ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
P_CFG = tfm.ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)


@pytest.fixture(scope="module")
def experts():
    t_def, t_params = tfm.split_params(tfm.build(T_CFG, VOCAB, 0))
    p_def, p_params = tfm.split_params(tfm.build(P_CFG, VOCAB, 1))
    return ExpertSpec(t_def, T_CFG), t_params, ExpertSpec(p_def, P_CFG), p_params


def _prompts():
    prompts = np.array([[0, 0, 5, 6, 7], [3, 4, 5, 6, 8], [0, 9, 10, 11, 12]], np.int32)
    return prompts, np.array([3, 5, 4], np.int32)


def _full_logits(spec, params, seq):
    logits, _ = tfm.forward(spec.graphdef, params, jnp.asarray(seq[None]))
    return logits[0]


def test_poe_per_row_equals_static_poe(experts):
    t_spec, t_params, p_spec, p_params = experts
    prompts, lens = _prompts()
    kw = dict(max_new_tokens=6, eos_id=-1, pad_id=0, greedy=False)
    a = generate((t_spec, p_spec), (t_params, p_params), prompts, lens, jax.random.key(3), combiner=dfn.PoE(0.4), **kw)
    b = generate(
        (t_spec, p_spec),
        (t_params, p_params),
        prompts,
        lens,
        jax.random.key(3),
        combiner=dfn.PoEPerRow(),
        carry=jnp.full((3,), 0.4),
        **kw,
    )
    np.testing.assert_array_equal(np.asarray(a["tokens_bn"]), np.asarray(b["tokens_bn"]))
    np.testing.assert_allclose(np.asarray(a["logprob_bn"]), np.asarray(b["logprob_bn"]), atol=1e-6)


def test_poe_sampler_logprobs_match_formula_on_full_passes(experts):
    """Each emitted token's log-prob = log_softmax(((1-γ) z_T + γ z_P)/τ) from full forward passes."""
    t_spec, t_params, p_spec, p_params = experts
    prompts, lens = _prompts()
    gamma, tau, n = 0.6, 0.8, 5
    out = generate(
        (t_spec, p_spec),
        (t_params, p_params),
        prompts,
        lens,
        jax.random.key(0),
        combiner=dfn.PoE(gamma, tau),
        max_new_tokens=n,
        eos_id=-1,
        pad_id=0,
        greedy=False,
    )
    for row in range(3):
        seq = np.concatenate([prompts[row, 5 - lens[row] :], np.asarray(out["tokens_bn"][row])])
        z_t, z_p = _full_logits(t_spec, t_params, seq), _full_logits(p_spec, p_params, seq)
        logp = jax.nn.log_softmax(((1 - gamma) * z_t + gamma * z_p) / tau, -1)
        want = [float(logp[lens[row] - 1 + i, seq[lens[row] + i]]) for i in range(n)]
        np.testing.assert_allclose(np.asarray(out["logprob_bn"][row]), want, atol=1e-4)


def test_ads_tangent_through_cache_matches_finite_differences(experts):
    """ADS in the sampler: the JVP carried through the proxy's KV cache equals central finite
    differences of full forward passes of the perturbed proxy, at every generated position."""
    t_spec, t_params, p_spec, p_params = experts
    prompts, lens = _prompts()
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape) * 0.1, p_params)
    lam, tau, n, eps = 0.7, 1.3, 5, 1e-3
    tangent_spec = ExpertSpec(p_spec.graphdef, P_CFG, tangent=True)
    out = generate(
        (t_spec, tangent_spec),
        (t_params, p_params),
        prompts,
        lens,
        jax.random.key(0),
        combiner=dfn.ADS(lam, tau),
        max_new_tokens=n,
        eos_id=-1,
        pad_id=0,
        greedy=False,
        tangents=(None, g),
    )
    plus = jax.tree.map(lambda w, d: w + eps * d, p_params, g)
    minus = jax.tree.map(lambda w, d: w - eps * d, p_params, g)
    for row in range(3):
        seq = np.concatenate([prompts[row, 5 - lens[row] :], np.asarray(out["tokens_bn"][row])])
        z_t = _full_logits(t_spec, t_params, seq)
        delta = (
            jax.nn.log_softmax(_full_logits(p_spec, plus, seq), -1)
            - jax.nn.log_softmax(_full_logits(p_spec, minus, seq), -1)
        ) / (2 * eps)
        logp = jax.nn.log_softmax(z_t / tau + lam * delta, -1)
        want = [float(logp[lens[row] - 1 + i, seq[lens[row] + i]]) for i in range(n)]
        np.testing.assert_allclose(np.asarray(out["logprob_bn"][row]), want, atol=2e-3)


def test_strategic_poe_in_sampler_grows_gamma_along_sequence(experts):
    """With η > 0 the carry s_t accumulates log p_T − log p_P of emitted tokens; check against a replay."""
    t_spec, t_params, p_spec, p_params = experts
    prompts, lens = _prompts()
    comb = dfn.StrategicPoE(0.2, 0.5, 0.9)
    n = 4
    out = generate(
        (t_spec, p_spec),
        (t_params, p_params),
        prompts,
        lens,
        jax.random.key(1),
        combiner=comb,
        max_new_tokens=n,
        eos_id=-1,
        pad_id=0,
        greedy=False,
    )
    for row in range(3):
        seq = np.concatenate([prompts[row, 5 - lens[row] :], np.asarray(out["tokens_bn"][row])])
        lt = jax.nn.log_softmax(_full_logits(t_spec, t_params, seq), -1)
        lp = jax.nn.log_softmax(_full_logits(p_spec, p_params, seq), -1)
        s, want = 0.0, []
        for i in range(n):
            pos, tok = lens[row] - 1 + i, seq[lens[row] + i]
            gamma = float(np.clip(0.2 * np.exp(0.5 * s), 0, 0.9))
            mix = jax.nn.log_softmax(
                (1 - gamma) * _full_logits(t_spec, t_params, seq)[pos]
                + gamma * _full_logits(p_spec, p_params, seq)[pos]
            )
            want.append(float(mix[tok]))
            s += float(lt[pos, tok] - lp[pos, tok])
        np.testing.assert_allclose(np.asarray(out["logprob_bn"][row]), want, atol=1e-4)
