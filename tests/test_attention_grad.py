"""The attention fast paths against an independent definition: the 3-D batched-matmul layout, the hand-written
(reverse-mode-only) backward, and the static rotary tables / causal mask of a full-sequence forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import transformer as tfm


def reference_attention(q_btnh, k_bksh, v_bksh, mask_bts):
    """Softmax attention from its definition, one query head at a time (head i reads KV head i // (N/K))."""
    n, kv, h = q_btnh.shape[2], k_bksh.shape[1], q_btnh.shape[3]
    outs = []
    for i in range(n):
        j = i // (n // kv)
        scores_bts = jnp.einsum("bth,bsh->bts", q_btnh[:, :, i], k_bksh[:, j]) / np.sqrt(h)
        scores_bts = jnp.where(mask_bts, scores_bts, -1e30)
        weights = jnp.exp(scores_bts - scores_bts.max(-1, keepdims=True))
        weights = weights / weights.sum(-1, keepdims=True)
        outs.append(jnp.einsum("bts,bsh->bth", weights, v_bksh[:, j]))
    return jnp.stack(outs, axis=2)


def _inputs(n=4, kv=2, b=3, t=9, h=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kv, t, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kv, t, h)), jnp.float32)
    valid = np.ones((b, t), bool)
    valid[1, :3] = False  # a left-padded row: its keys before slot 3 are masked
    causal = np.tril(np.ones((t, t), bool))
    mask = causal[None] & valid[:, None, :]
    mask[1, :3, 0] = (
        True  # padded queries see one key, so no row is empty (as the sampler's prefill never is for real rows)
    )
    return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("n,kv", [(4, 2), (2, 2), (4, 1)])
def test_attend_and_its_reverse_only_gradient_match_the_definition(n, kv):
    q, k, v, mask = _inputs(n, kv)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)  # a loss that weighs every output

    def ref_loss(q, k, v):
        return jnp.sum(jnp.tanh(reference_attention(q, k, v, mask)) * w)

    def loss(q, k, v):
        return jnp.sum(jnp.tanh(tfm.attend(q, k, v, mask)) * w)

    def fast_grad(q, k, v):
        with tfm.reverse_mode_only():
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    np.testing.assert_allclose(tfm.attend(q, k, v, mask), reference_attention(q, k, v, mask), atol=2e-6)
    want = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
    for got in (jax.grad(loss, argnums=(0, 1, 2))(q, k, v), jax.jit(fast_grad)(q, k, v)):
        for g, r in zip(got, want):
            np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)


def test_reverse_only_attention_refuses_forward_mode():
    q, k, v, mask = _inputs()

    def jvp_inside():
        with tfm.reverse_mode_only():
            return jax.jvp(lambda q: tfm.attend(q, k, v, mask), (q,), (jnp.ones_like(q),))

    with pytest.raises(TypeError):
        jvp_inside()
    jax.jvp(lambda q: tfm.attend(q, k, v, mask), (q,), (jnp.ones_like(q),))  # outside the context: plain autodiff


def test_model_gradient_is_the_same_with_the_hand_written_backward():
    cfg = tfm.ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    graphdef, params = tfm.split_params(tfm.build(cfg, 23, seed=0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, 23, (4, 12)), jnp.int32)

    def nll(p):
        return -jnp.mean(tfm.token_logprobs(graphdef, p, tokens))

    plain = jax.grad(nll)(params)
    with tfm.reverse_mode_only():
        fast = jax.jit(jax.grad(nll))(params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fast)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(plain)) > 1e-3  # the comparison is not of zeros


def test_full_sequence_forward_equals_explicit_positions_and_mask():
    """forward() without positions/mask (static rotary tables and causal mask) = the traced general path."""
    cfg = tfm.ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    graphdef, params = tfm.split_params(tfm.build(cfg, 23, seed=0))
    tokens = jnp.asarray(np.random.default_rng(3).integers(3, 23, (2, 10)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    mask = tfm.causal_mask(jnp.ones((2, 10), bool))
    explicit = jax.jit(lambda p, x, pos, m: tfm.forward(graphdef, p, x, pos, m)[0])(params, tokens, positions, mask)
    static = jax.jit(lambda p, x: tfm.forward(graphdef, p, x)[0])(params, tokens)
    np.testing.assert_allclose(static, explicit, atol=1e-5)
