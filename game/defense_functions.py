"""The defenses' pure functions and the validation of their strengths and temperatures.

The conventions (PoE, ADS, the strategic teacher, how a per-row strength is aligned with
the logits) are game/defenses.py's, which builds the sampler's combiners on these
functions and re-exports them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    # validation
    "validate_gamma",
    "validate_gamma_max",
    "validate_lam",
    "validate_temperature",
    "validate_eps",
    "check_same_vocab",
    # pure functions
    "standard_logits",
    "poe_logits",
    "poe_logprobs",
    "ads_delta",
    "ads_delta_finite_difference",
    "ads_logits",
    "strategic_strength",
    "strategic_increment",
    "topk_logprobs",
]


# ----------------------------------------------------------------------------
# Validation. Checks run only on concrete python/numpy numbers; traced values
# pass through (they cannot be inspected without a host sync).
# ----------------------------------------------------------------------------


def _concrete(x: Any) -> float | None:
    """``float(x)`` if ``x`` is a concrete scalar, else None (tracers, arrays)."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def validate_gamma(gamma: Any, who: str = "PoE", name: str = "gamma") -> None:
    """γ must lie in [0, 1) (γ=1 would drop the teacher entirely)."""
    g = _concrete(gamma)
    if g is not None and not (0.0 <= g < 1.0):
        raise ValueError(f"{who} {name}={gamma} must be in [0, 1)")


def validate_gamma_max(gamma_max: Any, who: str = "StrategicPoE") -> None:
    g = _concrete(gamma_max)
    if g is not None and not (0.0 < g < 1.0):
        raise ValueError(f"{who} gamma_max={gamma_max} must be in (0, 1)")


def validate_lam(lam: Any, who: str = "ADS", name: str = "lam") -> None:
    v = _concrete(lam)
    if v is not None and not (v >= 0.0 and math.isfinite(v)):
        raise ValueError(f"{who} {name}={lam} must be finite and >= 0")


def validate_temperature(temperature: Any, who: str = "defense") -> None:
    t = _concrete(temperature)
    if t is not None and not (t > 0.0 and math.isfinite(t)):
        raise ValueError(f"{who} temperature={temperature} must be finite and > 0")


def validate_eps(eps: Any, who: str = "ADSFiniteDifference") -> None:
    e = _concrete(eps)
    if e is not None and not (e > 0.0 and math.isfinite(e)):
        raise ValueError(f"{who} eps={eps} must be finite and > 0")


def _validate_eta(eta: Any, who: str) -> None:
    e = _concrete(eta)
    if e is not None and not math.isfinite(e):
        raise ValueError(f"{who} eta={eta} must be finite")


def check_same_vocab(z_T: jax.Array, z_P: jax.Array, who: str = "defense") -> None:
    """Teacher and proxy must share the vocabulary (and the batch layout)."""
    if jnp.shape(z_T) != jnp.shape(z_P):
        raise ValueError(
            f"{who}: teacher logits {jnp.shape(z_T)} and proxy logits "
            f"{jnp.shape(z_P)} differ in shape; teacher and proxy must share "
            "the vocabulary"
        )


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _lead(x: Any, ndim: int) -> jax.Array:
    """Align a scalar or leading-axis strength with logits of rank ``ndim``."""
    x = _f32(x)
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def standard_logits(z_T: jax.Array, temperature: Any = 1.0) -> jax.Array:
    """``z_T / τ`` (float32)."""
    return _f32(z_T) / _lead(temperature, jnp.ndim(z_T))


def poe_logits(z_T: jax.Array, z_P: jax.Array, gamma: Any, temperature: Any = 1.0) -> jax.Array:
    """``((1-γ) z_T + γ z_P) / τ`` (float32). Unnormalised; see ``poe_logprobs``."""
    check_same_vocab(z_T, z_P, "PoE")
    nd = jnp.ndim(z_T)
    g = _lead(gamma, nd)
    return ((1.0 - g) * _f32(z_T) + g * _f32(z_P)) / _lead(temperature, nd)


def poe_logprobs(z_T: jax.Array, z_P: jax.Array, gamma: Any, temperature: Any = 1.0) -> jax.Array:
    """``log p_γ = log_softmax(((1-γ) z_T + γ z_P) / τ)`` over the last axis.

    Differentiable in γ and τ; γ may be a scalar or an array aligned with the
    leading axes of the logits (e.g. [B]).
    """
    return jax.nn.log_softmax(poe_logits(z_T, z_P, gamma, temperature), axis=-1)


def ads_delta(z_P: jax.Array, dz_P: jax.Array) -> jax.Array:
    """Δ = d/dε log_softmax(z_P(θ_P + ε g_P)) at ε=0: the JVP of log_softmax.

    ``Δ_v = dz_v - Σ_u softmax(z_P)_u dz_u``, where ``dz = d/dε z_P`` is the
    tangent expert's output. Computed at τ=1 (the proxy's own log-probs).
    """
    check_same_vocab(z_P, dz_P, "ADS")
    z, dz = _f32(z_P), _f32(dz_P)
    p = jax.nn.softmax(z, axis=-1)
    return dz - jnp.sum(p * dz, axis=-1, keepdims=True)


def ads_delta_finite_difference(z_plus: jax.Array, z_minus: jax.Array, eps: Any) -> jax.Array:
    """Central difference ``(log_softmax(z+) - log_softmax(z-)) / (2ε)``.

    ``z±`` are the proxy logits at ``θ_P ± ε g_P``. Approximates ``ads_delta``
    with O(ε²) error.
    """
    check_same_vocab(z_plus, z_minus, "ADSFiniteDifference")
    lp = jax.nn.log_softmax(_f32(z_plus), axis=-1)
    lm = jax.nn.log_softmax(_f32(z_minus), axis=-1)
    return (lp - lm) / (2.0 * _lead(eps, jnp.ndim(z_plus)))


def ads_logits(z_T: jax.Array, delta: jax.Array, lam: Any, temperature: Any = 1.0) -> jax.Array:
    """``z_T / τ + λ Δ``: τ tempers the teacher logits only, not λΔ."""
    check_same_vocab(z_T, delta, "ADS")
    nd = jnp.ndim(z_T)
    return _f32(z_T) / _lead(temperature, nd) + _lead(lam, nd) * _f32(delta)


def strategic_strength(base: Any, eta: Any, s_b: jax.Array, max_strength: Any) -> jax.Array:
    """``clip(base · exp(η s_b), 0, max_strength)``: per-sequence strength [B]."""
    return jnp.clip(_f32(base) * jnp.exp(_f32(eta) * _f32(s_b)), 0.0, _f32(max_strength))


def strategic_increment(z_T: jax.Array, z_P: jax.Array, token_b: jax.Array) -> jax.Array:
    """``log p_T(y) - log p_P(y)`` for the emitted tokens ``y = token_b`` [B].

    Uses τ=1 log-softmaxes of the raw teacher and proxy logits [B, V].
    """
    check_same_vocab(z_T, z_P, "strategic")
    lt = jax.nn.log_softmax(_f32(z_T), axis=-1)
    lp = jax.nn.log_softmax(_f32(z_P), axis=-1)
    idx = jnp.asarray(token_b, jnp.int32)[..., None]
    return (jnp.take_along_axis(lt, idx, axis=-1) - jnp.take_along_axis(lp, idx, axis=-1))[..., 0]


def topk_logprobs(logits_bv: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k of ``log_softmax(logits)`` over the last axis ("logit exposure").

    Returns ``(values_bk float32, ids_bk int32)``, values in descending order.
    Pass the *sampling* logits (already tempered/defended) to expose what the
    API would serve.
    """
    lp = jax.nn.log_softmax(_f32(logits_bv), axis=-1)
    values, ids = jax.lax.top_k(lp, k)
    return values, ids.astype(jnp.int32)
