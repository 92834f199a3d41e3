"""The degeneracy filter: which teacher traces an attacker drops before training (a trace that repeats one n-gram
back to back, or holds a junk token). Dropped examples get their loss-mask row zeroed (``weighted_nll``).

Pure JAX; no I/O, no dependence on ``models`` or ``experiments``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["degenerate_mask"]


def degenerate_mask(
    tokens_bt: jax.Array,
    lens_b: jax.Array,
    *,
    max_repeat_ngram: int = 4,
    min_repeats: int = 8,
    junk_ids: Sequence[int] = (),
) -> jax.Array:
    """``keep_b`` (bool [B]): False for degenerate traces.

    A trace (its first ``lens_b`` tokens) is degenerate if

    * for some n in 1..``max_repeat_ngram``, some n-gram occurs
      ``min_repeats`` (k) times back to back, i.e. there is a window of
      ``n·k`` tokens with period n (``t[j] == t[j+n]`` for ``n·(k-1)``
      consecutive j, all inside the trace); or
    * it contains any token id in ``junk_ids``.

    Example (n=2, k=3): ``a b a b a b`` is degenerate, ``a b a b a c`` is not.
    """
    if max_repeat_ngram < 1 or min_repeats < 2:
        raise ValueError(
            f"degenerate_mask needs max_repeat_ngram >= 1 and min_repeats >= 2, got "
            f"max_repeat_ngram={max_repeat_ngram}, min_repeats={min_repeats}"
        )
    return _degenerate_mask(
        jnp.asarray(tokens_bt),
        jnp.asarray(lens_b, jnp.int32),
        int(max_repeat_ngram),
        int(min_repeats),
        tuple(int(i) for i in junk_ids),
    )


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _degenerate_mask(t, lens_b, max_repeat_ngram, min_repeats, junk_ids):
    B, T = t.shape
    lens = jnp.asarray(lens_b, jnp.int32)[:, None]
    pos = jnp.arange(T, dtype=jnp.int32)[None, :]
    bad = jnp.zeros((B,), bool)
    for n in range(1, max_repeat_ngram + 1):
        need = n * (min_repeats - 1)
        if need > T - n:
            break  # a window of n·k tokens does not fit
        eq = (t[:, :-n] == t[:, n:]) & (pos[:, :-n] + n < lens)  # [B, T-n]
        j = jnp.arange(T - n, dtype=jnp.int32)[None, :]
        last_break = jax.lax.cummax(jnp.where(eq, -1, j), axis=1)
        run = j - last_break  # length of the run of True ending at j
        bad = bad | jnp.any(run >= need, axis=1)
    if len(junk_ids):
        junk = jnp.isin(t, jnp.asarray(list(junk_ids), t.dtype)) & (pos < lens)
        bad = bad | jnp.any(junk, axis=1)
    return ~bad
