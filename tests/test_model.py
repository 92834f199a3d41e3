"""Transformer and sampler: cached decoding against full uncached forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import transformer as tfm
from models.sampling import ExpertSpec, Single, _top_p_filter, generate, greedy_uncached

CFG = tfm.ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
VOCAB = 23


@pytest.fixture(scope="module")
def model():
    graphdef, params = tfm.split_params(tfm.build(CFG, VOCAB, seed=0))
    # Sharpen the random model so greedy choices are not near-ties.
    params = jax.tree.map(lambda x: x * 1.5, params)
    return ExpertSpec(graphdef, CFG), params


def _prompts(seed=0, b=5, p=7):
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, p + 1, b).astype(np.int32)
    lens[0] = p
    prompts = np.zeros((b, p), np.int32)
    for i, n in enumerate(lens):
        prompts[i, p - n :] = rng.integers(3, VOCAB, n)
    return prompts, lens


def test_left_padding_does_not_change_logits(model):
    spec, params = model
    tokens = np.array([[5, 9, 4, 7]], np.int32)
    ref, _ = tfm.forward(spec.graphdef, params, tokens)
    padded = np.array([[0, 0, 0, 5, 9, 4, 7]], np.int32)
    valid = padded != 0
    positions = np.maximum(np.arange(7) - 3, 0)[None]
    out, _ = tfm.forward(spec.graphdef, params, padded, positions, tfm.causal_mask(jnp.asarray(valid)))
    np.testing.assert_allclose(out[0, 3:], ref[0], atol=1e-5)


def test_cached_greedy_equals_uncached_argmax_token_by_token(model):
    spec, params = model
    prompts, lens = _prompts()
    n = 12
    cached = generate(
        (spec,), (params,), prompts, lens, jax.random.key(0), combiner=Single(), max_new_tokens=n, eos_id=-1, pad_id=0
    )
    uncached = greedy_uncached(spec, params, prompts, lens, max_new_tokens=n, eos_id=-1, pad_id=0)
    np.testing.assert_array_equal(np.asarray(cached["tokens_bn"]), np.asarray(uncached))
    # Independent check, one row at a time without left padding: argmax of a full forward pass. The row is
    # right-padded to one width (one compiled forward); under the causal mask the padding after position
    # len(seq) - 1 cannot change its logits.
    width = prompts.shape[1] + n
    forward = jax.jit(lambda tokens_bt: tfm.forward(spec.graphdef, params, tokens_bt)[0])
    for row in range(len(lens)):
        seq = list(prompts[row, len(prompts[row]) - lens[row] :])
        for t in range(n):
            logits = forward(jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32))
            nxt = int(jnp.argmax(logits[0, len(seq) - 1]))
            assert nxt == int(cached["tokens_bn"][row, t]), (row, t)
            seq.append(nxt)


def test_cached_logprobs_match_full_forward(model):
    spec, params = model
    prompts, lens = _prompts(1, b=3)
    out = generate(
        (spec,),
        (params,),
        prompts,
        lens,
        jax.random.key(3),
        combiner=Single(),
        max_new_tokens=6,
        eos_id=-1,
        pad_id=0,
        greedy=False,
    )
    for row in range(3):
        seq = np.concatenate([prompts[row, prompts.shape[1] - lens[row] :], np.asarray(out["tokens_bn"][row])])
        logits, _ = tfm.forward(spec.graphdef, params, jnp.asarray(seq[None]))
        logp = jax.nn.log_softmax(logits[0], -1)
        want = [float(logp[lens[row] - 1 + t, seq[lens[row] + t]]) for t in range(6)]
        np.testing.assert_allclose(np.asarray(out["logprob_bn"][row]), want, atol=1e-4)


def test_eos_stops_and_pads(model):
    spec, params = model
    prompts, lens = _prompts(2)
    free = generate(
        (spec,), (params,), prompts, lens, jax.random.key(0), combiner=Single(), max_new_tokens=8, eos_id=-1, pad_id=0
    )
    eos = int(free["tokens_bn"][0, 2])  # make row 0's third token the EOS
    out = generate(
        (spec,), (params,), prompts, lens, jax.random.key(0), combiner=Single(), max_new_tokens=8, eos_id=eos, pad_id=0
    )
    tokens = np.asarray(out["tokens_bn"])
    for row in range(len(lens)):
        hits = np.flatnonzero(tokens[row] == eos)
        if hits.size:
            assert (tokens[row, hits[0] + 1 :] == 0).all()
            assert int(out["lengths_b"][row]) == hits[0] + 1
    assert int(out["lengths_b"][0]) <= 3


def test_seeded_sampling_is_reproducible(model):
    spec, params = model
    prompts, lens = _prompts(4)
    kw = dict(combiner=Single(temperature=1.5), max_new_tokens=10, eos_id=-1, pad_id=0, greedy=False, top_p=0.9)
    a = generate((spec,), (params,), prompts, lens, jax.random.key(7), **kw)["tokens_bn"]
    b = generate((spec,), (params,), prompts, lens, jax.random.key(7), **kw)["tokens_bn"]
    c = generate((spec,), (params,), prompts, lens, jax.random.key(8), **kw)["tokens_bn"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_top_p_keeps_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(_top_p_filter(logits, 0.7)))[0]
    np.testing.assert_array_equal(kept, [True, True, False, False])  # 0.5 < 0.7 <= 0.8
    kept = np.isfinite(np.asarray(_top_p_filter(logits, 0.5)))[0]
    np.testing.assert_array_equal(kept, [True, False, False, False])


def test_top_k_exposure_matches_distribution(model):
    spec, params = model
    prompts, lens = _prompts(5)
    out = generate(
        (spec,),
        (params,),
        prompts,
        lens,
        jax.random.key(0),
        combiner=Single(),
        max_new_tokens=4,
        eos_id=-1,
        pad_id=0,
        expose_k=3,
    )
    top = np.asarray(out["topk_logprob_bnk"])
    assert top.shape == (5, 4, 3)
    assert (np.diff(top, axis=-1) <= 0).all()  # sorted
    # Greedy: the emitted token is the top-1 id and its log-prob the top-1 value.
    np.testing.assert_array_equal(np.asarray(out["topk_ids_bnk"])[..., 0], np.asarray(out["tokens_bn"]))
    np.testing.assert_allclose(top[..., 0], np.asarray(out["logprob_bn"]), atol=1e-6)


def test_grouped_kv_heads_equal_repeated_full_heads():
    """GQA with k kv-heads equals multi-head attention whose kv weights repeat each group's head."""
    gqa_cfg = tfm.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)
    mha_cfg = tfm.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=64)
    g_def, g_params = tfm.split_params(tfm.build(gqa_cfg, VOCAB, 0))
    m_def, m_params = tfm.split_params(tfm.build(mha_cfg, VOCAB, 0))
    m_params = jax.tree.map(lambda x: x, g_params)
    attn = m_params["block_0"]["attn"]
    for name in ("wk_dkh", "wv_dkh"):
        attn[name] = jnp.repeat(g_params["block_0"]["attn"][name], 2, axis=1)
    tokens = jnp.asarray([[3, 4, 5, 6, 7]])
    a, _ = tfm.forward(g_def, g_params, tokens)
    b, _ = tfm.forward(m_def, m_params, tokens)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_flops_per_token_counts_matmul_params():
    cfg = tfm.ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, tied_embeddings=False)
    _, params = tfm.split_params(tfm.build(cfg, VOCAB, 0))
    matmul_params = tfm.param_count(params) - VOCAB * 32 - 32 * (2 * 2 + 1)  # minus embedding table and norm scales
    assert tfm.flops_per_token(cfg, VOCAB, context=0) == 2 * matmul_params
