"""The sampling channel: how γ changes *which* prefixes the student trains on.

The student distils on sequences y ~ p_γ (the PoE teacher). Its expected loss is

    L_D(θ; γ) = E_{y ~ p_γ} [ Σ_t m_t ℓ_t(θ; y) ] / Σ_t m_t,

and γ enters twice: through the token the teacher emits at position t given the prefix
(the *target* channel) and through the prefix y_<t itself (the *sampling* channel).
Soft targets, `CE_t(θ, γ) = −Σ_v p_γ(v | y_<t) log q_θ(v | y_<t)`, average the first
channel exactly (a Rao–Blackwellised hard-label loss). The second needs an estimator:
the score function (likelihood ratio) of the prefix,

    ∂_γ E[CE_t] = E[ ∂_γ CE_t + (CE_t − b_t) · Σ_{s<t} ∂_γ log p_γ(y_s | y_<s) ],

unbiased for any baseline b_t that does not depend on the sample it multiplies.

Implementation as a surrogate loss whose *value* is the importance-weighted soft-target
loss and whose γ-derivatives (of any order in θ, e.g. ∂_γ ∇_θ, which is what moves the
student's update) are the estimator's:

    W_t(γ)   = exp(Σ_{s<t} m_s [log p_γ(y_s) − log p_{γ_s}(y_s)])    (1 when γ = γ_s)
    ℓ̃_t      = W_t · CE_t(θ, γ) − (W_t − sg W_t) · b_t(θ)

with γ_s the γ the prefixes were sampled at. The per-token log-probabilities come from
the *cached* teacher and proxy logits on the sampled sequences (no new forward pass of
either model), and the ratio makes prefixes sampled a few solver iterations ago (at
an older γ) still unbiased. The baseline b_t is the leave-one-out mean over the other
sequences of the batch of CE at the same position (it depends on θ, so it acts on
∂_γ ∇_θ too; it is independent of sample i, so it adds no bias). Whether it lowers the
variance depends on the batch: with 2 sequences it does not (tests/test_sampling.py
measures 0.275 with it vs 0.180 without); `baseline=False` turns it off.

`estimator='soft'` is the old path: W ≡ 1, the sampling channel stopped.
Unbiasedness is pinned by tests/test_sampling.py, which enumerates every sequence of a
small vocabulary and compares the exact expectation of the estimator with the exact
∂_γ ∇_θ L_D.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ESTIMATORS = ("score", "soft")


def poe_logprobs(z_teacher_btv, z_proxy_btv, gamma, tau: float = 1.0):
    """log p_γ = log_softmax(((1 − γ) z_T + γ z_P) / τ) (docs/design.md, "Defenses": PoE(γ))."""
    return jax.nn.log_softmax(((1.0 - gamma) * z_teacher_btv + gamma * z_proxy_btv) / tau, axis=-1)


def picked(logp_btv, tokens_bt):
    """log p(tokens_bt[:, t]) from logp_btv[:, t] (same length)."""
    return jnp.take_along_axis(logp_btv, tokens_bt[..., None], axis=-1)[..., 0]


def prefix_weights(logp_tok_bt, logp_tok_sample_bt, mask_bt):
    """W_bt = exp(Σ_{s<t} m_s (log p_γ(y_s) − log p_γs(y_s))): the importance ratio of the
    prefix before position t (exclusive cumulative sum), differentiable in γ through
    `logp_tok_bt`. Position t's own token is not in its prefix (the soft target covers it)."""
    r_bt = mask_bt * (logp_tok_bt - logp_tok_sample_bt)
    return jnp.exp(jnp.cumsum(r_bt, axis=-1) - r_bt)


def loo_baseline(ce_bt, mask_bt):
    """b_bt: mean of CE at position t over the *other* sequences of the batch that have a
    target there (0 where none has)."""
    total_t = jnp.sum(ce_bt * mask_bt, axis=0, keepdims=True)
    count_t = jnp.sum(mask_bt, axis=0, keepdims=True)
    others = count_t - mask_bt
    return jnp.where(others > 0, (total_t - ce_bt * mask_bt) / jnp.maximum(others, 1.0), 0.0)


def surrogate_ce(ce_bt, weights_bt, mask_bt, baseline: bool = True):
    """Per-example surrogate loss Σ_t m_t [W_t CE_t − (W_t − sg W_t) b_t] / Σ_t m_t, [B]."""
    sg = jax.lax.stop_gradient
    term_bt = weights_bt * ce_bt
    if baseline:
        term_bt = term_bt - (weights_bt - sg(weights_bt)) * loo_baseline(ce_bt, mask_bt)
    return jnp.sum(term_bt * mask_bt, -1) / jnp.maximum(jnp.sum(mask_bt, -1), 1.0)


def distillation_ce(
    logq_btv,
    z_teacher_btv,
    z_proxy_btv,
    tokens_next_bt,
    mask_bt,
    gamma,
    tau: float = 1.0,
    estimator: str = "score",
    gamma_sample=None,
    baseline: bool = True,
):
    """Per-example distillation loss [B] of a student with log-probs `logq_btv` on prefixes
    sampled from PoE(γ_s), `tokens_next_bt[:, t]` the sampled token at position t (the
    target of logits t), cached teacher/proxy logits at the same positions.

    estimator='score': the surrogate above (target channel exact, sampling channel by the
    score function with the leave-one-out baseline); 'soft': soft targets on the fixed
    prefixes (sampling channel stopped). `gamma_sample` None = sg(γ) (on-policy)."""
    return defended_ce(
        logq_btv,
        lambda g: poe_logprobs(z_teacher_btv, z_proxy_btv, g, tau),
        tokens_next_bt,
        mask_bt,
        gamma,
        estimator,
        gamma_sample,
        baseline,
    )


def defended_ce(
    logq_btv, logprobs, tokens_next_bt, mask_bt, strength, estimator="score", strength_sample=None, baseline=True
):
    """`distillation_ce` for any defense whose strength is differentiable: `logprobs(s)` is the
    defended teacher's log p_s [B, T, V] on the sampled sequences (from cached expert outputs)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} must be one of {ESTIMATORS}")
    logp_btv = logprobs(strength)
    ce_bt = -jnp.sum(jnp.exp(logp_btv) * logq_btv, axis=-1)
    if estimator == "soft":
        return jnp.sum(ce_bt * mask_bt, -1) / jnp.maximum(jnp.sum(mask_bt, -1), 1.0)
    gs = jax.lax.stop_gradient(strength) if strength_sample is None else strength_sample
    logp_tok = picked(logp_btv, tokens_next_bt)
    logp_tok_sample = jax.lax.stop_gradient(picked(logprobs(gs), tokens_next_bt))
    weights_bt = prefix_weights(logp_tok, logp_tok_sample, mask_bt)
    return surrogate_ce(ce_bt, weights_bt, mask_bt, baseline)
