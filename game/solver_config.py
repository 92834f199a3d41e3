"""What the min-max solver is given: the game as three pure functions (`Game`) and the
solver's hyper-parameters (`SolverConfig`, every field documented in its help, validated by
`SolverConfig.validate`). game/solver.py describes the game and the algorithms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax

PyTree = Any

ALGORITHMS = ("alternating", "simultaneous", "optimistic")
STUDENT_OPTIMIZERS = ("adam", "sgd")
PLAYER_OPTIMIZERS = ("sgd", "adam")
OPTIMISTIC_VARIANTS = ("ogd", "adam")
GAMMA_PARAMS = ("projection", "sigmoid")
UNROLL_FROM = ("current", "base")


@dataclasses.dataclass(frozen=True)
class Game:
    """The game as three pure, jax-traceable functions.

    Batches are arbitrary pytrees chosen by the caller; the solver only passes them
    through. All three functions must be differentiable (the teacher's gradient
    differentiates `student_loss` w.r.t. θ and then w.r.t. γ).
    """

    student_loss: Callable[[PyTree, jax.Array, Any], jax.Array]
    """(theta, gamma, batch) -> scalar L_D: soft-target distillation loss of the student
    on prefixes from the defended teacher (adaptive weights already folded in)."""
    capability_loss: Callable[[PyTree, Any], jax.Array]
    """(theta, batch) -> scalar J: student NLL on clean reference solutions
    (the teacher wants it HIGH)."""
    utility: Callable[[jax.Array, Any], jax.Array]
    """(gamma, batch) -> scalar U(γ): teacher's mean log-likelihood per token of correct
    solutions under the defended distribution (higher = more useful)."""
    minibatch: Callable[[Any, jax.Array], Any] | None = None
    """(student_batch, step) -> the batch of unrolled step `step` (a traced int); None = the
    whole student batch at every step. Lets the horizon draw minibatches from a prefix
    pool in a fixed order, as the protocol's distillation does."""
    strength_sup: float = 1.0
    """γ's supremum, which cfg.gamma_max must stay below: PoE's 1; ADS λ's inf (game/registry.py)."""


def _help(text: str, default: Any):
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Hyper-parameters of the min-max solver. Every field is documented in its help."""

    algorithm: str = _help(
        "'alternating': student steps, then teacher at the new θ, then dual at the new γ; "
        "'simultaneous': every player's gradient at the same old state; "
        "'optimistic': student steps, then teacher and dual simultaneously with optax's "
        "optimistic optimizers (see optimistic_variant)",
        "alternating",
    )
    student_steps: int = _help("k_S: student optimizer steps per iteration (>= 1)", 1)
    unroll_steps: int = _help(
        "T (or K): student steps inside the teacher's objective J(θ_T(γ)) (>= 1); with "
        "unroll_from='base' the protocol's distillation horizon",
        1,
    )
    unroll_from: str = _help(
        "'base': Stackelberg, θ_T(γ) = unroll_steps steps of the unroll optimizer from the "
        "student's base (the state's θ, never updated); 'current': myopic, unroll_steps plain "
        "GD steps from the student's current θ, which descends L_D every iteration",
        "base",
    )
    unroll_optimizer: str = _help(
        "optimizer of the unrolled steps with unroll_from='base': 'sgd' or 'adam' (adam with "
        "eps_root > 0 so forward mode stays finite for parameters whose gradient is 0); "
        "unroll_from='current' always uses plain GD",
        "sgd",
    )
    student_lr: float = _help("student optimizer learning rate (> 0)", 1e-2)
    unroll_lr: float | None = _help(
        "step size of the unrolled student steps; None = student_lr. It changes the objective, "
        "not only the hypergradient's scale: see 'Tuning' in game/solver.py (only with a binding "
        "budget and a hypergradient of the right sign over the feasible interval is γ* "
        "independent of it)",
        None,
    )
    teacher_lr: float = _help("teacher (γ) optimizer learning rate (> 0)", 1e-2)
    dual_lr: float = _help("dual (μ) optimizer learning rate (> 0)", 1e-2)
    lr_decay: float = _help(
        "teacher and dual step sizes decay as lr / (1 + lr_decay·t) at iteration t (>= 0; "
        "0 = constant). With stochastic hypergradients (resampled prefixes) a constant step "
        "leaves γ wandering by about lr·(gradient noise); a Robbins–Monro decay lets it settle",
        0.0,
    )
    student_optimizer: str = _help("student optax optimizer: 'adam' or 'sgd'", "adam")
    teacher_optimizer: str = _help("teacher optax optimizer for 'alternating'/'simultaneous': 'sgd' or 'adam'", "sgd")
    dual_optimizer: str = _help("dual optax optimizer for 'alternating'/'simultaneous': 'sgd' or 'adam'", "sgd")
    optimistic_variant: str = _help(
        "teacher and dual optimizer under algorithm='optimistic': 'ogd' = "
        "optax.optimistic_gradient_descent, 'adam' = optax.optimistic_adam_v2",
        "ogd",
    )
    gamma_param: str = _help(
        "'projection': γ itself, clipped to [0, gamma_max]; 'sigmoid': γ = gamma_max·sigmoid(ρ_T)",
        "projection",
    )
    gamma_max: float = _help("upper bound on the defense strength γ (PoE: in (0, 1); ADS λ: > 0)", 0.95)
    gamma_init: float = _help("initial γ, in [0, gamma_max] (strictly inside for gamma_param='sigmoid')", 0.05)
    delta: float = _help(
        "default utility budget δ >= 0 in nats/token (init_state may override it per state, "
        "e.g. a vector of budgets solved at once under vmap)",
        0.1,
    )
    violation_scale: str = _help(
        "'absolute': the constraint is v = U(0) − U(γ) − δ (nats/token); 'relative': v / δ, "
        "the violation as a fraction of the budget (needs δ > 0). Same feasible set and γ*; "
        "'relative' gives budgets of very different sizes the same conditioning, so one set "
        "of learning rates serves a whole vmapped sweep (tol_violation is then relative too)",
        "absolute",
    )
    mu_init: float = _help("initial Lagrange multiplier μ >= 0", 0.0)
    penalty: float = _help(
        "augmented-Lagrangian penalty ρ >= 0 (0 = plain Lagrangian). Same KKT points; "
        "ρ > 0 damps the γ–μ oscillation around an active budget (alternating/simultaneous "
        "GDA limit-cycle without it on the toy); about 1 / U'(γ*)²",
        1.0,
    )
    tol_gamma: float = _help("convergence: |Δγ| per iteration below this", 1e-5)
    tol_violation: float = _help(
        "convergence: constraint violation U(0)−U(γ)−δ and dual stationarity |μ − max(0, μ + ∂ψ/∂μ)| below this",
        1e-4,
    )
    tol_grad: float = _help(
        "convergence: teacher stationarity |γ − clip(γ + ∂L/∂γ, 0, gamma_max)| below this "
        "(absolute, in units of ∂L/∂γ, which scale with unroll_lr·unroll_steps)",
        1e-3,
    )
    tol_student_grad: float = _help(
        "convergence: student gradient norm below this (inf = not checked, e.g. for stochastic batches)",
        math.inf,
    )
    patience: int = _help("convergence: consecutive iterations meeting every tolerance (>= 1)", 10)
    max_iters: int = _help("solve(): iteration limit (>= 1)", 1000)

    def validate(self, strength_sup: float = 1.0) -> "SolverConfig":
        def bad(name: str, why: str):
            raise ValueError(f"SolverConfig.{name}={getattr(self, name)!r} {why}")

        choices = {
            "algorithm": ALGORITHMS,
            "student_optimizer": STUDENT_OPTIMIZERS,
            "teacher_optimizer": PLAYER_OPTIMIZERS,
            "dual_optimizer": PLAYER_OPTIMIZERS,
            "optimistic_variant": OPTIMISTIC_VARIANTS,
            "gamma_param": GAMMA_PARAMS,
            "violation_scale": ("absolute", "relative"),
            "unroll_from": UNROLL_FROM,
            "unroll_optimizer": STUDENT_OPTIMIZERS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, f"must be one of {', '.join(map(repr, allowed))}")
        for name in ("student_steps", "unroll_steps", "patience", "max_iters"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be an integer >= 1")
        for name in ("student_lr", "teacher_lr", "dual_lr"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        if self.unroll_lr is not None and not self.unroll_lr > 0:
            bad("unroll_lr", "must be > 0 or None")
        if not 0.0 < self.gamma_max < strength_sup:
            bad("gamma_max", f"must lie in (0, {strength_sup:g})")
        if self.gamma_param == "sigmoid":
            if not 0.0 < self.gamma_init < self.gamma_max:
                bad("gamma_init", "must lie in (0, gamma_max) when gamma_param='sigmoid'")
        elif not 0.0 <= self.gamma_init <= self.gamma_max:
            bad("gamma_init", "must lie in [0, gamma_max]")
        tolerances = ("tol_gamma", "tol_violation", "tol_grad", "tol_student_grad")
        for name in ("delta", "mu_init", "penalty", "lr_decay", *tolerances):
            if not getattr(self, name) >= 0:  # also rejects NaN
                bad(name, "must be >= 0")
        return self

    @property
    def effective_unroll_lr(self) -> float:
        return self.student_lr if self.unroll_lr is None else self.unroll_lr
