"""Example values: how much training on one example lowers the student's held-out loss.

Conventions (docs/design.md, "The example value"):

* ``ℓ_i(θ) = -mean_t log q_θ(y_i,t | x_i, y_i,<t)``, the per-example NLL.
* ``g = ∇_θ L_ho(θ)``, the gradient of a held-out NLL (``heldout_gradient``).
* Example value ``v_i = ⟨∇_θ ℓ_i(θ), g⟩``. Positive = useful: a small gradient
  step on ℓ_i, ``θ - η ∇ℓ_i``, changes the held-out loss by ``-η v_i + O(η²)``,
  so it *lowers* the held-out loss exactly when v_i > 0. Computed exactly with
  one ``jax.jvp`` in float32 (``example_values``); a central difference
  (``example_values_fd``) cross-checks it, and the paper's public code's
  quantity (the negative, in bf16) exists only under its own name.

Pure JAX; no I/O, no dependence on ``models`` or ``experiments``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["example_values", "example_values_fd", "example_values_reference_code_compat", "heldout_gradient"]


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _cast_floats(tree: Any, dtype) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if _is_float(x) else x, tree)


def _tangents(params: Any, g: Any) -> Any:
    """float32 tangents for floating leaves, float0 zeros for the others (ints, keys)."""

    def one(p, t):
        if _is_float(p):
            return jnp.asarray(t, jnp.float32)
        return np.zeros(np.shape(p), dtype=jax.dtypes.float0)

    return jax.tree.map(one, params, g)


def example_values(per_example_loss: Callable[..., jax.Array], params: Any, g: Any, *args: Any) -> jax.Array:
    """``v_b = ⟨∇_θ ℓ_b(θ), g⟩`` exactly, by ONE forward-mode pass.

    ``per_example_loss(params, *args) -> [B]``; ``g`` is a pytree like
    ``params`` (typically the held-out NLL gradient). Floating leaves of
    ``params`` and ``g`` are cast to float32 first (so bf16 models are
    evaluated in float32 here); non-floating leaves (step counters, RNG keys)
    get float0 zero tangents. Returns float32 [B]; positive = useful.
    """
    params32 = _cast_floats(params, jnp.float32)
    tangents = _tangents(params32, g)
    _, v = jax.jvp(lambda p: per_example_loss(p, *args), (params32,), (tangents,))
    return jnp.asarray(v, jnp.float32)


def _shifted(params: Any, g: Any, step: float, dtype) -> Any:
    def one(p, t):
        if _is_float(p):
            return jnp.asarray(p, dtype) + jnp.asarray(step, dtype) * jnp.asarray(t, dtype)
        return p

    return jax.tree.map(one, params, g)


def example_values_fd(
    per_example_loss: Callable[..., jax.Array],
    params: Any,
    g: Any,
    *args: Any,
    eps: float = 1e-3,
) -> jax.Array:
    """Central-difference ``v_b ≈ (ℓ_b(θ + εg) - ℓ_b(θ - εg)) / (2ε)`` in float32.

    Same sign and meaning as ``example_values`` (O(ε²) error); two forward
    passes. Kept for cross-checking and for frameworks without forward mode.
    """
    if not eps > 0:
        raise ValueError(f"example_values_fd eps={eps} must be > 0")
    lp = per_example_loss(_shifted(params, g, eps, jnp.float32), *args)
    lm = per_example_loss(_shifted(params, g, -eps, jnp.float32), *args)
    return (jnp.asarray(lp, jnp.float32) - jnp.asarray(lm, jnp.float32)) / (2.0 * eps)


def example_values_reference_code_compat(
    per_example_loss: Callable[..., jax.Array],
    params: Any,
    g: Any,
    *args: Any,
    eps: float,
    dtype=jnp.bfloat16,
) -> jax.Array:
    """COMPATIBILITY ONLY: the quantity the paper's public code weights by.

    ``(ℓ_b(θ - εg) - ℓ_b(θ + εg)) / (2ε)`` with params, g and the shift in
    ``dtype`` (bfloat16 there). NOTE THE SIGN: this is ``-v_b``, the NEGATIVE
    of the design convention (``example_values``, docs/design.md), and in bf16 most values
    round to a few distinct numbers. Use it only to reproduce that code's
    behaviour, never as the example value.
    """
    if not eps > 0:
        raise ValueError(f"example_values_reference_code_compat eps={eps} must be > 0")
    lp = per_example_loss(_shifted(params, g, eps, dtype), *args)
    lm = per_example_loss(_shifted(params, g, -eps, dtype), *args)
    diff = (jnp.asarray(lm, dtype) - jnp.asarray(lp, dtype)) / jnp.asarray(2.0 * eps, dtype)
    return diff.astype(jnp.float32)


def heldout_gradient(mean_loss: Callable[..., jax.Array], params: Any, *args: Any) -> Any:
    """``g = ∇_θ L_ho(θ)``: ``jax.grad`` of a scalar held-out mean NLL.

    ``mean_loss(params, *args) -> scalar``. Returns a pytree like ``params``.
    """
    return jax.grad(mean_loss)(params, *args)
