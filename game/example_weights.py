"""Example weights: the adaptive student's ``w_i ∝ exp(β v_i)`` (capped, mean 1; β = 0 is the passive
student), the shuffled-weights control and the effective sample size of a set of weights (docs/design.md,
"Students"). How a recipe turns scores into these weights is ``game.students.recipe_weights``.

Pure JAX; no I/O, no dependence on ``models`` or ``experiments``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["adaptive_weights", "shuffle_weights", "ess_fraction"]

_LOG_FLOOR = -80.0  # exp(-80) ≈ 1.8e-35: still a normal float32


def adaptive_weights(
    v_b: jax.Array,
    beta: Any,
    *,
    max_weight: float | None = 10.0,
    mask_b: jax.Array | None = None,
    standardize: bool = False,
) -> jax.Array:
    """Adaptive-student example weights ``w_i ∝ exp(β v_i)``, capped, mean 1.

    Exact order:

    1. valid = ``mask_b`` (all True if None); n = #valid.
    2. if ``standardize``: ``v ← v / std(v over valid)`` (population std; left
       unchanged if that std is 0), so β is unitless. No centring is needed:
       a shift of v cancels in the normalisation.
    3. ``a_i = β v_i - max_valid(β v)``, floored at -80 (so no valid weight
       underflows to exactly 0); ``u_i = exp(a_i)``.
    4. ``w_i = min(c · u_i, max_weight)`` with the scalar ``c > 0`` chosen so
       that ``mean_valid(w) = 1`` (found exactly by sorting u). Without
       capping this is ``u / mean_valid(u)``. This is the fixed point of
       "normalise to mean 1, clip at max_weight, renormalise" repeated, so
       BOTH hold exactly: mean 1 and every weight ≤ max_weight (a single
       clip-then-renormalise pass can push clipped weights back above the
       cap). Requires ``max_weight ≥ 1``; ``max_weight=None`` disables the cap.
    5. invalid examples get weight 0; if n = 0 all weights are 0.

    β = 0 gives exactly 1 for every valid example (the passive student);
    β < 0 reverses the preference. Returns float32 [B].
    """
    v = jnp.asarray(v_b, jnp.float32)
    if v.ndim != 1:
        raise ValueError(f"adaptive_weights expects v_b of shape [B], got {v.shape}")
    if max_weight is not None and not (max_weight >= 1.0):
        raise ValueError(f"adaptive_weights max_weight={max_weight} must be >= 1 (weights have mean 1)")
    B = v.shape[0]
    m = jnp.ones((B,), bool) if mask_b is None else jnp.asarray(mask_b, bool)
    n = jnp.sum(m).astype(jnp.float32)
    n_safe = jnp.maximum(n, 1.0)

    if standardize:
        mean = jnp.sum(jnp.where(m, v, 0.0)) / n_safe
        var = jnp.sum(jnp.where(m, (v - mean) ** 2, 0.0)) / n_safe
        std = jnp.sqrt(var)
        v = v / jnp.where(std > 0, std, 1.0)

    a = jnp.where(m, jnp.asarray(beta, jnp.float32) * v, -jnp.inf)
    a = a - jnp.max(a)
    u = jnp.where(m, jnp.exp(jnp.maximum(a, _LOG_FLOOR)), 0.0)

    if max_weight is None:
        w = u * (n / jnp.maximum(jnp.sum(u), 1e-30))
    else:
        M = jnp.float32(max_weight)
        # Capped normalisation: sort descending; with the top k entries capped
        # at M, the rest scale by c_k = (n - k M) / (sum of the rest). The
        # smallest k with c_k · u_(k) ≤ M (u_(k) the largest uncapped entry)
        # is consistent (then c_k · u_(k-1) ≥ M holds automatically).
        us = -jnp.sort(-u)
        tail = jnp.cumsum(us[::-1])[::-1]  # tail[k] = sum_{i >= k} us[i]
        k = jnp.arange(B, dtype=jnp.float32)
        budget = n - k * M
        c = budget / jnp.where(tail > 0, tail, 1.0)
        ok = (k < n) & (budget > 0) & (tail > 0) & (c * us <= M * (1.0 + 1e-6))
        c_star = jnp.where(jnp.any(ok), c[jnp.argmax(ok)], jnp.inf)
        # No consistent k only when M == 1 (or rounding at it): all weights M.
        w = jnp.minimum(c_star * u, M)
    return jnp.where(m & (n > 0), w, 0.0)


def shuffle_weights(w_b: jax.Array, mask_b: jax.Array, u_b: jax.Array) -> jax.Array:
    """The same weights on randomly permuted examples (the shuffled-weights control).

    Valid entries receive the valid weights in the random order given by the
    uniforms ``u_b``; invalid entries keep theirs (0), so the multiset of the
    valid weights is unchanged.
    """
    w = jnp.asarray(w_b, jnp.float32)
    m = jnp.asarray(mask_b, bool)
    pos = jnp.arange(w.shape[0], dtype=jnp.float32)
    src = jnp.argsort(jnp.where(m, jnp.asarray(u_b, jnp.float32), jnp.inf))  # valid sources, random order first
    dst = jnp.argsort(jnp.where(m, pos, jnp.inf + pos))  # valid slots, in order first
    return jnp.zeros_like(w).at[dst].set(w[src])


def ess_fraction(w_b: jax.Array, mask_b: jax.Array | None = None) -> jax.Array:
    """Effective sample size as a fraction of the valid examples: ``(Σw)² / (n Σw²)``;
    1 for equal weights, 1/n when one example carries all the weight."""
    w = jnp.asarray(w_b, jnp.float32)
    m = jnp.ones(w.shape, bool) if mask_b is None else jnp.asarray(mask_b, bool)
    w = jnp.where(m, w, 0.0)
    n = jnp.sum(m).astype(jnp.float32)
    sq = jnp.sum(w * w)
    return jnp.where((n > 0) & (sq > 0), jnp.sum(w) ** 2 / jnp.maximum(n * sq, 1e-30), 0.0)
