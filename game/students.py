"""Attacker recipes: the ONE place where an attacker's recipe (which value, when it is computed, how it becomes
a weight, how the loss is averaged) is assembled into a weighted distillation loss; the protocol's students and
the equilibrium game both call it.

Conventions (docs/design.md, "The example value", "Defenses", "Students"):

* ``Recipe`` + ``recipe_loss`` (per batch) / ``dataset_weights`` (once, or every
  N steps, over the whole training set) build the student's loss from the
  pieces in their own modules: example values (``game.example_values``),
  adaptive weights ``w_i ∝ exp(β v_i)``, capped, mean 1, β = 0 passive
  (``game.example_weights``), and the weighted NLL with its averaging switch
  (``game.student_losses``).
* ``REFERENCE_RECIPE`` reproduces the paper's public code (named as such: its
  value has the opposite sign).

``soft_target_loss``, ``invert_poe`` (``game.student_losses``) and ``degenerate_mask``
(``game.trace_filter``) are re-exported here for ``experiments/protocol.py``, which calls
them as ``students.<name>``.

Pure JAX; no I/O, no dependence on ``models`` or ``experiments``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from game.example_values import example_values, example_values_reference_code_compat
from game.example_weights import adaptive_weights, ess_fraction, shuffle_weights
from game.student_losses import AVERAGING_MODES, sequence_nll, weighted_nll
from game.student_losses import invert_poe as invert_poe  # re-exported for experiments/protocol.py
from game.student_losses import soft_target_loss as soft_target_loss  # re-exported for experiments/protocol.py
from game.trace_filter import degenerate_mask as degenerate_mask  # re-exported for experiments/protocol.py

__all__ = [
    "Recipe",
    "PASSIVE_RECIPE",
    "REFERENCE_RECIPE",
    "REFERENCE_BETA",
    "recipe_scores",
    "recipe_weights",
    "recipe_loss",
    "dataset_gradient",
    "dataset_weights",
]

VALUE_KINDS = ("jvp", "fd")
WEIGHTINGS = ("none", "exp", "filter")
FD_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How an attacker turns its examples into a weighted distillation loss.

    Each switch is independent, so a gap between two students can be pinned on
    one ingredient (docs/design.md, "Students": weights and averaging are separate switches).

    * ``weighting``: ``"none"`` (passive: every example weight 1), ``"exp"``
      (``w ∝ exp(β a)``, normalised to mean 1, capped at ``max_weight``) or
      ``"filter"`` (one-sided: ``w = min(1, exp(β a))``, never renormalised,
      so an example can only lose weight).
    * ``value``: the score ``a`` before the sign: ``"jvp"`` = the design value
      ``v = ⟨∇ℓ, g⟩`` exactly in float32; ``"fd"`` = the central difference
      ``(ℓ(θ+εg) − ℓ(θ−εg)) / 2ε`` with θ, g, the shift and the two losses in
      ``fd_dtype`` (bfloat16: the losses round to ~3 significant digits, so
      many scores come out exactly 0).
    * ``sign``: ``+1`` weights by ``exp(β v)`` (design: positive = useful);
      ``-1`` by ``exp(−β v)``, which is what the paper's public code does.
    * ``refresh_every``: 1 = values of each step's batch at the current student
      (the design adaptive student; weights normalised over the batch);
      0 = once, at the reference point (the student base), for every training
      example; N > 1 = for every example at the current student every N steps.
      In the dataset modes the weights are normalised over the dataset, and g
      is the gradient of the whole held-out set.
    * ``standardize``: divide the scores by their std (over the batch, or the
      dataset) so β is unitless; no centring (the sign is kept).
    * ``clamp``: clip the (standardised) scores to ``[−clamp, clamp]``; 0 = off.
    * ``max_weight``: cap of an ``"exp"`` weight; None = no cap.
    * ``averaging``: ``"token"`` or ``"sequence"`` (``weighted_nll``).
    * ``shuffle``: the shuffled-weights control: the same weights (the same
      multiset) given to randomly permuted examples, so selection can be told
      apart from the loss of effective sample size.
    """

    weighting: str = "exp"
    value: str = "jvp"
    sign: int = 1
    fd_eps: float = 0.01
    fd_dtype: str = "bfloat16"
    refresh_every: int = 1
    standardize: bool = True
    clamp: float = 0.0
    max_weight: float | None = 5.0
    averaging: str = "token"
    shuffle: bool = False

    @property
    def weighted(self) -> bool:
        return self.weighting != "none"

    @property
    def dataset_level(self) -> bool:
        """Weights computed for the whole training set (once or every N steps), not per batch."""
        return self.weighted and self.refresh_every != 1

    def validate(self, where: str = "recipe") -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"{where}.weighting={self.weighting!r} must be one of {', '.join(WEIGHTINGS)}")
        if self.value not in VALUE_KINDS:
            raise ValueError(f"{where}.value={self.value!r} must be one of {', '.join(VALUE_KINDS)}")
        if self.sign not in (1, -1):
            raise ValueError(f"{where}.sign={self.sign} must be 1 (design) or -1 (the paper's code)")
        if self.fd_dtype not in FD_DTYPES:
            raise ValueError(f"{where}.fd_dtype={self.fd_dtype!r} must be one of {', '.join(FD_DTYPES)}")
        if not self.fd_eps > 0:
            raise ValueError(f"{where}.fd_eps={self.fd_eps} must be > 0")
        if self.refresh_every < 0:
            raise ValueError(f"{where}.refresh_every={self.refresh_every} must be >= 0 (0 = once at the student base)")
        if self.clamp < 0:
            raise ValueError(f"{where}.clamp={self.clamp} must be >= 0 (0 = off)")
        if self.max_weight is not None and not self.max_weight >= 1:
            raise ValueError(f"{where}.max_weight={self.max_weight} must be >= 1 (weights have mean 1) or null")
        if self.averaging not in AVERAGING_MODES:
            raise ValueError(f"{where}.averaging={self.averaging!r} must be one of {AVERAGING_MODES}")


PASSIVE_RECIPE = Recipe(weighting="none")

# The paper's public code (ysfalh/distillation-game, src/clean_sweep/train/distill.py and
# generation/methods.py): raw advantage a = (ℓ(θ−εg) − ℓ(θ+εg)) / 2ε, ε = 0.01, losses from a
# bf16 model (so a = −v, quantised); weights exp(β·clamp(a, −10, 10)) in float64, divided by
# their mean over the whole training set, no cap; g computed once at the student's
# initialisation from all held-out teacher traces; the weighted loss is
# Σ_i w_i ℓ_i / B (per example) while the passive student uses the token mean. β = 0.5 for
# GSM8K/MATH. "LoRA parameters only" is the protocol's `finetune='lora'` (values and g are
# then taken w.r.t. the adapters).
REFERENCE_RECIPE = Recipe(
    weighting="exp",
    value="fd",
    sign=-1,
    fd_eps=0.01,
    fd_dtype="bfloat16",
    refresh_every=0,
    standardize=False,
    clamp=10.0,
    max_weight=None,
    averaging="sequence",
)
REFERENCE_BETA = 0.5


def recipe_scores(
    recipe: Recipe, per_example_loss: Callable[..., jax.Array], params: Any, g: Any, *args: Any
) -> jax.Array:
    """The score ``a_b`` the recipe exponentiates (before standardising / clamping / β).

    ``sign · v_b`` with v the exact JVP value (``value="jvp"``) or its central
    difference in ``fd_dtype`` (``value="fd"``). The reference recipe
    (fd, bf16, sign −1) is exactly ``example_values_reference_code_compat``.
    """
    if recipe.value == "jvp":
        v = example_values(per_example_loss, params, g, *args)
    else:
        # compat returns (ℓ(θ−εg) − ℓ(θ+εg))/2ε = −v; negating a float is exact.
        v = -example_values_reference_code_compat(
            per_example_loss, params, g, *args, eps=recipe.fd_eps, dtype=FD_DTYPES[recipe.fd_dtype]
        )
    return jnp.float32(recipe.sign) * v


def _masked_std(a_b: jax.Array, mask_b: jax.Array) -> jax.Array:
    n = jnp.maximum(jnp.sum(mask_b), 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(mask_b, a_b, 0.0)) / n
    return jnp.sqrt(jnp.sum(jnp.where(mask_b, (a_b - mean) ** 2, 0.0)) / n)


def recipe_weights(recipe: Recipe, a_b: jax.Array, beta: Any, mask_b: jax.Array | None = None) -> jax.Array:
    """Scores -> weights, in this order: standardise (valid entries), clamp, then
    ``"exp"``: ``adaptive_weights`` (mean 1 over the valid entries, cap) or
    ``"filter"``: ``min(1, exp(β a))``; ``"none"``: 1. Invalid entries get 0."""
    a = jnp.asarray(a_b, jnp.float32)
    m = jnp.ones(a.shape, bool) if mask_b is None else jnp.asarray(mask_b, bool)
    if recipe.weighting == "none":
        return m.astype(jnp.float32)
    if recipe.standardize:
        std = _masked_std(a, m)
        a = a / jnp.where(std > 0, std, 1.0)
    if recipe.clamp:
        a = jnp.clip(a, -recipe.clamp, recipe.clamp)
    if recipe.weighting == "exp":
        return adaptive_weights(a, beta, max_weight=recipe.max_weight, mask_b=m)
    # One-sided filter: exp overflow at β a ≫ 0 is harmless (min picks 1).
    return jnp.where(m, jnp.minimum(1.0, jnp.exp(jnp.asarray(beta, jnp.float32) * a)), 0.0)


def recipe_loss(
    recipe: Recipe,
    beta: Any,
    token_loss_fn: Callable[[Any], tuple[jax.Array, jax.Array]],
    params: Any,
    *,
    heldout_loss_fn: Callable[[Any], jax.Array] | None = None,
    weights_b: jax.Array | None = None,
    shuffle_u_b: jax.Array | None = None,
    value_loss_fn: Callable[[Any], jax.Array] | None = None,
) -> tuple[jax.Array, dict]:
    """The student's loss under ``recipe``; returns ``(loss, {"ess_fraction": ...})``.

    * ``token_loss_fn(params) -> (loss_bt, mask_bt)``: per-token losses (NLL, or
      soft-target CE) and the target mask; the example loss ℓ_b is their masked
      mean, an example with no target tokens is left out.
    * Weights: none for ``weighting="none"``; ``weights_b`` when given (the
      dataset-level modes: see ``dataset_weights``); otherwise computed here at
      ``params`` from ``g = ∇ heldout_loss_fn`` (the per-batch mode), and
      shuffled with ``shuffle_u_b`` when ``recipe.shuffle``.
    * ``value_loss_fn(params) -> [B]`` overrides the example losses the values
      are taken of (e.g. with the defense parameter under stop_gradient).
    Weights never carry gradient.
    """
    loss_bt, mask_bt = token_loss_fn(params)
    mask_b = jnp.sum(mask_bt, axis=-1) > 0
    if not recipe.weighted:
        w = None
    elif weights_b is not None:
        w = jnp.asarray(weights_b, jnp.float32)
    else:
        if heldout_loss_fn is None:
            raise ValueError("recipe_loss: a per-batch weighted recipe needs heldout_loss_fn (for g)")
        g = jax.grad(heldout_loss_fn)(params)

        def per_example(p):
            if value_loss_fn is not None:
                return value_loss_fn(p)
            l_bt, m_bt = token_loss_fn(p)
            return sequence_nll(-l_bt, m_bt)

        a = recipe_scores(recipe, per_example, params, g)
        w = recipe_weights(recipe, a, beta, mask_b)
        if recipe.shuffle:
            if shuffle_u_b is None:
                raise ValueError("recipe_loss: recipe.shuffle needs shuffle_u_b")
            w = shuffle_weights(w, mask_b, shuffle_u_b)
    if w is not None:
        w = jax.lax.stop_gradient(w)
    loss = weighted_nll(-loss_bt, mask_bt, w, recipe.averaging)
    ess = jnp.float32(1.0) if w is None else ess_fraction(w, mask_b)
    return loss, {"ess_fraction": ess}


def _chunked(fn: Callable, data: dict, chunk: int) -> Any:
    """``fn`` over ``chunk``-row slices of the [N, ...] arrays in ``data`` (zero-padded), via lax.map;
    returns the stacked outputs [n_chunks, ...]."""
    n = next(iter(data.values())).shape[0]
    chunk = max(1, min(chunk, n))
    n_pad = -n % chunk
    padded = {k: jnp.pad(v, [(0, n_pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in data.items()}
    split = {k: v.reshape((-1, chunk) + v.shape[1:]) for k, v in padded.items()}
    return jax.lax.map(fn, split), n


def dataset_gradient(
    sum_loss_fn: Callable[[Any, dict], tuple[jax.Array, jax.Array]], params: Any, data: dict, chunk: int
) -> Any:
    """``g = ∇ (Σ losses / Σ counts)`` over a whole data set, ``chunk`` rows at a time.

    ``sum_loss_fn(params, rows) -> (sum of token losses, number of tokens)`` on a
    slice (zero-padded rows must count 0 tokens). Equals ``jax.grad`` of the
    full-set token-mean loss.
    """

    def one(rows):
        grad, count = jax.grad(lambda p: sum_loss_fn(p, rows), has_aux=True)(params)
        return grad, count

    (grads, counts), _ = _chunked(one, data, chunk)
    total = jnp.maximum(jnp.sum(counts), 1.0)
    return jax.tree.map(lambda x: jnp.sum(x, axis=0) / total, grads)


def dataset_weights(
    recipe: Recipe,
    beta: Any,
    per_example_loss: Callable[[Any, dict], jax.Array],
    params: Any,
    g: Any,
    data: dict,
    mask_n: jax.Array,
    chunk: int,
    shuffle_u_n: jax.Array | None = None,
) -> jax.Array:
    """Weights of every training example at once (the dataset-level modes).

    Scores ``recipe_scores`` of all N examples at ``params`` along ``g`` (``chunk``
    rows at a time), then ``recipe_weights`` over the whole set (standardised and
    normalised to mean 1 over the valid examples ``mask_n``), then the shuffle
    control if asked. ``per_example_loss(params, rows) -> [chunk]``. Returns [N].
    """
    scores, n = _chunked(lambda rows: recipe_scores(recipe, per_example_loss, params, g, rows), data, chunk)
    a = scores.reshape(-1)[:n]
    w = recipe_weights(recipe, a, beta, mask_n)
    if recipe.shuffle:
        if shuffle_u_n is None:
            raise ValueError("dataset_weights: recipe.shuffle needs shuffle_u_n")
        w = shuffle_weights(w, mask_n, shuffle_u_n)
    return w
