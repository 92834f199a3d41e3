"""The students' iterate average (protocol.distill.ema) against its closed form."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.iterate_average import IterateAverage


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_average_is_the_bias_corrected_weighted_mean_of_the_iterates(decay):
    rng = np.random.default_rng(0)
    iterates = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(7)]
    start = {"w": jnp.full((2, 3), 100.0), "b": jnp.zeros((), jnp.bfloat16)}  # the base must not leak in
    avg = IterateAverage(decay, start)
    for t, x in enumerate(iterates, 1):
        tree = {"w": jnp.asarray(x), "b": jnp.asarray(float(t), jnp.bfloat16)}
        avg.update(tree)
        w_k = np.array([(1 - decay) * decay ** (t - k) for k in range(1, t + 1)])
        np.testing.assert_allclose(w_k.sum(), 1 - decay**t)
        expect = np.tensordot(w_k, np.stack(iterates[:t]), axes=1) / (1 - decay**t)
        got = avg.value(tree)
        np.testing.assert_allclose(np.asarray(got["w"]), expect, rtol=1e-5, atol=1e-6)
        assert got["b"].dtype == jnp.bfloat16  # the average is kept in f32 and handed back in the params' dtype
        np.testing.assert_allclose(float(got["b"]), w_k @ np.arange(1, t + 1) / (1 - decay**t), rtol=1e-2)


def test_decay_zero_is_the_last_iterate():
    avg = IterateAverage(0.0, {"w": jnp.zeros(3)})
    for t in range(3):
        last = {"w": jnp.full(3, float(t))}
        avg.update(last)
    assert avg.value(last) is last
