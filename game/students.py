"""Students: example values, passive/adaptive weighting, losses and attacks.

Conventions (docs/design.md, "The example value", "Defenses", "Students"):

* ``ℓ_i(θ) = -mean_t log q_θ(y_i,t | x_i, y_i,<t)``, the per-example NLL.
* ``g = ∇_θ L_ho(θ)``, the gradient of a held-out NLL.
* Example value ``v_i = ⟨∇_θ ℓ_i(θ), g⟩``. Positive = useful: a small gradient
  step on ℓ_i, ``θ - η ∇ℓ_i``, changes the held-out loss by ``-η v_i + O(η²)``,
  so it *lowers* the held-out loss exactly when v_i > 0. Computed exactly with
  one ``jax.jvp`` in float32.
* Adaptive student: ``w_i ∝ exp(β v_i)``, capped, mean 1; β = 0 is passive.
* How the loss is averaged (per token vs per sequence) is a switch separate
  from the weights.
* ``Recipe`` + ``recipe_loss`` / ``dataset_weights``: the ONE place where an
  attacker's recipe (which value, when it is computed, how it becomes a weight,
  how the loss is averaged) is assembled; the protocol's students and the
  equilibrium game both call it. ``REFERENCE_RECIPE`` reproduces the paper's
  public code (named as such: its value has the opposite sign).

Pure JAX; no I/O, no dependence on ``models`` or ``experiments``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from game.defenses import validate_gamma, validate_temperature

__all__ = [
    "example_values",
    "example_values_fd",
    "example_values_reference_code_compat",
    "adaptive_weights",
    "sequence_nll",
    "weighted_nll",
    "degenerate_mask",
    "soft_target_loss",
    "invert_poe",
    "heldout_gradient",
    "Recipe",
    "PASSIVE_RECIPE",
    "REFERENCE_RECIPE",
    "REFERENCE_BETA",
    "recipe_scores",
    "recipe_weights",
    "shuffle_weights",
    "ess_fraction",
    "recipe_loss",
    "dataset_gradient",
    "dataset_weights",
]

AVERAGING_MODES = ("token", "sequence")


# ----------------------------------------------------------------------------
# Example values
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Adaptive weights
# ----------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Filtering
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Attacks
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Attacker recipes: the one place a weighted student is assembled
# ----------------------------------------------------------------------------

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
