"""The defense game on sequence models (PoE γ, ADS λ, any registered defense whose strength is
differentiable: game/registry.py), assembled from a model's forward function.

One iteration of the game reads here and in the solver (game/solver*.py) alone: the experiment only
supplies `forward(theta, tokens_bt) -> logits_btv` (the student's network) and the
batches (prefixes sampled from the defended teacher at strength γ with the defense's expert
outputs cached on them, reference solutions for J and U). The solver calls the strength γ
whatever the defense (PoE's γ, ADS's λ).

Batches (dicts of arrays):

- student batch: `tokens_bt`, `loss_mask_bt` (mask[t] = 1 iff tokens[t+1] was generated),
  `outs` (the defense's expert outputs as its combiner takes them, e.g. PoE (z_T, z_P), ADS
  (z_T, (z_P, dz_P)); each [B, T−1, V] at the positions that predict tokens[1:]),
  optionally `gamma_sample` (the γ the prefixes were drawn at; default: the current γ),
  `heldout` {tokens_bt, loss_mask_bt} (the adaptive student's g_S) and `minibatch_idx`
  [steps, b] (the horizon's minibatches, drawn from the pool in a fixed order);
- eval batch (J): `tokens_bt`, `loss_mask_bt` of reference solutions; the mask picks what
  J scores (whole solution, or only the final answer: experiments/equilibrium.py builds
  either);
- utility batch (U): `tokens_bt`, `loss_mask_bt`, `outs` of reference solutions of held-out
  prompts.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from game import example_values as ev
from game import example_weights as ew
from game import registry, sampling
from game.solver import Game

Forward = Callable[..., jax.Array]  # (theta, tokens_bt) -> logits_btv


def masked_nll(forward: Forward, theta, tokens_bt, loss_mask_bt) -> jax.Array:
    """Mean next-token NLL over the masked target tokens of the batch."""
    logq_btv = jax.nn.log_softmax(forward(theta, tokens_bt[:, :-1]), axis=-1)
    logp_bt = sampling.picked(logq_btv, tokens_bt[:, 1:])
    mask_bt = loss_mask_bt[:, :-1]
    return -jnp.sum(logp_bt * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


def select_minibatch(batch: dict, t) -> dict:
    """The rows `batch['minibatch_idx'][t]` of every per-prefix array (the rest unchanged)."""
    if "minibatch_idx" not in batch:
        return batch
    idx = batch["minibatch_idx"][t]
    out = {k: v for k, v in batch.items() if k != "minibatch_idx"}
    for k in ("tokens_bt", "loss_mask_bt", "outs"):
        out[k] = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), batch[k])
    return out


def make_poe_game(forward: Forward, beta: float = 0.0, **kwargs) -> Game:
    """The PoE game (`make_defense_game` with defense='poe')."""
    return make_defense_game(forward, registry.POE, beta, **kwargs)


def make_defense_game(
    forward: Forward,
    defense: str,
    beta: float = 0.0,
    *,
    tau: float = 1.0,
    estimator: str = "score",
    baseline: bool = True,
    max_weight: float | None = 10.0,
    standardize: bool = False,
) -> Game:
    """The game of `defense` (a registered defense with a differentiable strength) for one student
    tilt β_s (0 = passive).

    - L_D: the distillation loss of game/sampling.py (`estimator` 'score': soft targets
      plus the score-function term of the sampling channel; 'soft': sampling channel
      stopped), per example, weighted by the adaptive student's exp(β v_i) weights
      (stop-gradient, values from the soft-target losses);
    - J: the student's NLL of the eval batch's masked tokens;
    - U: the teacher's mean log-likelihood per token of reference solutions under the
      defense at strength γ and τ = 1 (cached expert outputs)."""
    if estimator not in sampling.ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} must be one of {sampling.ESTIMATORS}")
    spec = registry.get(defense)
    if not spec.differentiable:
        raise ValueError(
            f"defense {defense!r} has no differentiable strength; the game plays one of "
            f"{', '.join(registry.differentiable_names())}"
        )

    def per_example(theta, gamma, batch, est):
        logq_btv = jax.nn.log_softmax(forward(theta, batch["tokens_bt"][:, :-1]), axis=-1)
        return sampling.defended_ce(
            logq_btv,
            lambda g: spec.logprobs(batch["outs"], g, tau),
            batch["tokens_bt"][:, 1:],
            batch["loss_mask_bt"][:, :-1],
            gamma,
            est,
            batch.get("gamma_sample"),
            baseline,
        )

    def student_loss(theta, gamma, batch):
        ce_b = per_example(theta, gamma, batch, estimator)
        if beta == 0.0:
            return jnp.mean(ce_b)
        held = batch["heldout"]
        g_S = jax.grad(lambda th: masked_nll(forward, th, held["tokens_bt"], held["loss_mask_bt"]))(theta)
        sg_gamma = jax.lax.stop_gradient(gamma)
        v_b = ev.example_values(lambda th: per_example(th, sg_gamma, batch, "soft"), theta, g_S)
        w_b = ew.adaptive_weights(v_b, beta, max_weight=max_weight, standardize=standardize)
        return jnp.mean(jax.lax.stop_gradient(w_b) * ce_b)

    def capability_loss(theta, batch):
        return masked_nll(forward, theta, batch["tokens_bt"], batch["loss_mask_bt"])

    def utility(gamma, batch):
        logp_btv = spec.logprobs(batch["outs"], gamma, 1.0)
        logp_bt = sampling.picked(logp_btv, batch["tokens_bt"][:, 1:])
        mask_bt = batch["loss_mask_bt"][:, :-1]
        return jnp.sum(logp_bt * mask_bt) / jnp.sum(mask_bt)

    sup = spec.strength.range.high
    return Game(student_loss, capability_loss, utility, minibatch=select_minibatch, strength_sup=sup)
