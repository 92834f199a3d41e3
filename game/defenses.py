"""Decoding-time defenses: how the teacher turns expert logits into the
distribution it samples from.

Two layers:

* **Pure functions** (``poe_logprobs``, ``ads_delta``, ``strategic_strength``,
  ...) that tests and the game solver call directly, with the validation of the
  strengths (game/defense_functions.py, re-exported here). They are differentiable in
  every numeric argument (γ, λ, τ may be traced scalars, and strengths may be
  per-row arrays).
* **Combiners**: small frozen dataclasses plugged into the sampler's
  combination seam (``models/sampling.py``). Structural interface::

      init(batch_size) -> carry                 # per-sequence state pytree
      logits(outs, carry) -> [B, V] float32     # τ is applied HERE
      update(outs, carry, token_b) -> carry     # after token [B] int32 is chosen

  ``outs[i]`` is expert i's output at the current position: raw next-token
  logits ``z_bv`` for a model expert, ``(z_bv, dz_bv)`` for a tangent (JVP)
  expert. Each combiner class lists its expected experts in the class
  attribute ``experts`` (documentation for the sampler; not used here).
  Combiners are registered with ``jax.tree_util.register_static``: they carry
  no array leaves, hash by value, and can be closed over or passed to ``jit``.
  Their numeric fields must therefore be python numbers; to trace a strength
  (e.g. a hypergradient in γ) call the pure functions instead.

Conventions (docs/design.md, "The example value", "Defenses", "Students"):

* PoE(γ):  ``log p_γ = log_softmax(((1-γ) z_T + γ z_P) / τ)``, γ ∈ [0, 1).
  At τ=1 this is ``p_T · exp(-γ (log p_T - log p_P))`` renormalised.
* ADS(λ):  ``logits = z_T / τ + λ Δ``, ``Δ(v) = d/dε log p_P(v; θ_P + ε g_P)``
  at ε=0, with ``g_P`` the gradient of the proxy's held-out NLL. τ divides the
  teacher logits only; the λΔ term is not tempered.
  Sign: moving the proxy along +g_P *increases* its held-out loss, so Δ(v) > 0
  marks tokens that the loss-increasing direction favours. For a student
  trained on token v (loss ``-log p(v)``) the example value is
  ``⟨∇(-log p(v)), g⟩ = -Δ(v)``, so ADS is ``p_T · exp(-λ · value)``: the
  teacher suppression of docs/design.md.
* Strategic teacher: ``γ_t = clip(γ · exp(η s_t), 0, γ_max)`` with ``s_t`` the
  running sum, over the tokens already emitted in that sequence, of
  ``log p_T(y) - log p_P(y)``. Choice: these log-probs are τ=1 log-softmaxes
  of the *raw* expert logits (independent of the sampling temperature and of
  the defense itself), so s_t measures how much more the teacher knows than
  the proxy about the emitted prefix.

A non-scalar strength (γ or λ of shape [B]) is aligned with the *leading* axes
of the logits (``[B]`` against ``[B, V]`` or ``[B, T, V]``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from game.defense_functions import _lead as _lead  # re-exported: game/registry.py uses it
from game.defense_functions import (
    _validate_eta,
    ads_delta,
    ads_delta_finite_difference,
    ads_logits,
    check_same_vocab,
    poe_logits,
    poe_logprobs,
    standard_logits,
    strategic_increment,
    strategic_strength,
    topk_logprobs,
    validate_eps,
    validate_gamma,
    validate_gamma_max,
    validate_lam,
    validate_temperature,
)

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
    # combiners
    "Standard",
    "PoE",
    "ADS",
    "ADSFiniteDifference",
    "StrategicPoE",
    "StrategicADS",
]


# ----------------------------------------------------------------------------
# Combiners
# ----------------------------------------------------------------------------


def _static_dataclass(cls):
    return jax.tree_util.register_static(dataclasses.dataclass(frozen=True)(cls))


@_static_dataclass
class Standard:
    """Plain sampling from the teacher: ``logits = z_T / τ``. outs = (z_T,)."""

    temperature: float = 1.0
    experts: ClassVar[tuple[str, ...]] = ("teacher",)

    def __post_init__(self):
        validate_temperature(self.temperature, "Standard")

    def init(self, batch_size: int):
        return ()

    def logits(self, outs, carry):
        (z_T,) = outs
        return standard_logits(z_T, self.temperature)

    def update(self, outs, carry, token_b):
        return carry


@_static_dataclass
class PoE:
    """Product of experts: ``((1-γ) z_T + γ z_P) / τ``. outs = (z_T, z_P)."""

    gamma: float
    temperature: float = 1.0
    experts: ClassVar[tuple[str, ...]] = ("teacher", "proxy")

    def __post_init__(self):
        validate_gamma(self.gamma, "PoE")
        validate_temperature(self.temperature, "PoE")

    def init(self, batch_size: int):
        return ()

    def logits(self, outs, carry):
        z_T, z_P = outs
        return poe_logits(z_T, z_P, self.gamma, self.temperature)

    def update(self, outs, carry, token_b):
        return carry


@_static_dataclass
class PoEPerRow:
    """PoE whose weight is data, not a static field: the carry is γ_b [B], seeded by the
    caller through the sampler's ``carry`` argument. One compiled sampler then serves
    every γ (the game solver resamples prefixes at a new γ every few iterations) and
    rows of one batch may use different γ. outs = (z_T, z_P)."""

    temperature: float = 1.0
    experts: ClassVar[tuple[str, ...]] = ("teacher", "proxy")

    def __post_init__(self):
        validate_temperature(self.temperature, "PoEPerRow")

    def init(self, batch_size: int):
        return jnp.zeros((batch_size,), jnp.float32)

    def logits(self, outs, carry):
        z_T, z_P = outs
        return poe_logits(z_T, z_P, carry, self.temperature)

    def update(self, outs, carry, token_b):
        return carry


@_static_dataclass
class ADS:
    """Antidistillation sampling: ``logits = z_T / τ + λ Δ``.

    outs = (z_T, (z_P, dz_P)), the second a tangent expert along g_P (the
    proxy's held-out NLL gradient). τ enters only as ``z_T / τ``; Δ = JVP of
    the proxy's τ=1 log_softmax (``ads_delta``) is added untempered.
    """

    lam: float
    temperature: float = 1.0
    experts: ClassVar[tuple[str, ...]] = ("teacher", "proxy_tangent")

    def __post_init__(self):
        validate_lam(self.lam, "ADS")
        validate_temperature(self.temperature, "ADS")

    def init(self, batch_size: int):
        return ()

    def logits(self, outs, carry):
        z_T, (z_P, dz_P) = outs
        return ads_logits(z_T, ads_delta(z_P, dz_P), self.lam, self.temperature)

    def update(self, outs, carry, token_b):
        return carry


@_static_dataclass
class ADSFiniteDifference:
    """ADS with Δ from two proxies at ``θ_P ± ε g_P`` (the original ADS recipe).

    outs = (z_T, z_P_plus, z_P_minus); ``logits = z_T / τ + λ Δ_fd`` with
    ``Δ_fd = (log_softmax(z+) - log_softmax(z-)) / (2ε)``; τ on z_T only.
    """

    lam: float
    temperature: float = 1.0
    eps: float = 1e-3
    experts: ClassVar[tuple[str, ...]] = ("teacher", "proxy_plus", "proxy_minus")

    def __post_init__(self):
        validate_lam(self.lam, "ADSFiniteDifference")
        validate_temperature(self.temperature, "ADSFiniteDifference")
        validate_eps(self.eps, "ADSFiniteDifference")

    def init(self, batch_size: int):
        return ()

    def logits(self, outs, carry):
        z_T, z_plus, z_minus = outs
        delta = ads_delta_finite_difference(z_plus, z_minus, self.eps)
        return ads_logits(z_T, delta, self.lam, self.temperature)

    def update(self, outs, carry, token_b):
        return carry


@_static_dataclass
class StrategicPoE:
    """PoE whose strength grows along each sequence.

    ``γ_t = clip(γ · exp(η s_t), 0, γ_max)``, ``s_t = Σ_{t'<t} log p_T(y_t') -
    log p_P(y_t')`` (τ=1 log-softmaxes of the raw logits). carry = s_b [B]
    float32, zeros at init. outs = (z_T, z_P). η=0 is plain PoE(γ) (when
    γ ≤ γ_max).
    """

    gamma: float
    eta: float
    gamma_max: float
    temperature: float = 1.0
    experts: ClassVar[tuple[str, ...]] = ("teacher", "proxy")

    def __post_init__(self):
        validate_gamma(self.gamma, "StrategicPoE")
        validate_gamma_max(self.gamma_max, "StrategicPoE")
        _validate_eta(self.eta, "StrategicPoE")
        validate_temperature(self.temperature, "StrategicPoE")

    def init(self, batch_size: int):
        return jnp.zeros((batch_size,), jnp.float32)

    def strength(self, carry):
        """γ_t per sequence [B]."""
        return strategic_strength(self.gamma, self.eta, carry, self.gamma_max)

    def logits(self, outs, carry):
        z_T, z_P = outs
        return poe_logits(z_T, z_P, self.strength(carry), self.temperature)

    def update(self, outs, carry, token_b):
        z_T, z_P = outs
        return carry + strategic_increment(z_T, z_P, token_b)


@_static_dataclass
class StrategicADS:
    """ADS whose strength grows along each sequence.

    ``λ_t = clip(λ · exp(η s_t), 0, λ_max)``, s_t as in ``StrategicPoE`` with
    the proxy log-probs from the tangent expert's primal z_P. outs = (z_T,
    (z_P, dz_P)); logits = z_T / τ + λ_t Δ (τ on z_T only).
    """

    lam: float
    eta: float
    lam_max: float
    temperature: float = 1.0
    experts: ClassVar[tuple[str, ...]] = ("teacher", "proxy_tangent")

    def __post_init__(self):
        validate_lam(self.lam, "StrategicADS")
        validate_lam(self.lam_max, "StrategicADS", name="lam_max")
        _validate_eta(self.eta, "StrategicADS")
        validate_temperature(self.temperature, "StrategicADS")

    def init(self, batch_size: int):
        return jnp.zeros((batch_size,), jnp.float32)

    def strength(self, carry):
        """λ_t per sequence [B]."""
        return strategic_strength(self.lam, self.eta, carry, self.lam_max)

    def logits(self, outs, carry):
        z_T, (z_P, dz_P) = outs
        return ads_logits(z_T, ads_delta(z_P, dz_P), self.strength(carry), self.temperature)

    def update(self, outs, carry, token_b):
        z_T, (z_P, _) = outs
        return carry + strategic_increment(z_T, z_P, token_b)
