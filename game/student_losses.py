"""The student's losses on teacher traces: the per-example and weighted NLL (how the loss is averaged, per token
or per sequence, is a switch separate from the weights; docs/design.md, "Students"), distillation on exposed
top-k teacher log-probs, and the PoE inversion that recovers teacher log-probs with the attacker's own proxy.

Pure JAX; no I/O, no dependence on ``models`` or ``experiments``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from game.defenses import validate_gamma, validate_temperature

__all__ = ["AVERAGING_MODES", "sequence_nll", "weighted_nll", "soft_target_loss", "invert_poe"]

AVERAGING_MODES = ("token", "sequence")


def sequence_nll(token_logp_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Per-example mean NLL ``ℓ_b = -Σ_t m_bt logp_bt / Σ_t m_bt`` (0 if no tokens)."""
    m = jnp.asarray(mask_bt, bool)
    nll = jnp.where(m, -jnp.asarray(token_logp_bt, jnp.float32), 0.0)
    return jnp.sum(nll, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1).astype(jnp.float32)


def weighted_nll(
    token_logp_bt: jax.Array,
    mask_bt: jax.Array,
    weights_b: jax.Array | None = None,
    averaging: str = "token",
) -> jax.Array:
    """Weighted NLL; ``averaging`` is independent of the weights.

    * ``"token"``:    ``Σ_i w_i Σ_t m_it (-logp_it) / Σ_i Σ_t m_it``
    * ``"sequence"``: ``Σ_i w_i ℓ_i / #{i : Σ_t m_it > 0}``, ℓ_i = ``sequence_nll``

    With w ≡ 1 these are the usual token-mean and sequence-mean NLL. An
    example to be excluded (e.g. dropped by ``degenerate_mask``) should have
    its mask row zeroed, so it leaves both denominators; a zero weight alone
    keeps it in the denominator. Masked positions may hold any value (even
    -inf). ``weights_b=None`` means all ones.
    """
    if averaging not in AVERAGING_MODES:
        raise ValueError(f"weighted_nll averaging={averaging!r} must be one of {AVERAGING_MODES}")
    m = jnp.asarray(mask_bt, bool)
    nll = jnp.where(m, -jnp.asarray(token_logp_bt, jnp.float32), 0.0)
    B = nll.shape[0]
    w = jnp.ones((B,), jnp.float32) if weights_b is None else jnp.asarray(weights_b, jnp.float32)
    counts = jnp.sum(m, axis=-1).astype(jnp.float32)
    if averaging == "token":
        return jnp.sum(w * jnp.sum(nll, axis=-1)) / jnp.maximum(jnp.sum(counts), 1.0)
    per_seq = jnp.sum(nll, axis=-1) / jnp.maximum(counts, 1.0)
    n_seq = jnp.sum(counts > 0).astype(jnp.float32)
    return jnp.sum(w * per_seq) / jnp.maximum(n_seq, 1.0)


def soft_target_loss(
    student_logp_btv: jax.Array,
    target_ids_btk: jax.Array,
    target_logp_btk: jax.Array,
    mask_bt: jax.Array,
    weights_b: jax.Array | None = None,
    averaging: str = "token",
) -> jax.Array:
    """Distillation on exposed top-k teacher log-probs.

    Per token: ``CE_bt = -Σ_k p̃_btk log q_bt(id_btk)`` with ``p̃ =
    softmax(target_logp_btk)`` (the teacher's top-k, renormalised over the k
    ids) and ``log q`` the student's full-vocabulary log-probs gathered at the
    ids. Aggregated exactly as ``weighted_nll`` (CE in place of -logp).
    """
    tgt = jax.nn.softmax(jnp.asarray(target_logp_btk, jnp.float32), axis=-1)
    s = jnp.take_along_axis(jnp.asarray(student_logp_btv, jnp.float32), jnp.asarray(target_ids_btk, jnp.int32), axis=-1)
    m = jnp.asarray(mask_bt, bool)
    ce = jnp.where(m, -jnp.sum(tgt * s, axis=-1), 0.0)
    return weighted_nll(-ce, m, weights_b, averaging)


def invert_poe(logp_gamma: jax.Array, z_proxy: jax.Array, gamma: Any, temperature: Any = 1.0) -> jax.Array:
    """Undo PoE(γ) with the attacker's own proxy: recover teacher log-probs.

    From ``log p_γ = ((1-γ) z_T + γ z_P)/τ - C`` it follows that
    ``(τ log p_γ - γ z_P') / (1-γ) = z_T - τC/(1-γ)`` when the attacker's proxy
    logits z_P' equal z_P: the teacher logits up to a per-row constant.
    Returns ``log_softmax`` of that over the last axis, i.e. the teacher's τ=1
    log-probs renormalised over the given ids. Works on a top-k subset:
    ``logp_gamma`` [..., K] and ``z_proxy`` [..., K] gathered at the same ids
    (the constant cancels). γ may be a scalar or leading-axis array.
    """
    validate_gamma(gamma, "invert_poe")
    validate_temperature(temperature, "invert_poe")
    lg = jnp.asarray(logp_gamma, jnp.float32)
    zp = jnp.asarray(z_proxy, jnp.float32)
    if lg.shape != zp.shape:
        raise ValueError(f"invert_poe: logp_gamma {lg.shape} and z_proxy {zp.shape} must cover the same ids")
    g = jnp.asarray(gamma, jnp.float32)
    g = g.reshape(g.shape + (1,) * (lg.ndim - g.ndim))
    tau = jnp.asarray(temperature, jnp.float32)
    tau = tau.reshape(tau.shape + (1,) * (lg.ndim - tau.ndim))
    z_T = (tau * lg - g * zp) / (1.0 - g)
    return jax.nn.log_softmax(z_T, axis=-1)
