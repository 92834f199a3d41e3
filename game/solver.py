"""Alternating / simultaneous / optimistic gradient descent-ascent for the PoE game.

The game (DESIGN.md, "The differentiable game") has three players:

- the **student** θ (any pytree) descends the distillation loss `L_D(θ; γ)`;
- the **teacher** chooses the PoE weight γ ∈ [0, γ_max] and ascends the Lagrangian

      L(γ, μ) = J(θ⁺(γ)) − ψ_ρ(v(γ), μ),      v(γ) = U(0) − U(γ) − δ,

  where `θ⁺(γ)` is K unrolled plain gradient-descent steps of the student from the
  current θ (so γ gets a hypergradient through the student's response), `J` the
  student's capability loss, `U` the teacher's utility and δ the utility budget in
  nats/token. ψ_ρ is the augmented-Lagrangian term for an inequality constraint
  (Rockafellar): `ψ_ρ(v, μ) = μ v + ρ/2 v²` if `μ + ρ v >= 0`, else `−μ²/(2ρ)`; with
  ρ = 0 it is the plain `μ v`. Its KKT points are the same for every ρ >= 0;
  ρ > 0 only adds curvature `−ρ U'(γ)²` to the teacher's problem near an active
  constraint, which damps the rotation between γ and μ (see "Tuning" below);
- the **dual** μ >= 0 descends L, i.e. ascends along the violation `∂ψ/∂μ`
  (= v when ρ = 0), and is projected back onto μ >= 0.

Every player's optimizer is an optax transformation; ascent is descent on the
negated gradient. The teacher's gradient is exact forward-mode (`jax.jvp`) in the
scalar γ through the K-step unroll (forward-over-reverse: it stores no tape over
the unroll, so memory stays at about one student step).

Parameterisations of γ (`SolverConfig.gamma_param`):

- "projection" (default): the teacher parameter *is* γ, clipped to [0, γ_max]
  after every update. Reaches γ_max exactly when the budget is slack.
- "sigmoid": teacher parameter ρ_T with γ = γ_max · sigmoid(ρ_T); smooth and
  unconstrained but approaches the bounds only asymptotically.

Pure API: `init_state`, `make_step` (jittable, vmappable over budgets), `solve`
(Python loop, no printing), `check_converged`, `first_nonfinite`.

Tuning (measured on the toy game, tests/test_solver.py):

- The toy converges to 1e-5 of the exact γ* in 60-230 iterations with: Adam student,
  student_lr 0.1, student_steps 3; unroll_lr 1.0, K = 1; SGD teacher_lr 0.2; SGD
  dual_lr 0.5; penalty ρ = 1 (the same for all three algorithms).
- Without the penalty, 'alternating' and 'simultaneous' limit-cycle around a binding
  budget (J(p_γ) is convex in γ, so nothing damps the γ–μ rotation); 'optimistic'
  converges without it. Use ρ ≈ 1 / U'(γ*)² (U' in nats per unit γ) and dual_lr ≈ ρ/2,
  and pick teacher_lr so that teacher_lr · ρ · U'(γ*)² ≈ 0.1-0.3.
- Adam (or optimistic Adam) with a constant learning rate for the teacher or dual does
  not settle (its normalised steps do not shrink); use 'sgd' / 'ogd' there.
- The hypergradient, and so μ*, scales with unroll_lr · K; the equilibrium γ of a
  binding budget does not. tol_grad is absolute in those units.
- gamma_param='sigmoid' is much slower (dγ/dρ_T is small near the bounds) and never
  reaches γ_max; prefer 'projection'.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

ALGORITHMS = ("alternating", "simultaneous", "optimistic")
STUDENT_OPTIMIZERS = ("adam", "sgd")
PLAYER_OPTIMIZERS = ("sgd", "adam")
OPTIMISTIC_VARIANTS = ("ogd", "adam")
GAMMA_PARAMS = ("projection", "sigmoid")


# ---------------------------------------------------------------------------
# Game and config
# ---------------------------------------------------------------------------


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
        "K: unrolled plain-GD student steps inside the teacher's objective J(θ⁺(γ)) (>= 1)", 1
    )
    student_lr: float = _help("student optimizer learning rate (> 0)", 1e-2)
    unroll_lr: float | None = _help(
        "step size of the K unrolled plain-GD steps; None = student_lr. Only the size of the "
        "hypergradient (and so the scale of μ*) depends on it, not the equilibrium γ when the "
        "budget binds",
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
    teacher_optimizer: str = _help(
        "teacher optax optimizer for 'alternating'/'simultaneous': 'sgd' or 'adam'", "sgd"
    )
    dual_optimizer: str = _help(
        "dual optax optimizer for 'alternating'/'simultaneous': 'sgd' or 'adam'", "sgd"
    )
    optimistic_variant: str = _help(
        "teacher and dual optimizer under algorithm='optimistic': 'ogd' = "
        "optax.optimistic_gradient_descent, 'adam' = optax.optimistic_adam_v2",
        "ogd",
    )
    gamma_param: str = _help(
        "'projection': γ itself, clipped to [0, gamma_max]; 'sigmoid': γ = gamma_max·sigmoid(ρ_T)",
        "projection",
    )
    gamma_max: float = _help("upper bound on the PoE weight, in (0, 1)", 0.95)
    gamma_init: float = _help(
        "initial γ, in [0, gamma_max] (strictly inside for gamma_param='sigmoid')", 0.05
    )
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
        "convergence: constraint violation U(0)−U(γ)−δ and dual stationarity "
        "|μ − max(0, μ + ∂ψ/∂μ)| below this",
        1e-4,
    )
    tol_grad: float = _help(
        "convergence: teacher stationarity |γ − clip(γ + ∂L/∂γ, 0, gamma_max)| below this "
        "(absolute, in units of ∂L/∂γ, which scale with unroll_lr·unroll_steps)",
        1e-3,
    )
    tol_student_grad: float = _help(
        "convergence: student gradient norm below this (inf = not checked, e.g. for "
        "stochastic batches)",
        math.inf,
    )
    patience: int = _help("convergence: consecutive iterations meeting every tolerance (>= 1)", 10)
    max_iters: int = _help("solve(): iteration limit (>= 1)", 1000)

    def validate(self) -> "SolverConfig":
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
        if not 0.0 < self.gamma_max < 1.0:
            bad("gamma_max", "must lie in (0, 1)")
        if self.gamma_param == "sigmoid":
            if not 0.0 < self.gamma_init < self.gamma_max:
                bad("gamma_init", "must lie in (0, gamma_max) when gamma_param='sigmoid'")
        elif not 0.0 <= self.gamma_init <= self.gamma_max:
            bad("gamma_init", "must lie in [0, gamma_max]")
        for name in ("delta", "mu_init", "penalty", "lr_decay", "tol_gamma", "tol_violation", "tol_grad",
                     "tol_student_grad"):
            if not getattr(self, name) >= 0:  # also rejects NaN
                bad(name, "must be >= 0")
        return self

    @property
    def effective_unroll_lr(self) -> float:
        return self.student_lr if self.unroll_lr is None else self.unroll_lr


# ---------------------------------------------------------------------------
# Optimizers, state
# ---------------------------------------------------------------------------


class Optimizers(NamedTuple):
    student: optax.GradientTransformation
    teacher: optax.GradientTransformation
    dual: optax.GradientTransformation


def make_player_optimizer(name: str, lr: float, decay: float = 0.0) -> optax.GradientTransformation:
    """The optax transformation for one player: 'sgd', 'adam', 'ogd'
    (optax.optimistic_gradient_descent) or 'optimistic_adam' (optax.optimistic_adam_v2),
    with step size lr / (1 + decay·t). Optax minimises; a maximising player feeds it the
    negated gradient."""
    if decay:
        lr = lambda count, lr0=lr: lr0 / (1.0 + decay * count)  # noqa: E731
    if name == "sgd":
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr)
    if name == "ogd":
        return optax.optimistic_gradient_descent(lr)
    if name == "optimistic_adam":
        return optax.optimistic_adam_v2(lr)
    raise ValueError(f"unknown optimizer {name!r}")


def make_optimizers(cfg: SolverConfig) -> Optimizers:
    """The three players' optax transformations as the config specifies them."""
    if cfg.algorithm == "optimistic":
        name = "ogd" if cfg.optimistic_variant == "ogd" else "optimistic_adam"
        teacher, dual = name, name
    else:
        teacher, dual = cfg.teacher_optimizer, cfg.dual_optimizer
    return Optimizers(
        student=make_player_optimizer(cfg.student_optimizer, cfg.student_lr),
        teacher=make_player_optimizer(teacher, cfg.teacher_lr, cfg.lr_decay),
        dual=make_player_optimizer(dual, cfg.dual_lr, cfg.lr_decay),
    )


class SolverState(NamedTuple):
    """Everything one iteration reads and writes. All leaves are arrays, so a batch
    of states (one per budget δ) is this same structure with a leading axis."""

    theta: PyTree  # student parameters
    student_opt_state: PyTree
    teacher_param: jax.Array  # γ ('projection') or ρ_T with γ = γ_max·sigmoid(ρ_T) ('sigmoid')
    teacher_opt_state: PyTree
    mu: jax.Array  # Lagrange multiplier, >= 0
    dual_opt_state: PyTree
    delta: jax.Array  # utility budget, nats/token
    utility_ref: jax.Array  # U(0), computed once by init_state
    iteration: jax.Array  # int32, iterations done
    streak: jax.Array  # int32, consecutive iterations meeting every tolerance


def gamma_from_param(param: jax.Array, cfg: SolverConfig) -> jax.Array:
    if cfg.gamma_param == "sigmoid":
        return cfg.gamma_max * jax.nn.sigmoid(param)
    return param


def param_from_gamma(gamma, cfg: SolverConfig) -> jax.Array:
    gamma = jnp.asarray(gamma, dtype=jnp.result_type(float))
    if cfg.gamma_param == "sigmoid":
        r = gamma / cfg.gamma_max
        return jnp.log(r) - jnp.log1p(-r)
    return gamma


def state_gamma(state: SolverState, cfg: SolverConfig) -> jax.Array:
    """The current PoE weight γ of a state (or of a batch of states)."""
    return gamma_from_param(state.teacher_param, cfg)


def init_state(
    game: Game,
    cfg: SolverConfig,
    theta: PyTree,
    util_batch: Any,
    delta=None,
    optimizers: Optimizers | None = None,
) -> SolverState:
    """Initial state. `delta` None = cfg.delta; a 1-D array of budgets gives a batched
    state (leading axis = budget) for `make_step(..., batched=True)` / `solve`.
    U(0) is evaluated here, once, on `util_batch` (keep that batch fixed, or
    re-initialise, if the utility batch changes)."""
    cfg.validate()
    opt = optimizers or make_optimizers(cfg)
    delta = jnp.asarray(cfg.delta if delta is None else delta, dtype=jnp.result_type(float))
    if delta.ndim > 1:
        raise ValueError(f"delta must be a scalar or a 1-D array of budgets, got shape {delta.shape}")
    if not isinstance(delta, jax.core.Tracer) and bool(jnp.any(delta < 0)):
        raise ValueError(f"delta={delta} must be >= 0")
    if cfg.violation_scale == "relative" and not isinstance(delta, jax.core.Tracer) and bool(jnp.any(delta <= 0)):
        raise ValueError(f"delta={delta} must be > 0 with violation_scale='relative'")
    u0 = jnp.asarray(game.utility(jnp.zeros((), jnp.result_type(float)), util_batch))

    def one(d):
        param = param_from_gamma(cfg.gamma_init, cfg)
        mu = jnp.asarray(cfg.mu_init, dtype=jnp.result_type(float))
        return SolverState(
            theta=theta,
            student_opt_state=opt.student.init(theta),
            teacher_param=param,
            teacher_opt_state=opt.teacher.init(param),
            mu=mu,
            dual_opt_state=opt.dual.init(mu),
            delta=d,
            utility_ref=u0,
            iteration=jnp.zeros((), jnp.int32),
            streak=jnp.zeros((), jnp.int32),
        )

    if delta.ndim == 0:
        return one(delta)
    return jax.vmap(one)(delta)


# ---------------------------------------------------------------------------
# Pieces of one iteration (public: tests and the lead's experiments use them)
# ---------------------------------------------------------------------------


def tree_norm(tree: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros(())
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def unrolled_student(game: Game, theta: PyTree, gamma, student_batch, steps: int, lr: float):
    """θ⁺(γ): `steps` plain gradient-descent steps of the student on L_D(·; γ) from θ,
    differentiable in γ (and θ)."""

    # A Python loop, not lax.scan: K is small and static, and on jax 0.10.2 the forward-mode
    # derivative in γ of a scan over `jax.grad` came out wrong by ~1e24 when the equilibrium
    # sweep vmapped budgets with their own prefixes (a loop matched finite differences).
    for _ in range(steps):
        g = jax.grad(game.student_loss)(theta, gamma, student_batch)
        theta = jax.tree_util.tree_map(lambda p, d: p - lr * d, theta, g)
    return theta


def capability_hypergradient(
    game: Game, cfg: SolverConfig, theta: PyTree, gamma, student_batch, eval_batch
) -> tuple[jax.Array, jax.Array]:
    """(J(θ⁺(γ)), dJ(θ⁺(γ))/dγ) with θ⁺ the K-step unroll; forward mode in the scalar γ."""

    def f(g):
        tp = unrolled_student(game, theta, g, student_batch, cfg.unroll_steps, cfg.effective_unroll_lr)
        return game.capability_loss(tp, eval_batch)

    gamma = jnp.asarray(gamma, dtype=jnp.result_type(float))
    return jax.jvp(f, (gamma,), (jnp.ones_like(gamma),))


def constraint_violation(cfg: SolverConfig, utility_ref, U, delta):
    """v(γ) = U(0) − U(γ) − δ, divided by δ when cfg.violation_scale == 'relative'."""
    v = utility_ref - U - delta
    return v / delta if cfg.violation_scale == "relative" else v


def augmented_term(v, mu, penalty: float):
    """(ψ_ρ(v, μ), ∂ψ/∂v, ∂ψ/∂μ) of the (augmented) Lagrangian for the constraint v <= 0."""
    if penalty == 0.0:
        return mu * v, mu, v
    active = mu + penalty * v >= 0
    psi = jnp.where(active, mu * v + 0.5 * penalty * v * v, -(mu * mu) / (2.0 * penalty))
    dpsi_dv = jnp.maximum(mu + penalty * v, 0.0)
    dpsi_dmu = jnp.where(active, v, -mu / penalty)
    return psi, dpsi_dv, dpsi_dmu


def teacher_lagrangian(
    game: Game, cfg: SolverConfig, theta, gamma, mu, delta, utility_ref, student_batch, eval_batch, util_batch
) -> tuple[jax.Array, jax.Array, dict]:
    """(L, ∂L/∂γ, aux) of the teacher's (augmented) Lagrangian
    `J(θ⁺(γ)) − ψ_ρ(U(0) − U(γ) − δ, μ)`. The teacher ascends it."""
    gamma = jnp.asarray(gamma, dtype=jnp.result_type(float))
    one = jnp.ones_like(gamma)
    J, dJ = capability_hypergradient(game, cfg, theta, gamma, student_batch, eval_batch)
    U, dU = jax.jvp(lambda g: game.utility(g, util_batch), (gamma,), (one,))
    v = constraint_violation(cfg, utility_ref, U, delta)
    psi, dpsi_dv, _ = augmented_term(v, mu, cfg.penalty)
    lag = J - psi
    dv_dU = -1.0 / delta if cfg.violation_scale == "relative" else -1.0
    dlag = dJ - dpsi_dv * dv_dU * dU
    return lag, dlag, {"J": J, "dJ": dJ, "U": U, "dU": dU, "violation": v}


def meets_tolerances(diag: dict, cfg: SolverConfig):
    """Whether one iteration's diagnostics meet every tolerance (works on jax arrays,
    numpy values and batched diagnostics, elementwise)."""
    xp = jnp if isinstance(diag["gamma"], jax.Array) else np
    ok = (
        (xp.abs(diag["delta_gamma"]) < cfg.tol_gamma)
        & (diag["violation"] <= cfg.tol_violation)
        & (diag["dual_stationarity"] <= cfg.tol_violation)
        & (diag["teacher_stationarity"] <= cfg.tol_grad)
    )
    if math.isfinite(cfg.tol_student_grad):
        ok = ok & (diag["student_grad_norm"] <= cfg.tol_student_grad)
    return ok


def check_converged(history_window: Sequence[dict], cfg: SolverConfig) -> bool:
    """Stopping rule as a pure function of the last iterations' diagnostics: the last
    `cfg.patience` iterations all meet every tolerance (|Δγ| < tol_gamma, violation <=
    tol_violation, dual stationarity <= tol_violation, teacher stationarity <= tol_grad,
    and the student gradient norm <= tol_student_grad when finite). For batched
    (vmapped-budget) diagnostics every budget must meet them. The step carries the same
    rule as `state.streak` and reports it as diagnostics['converged']."""
    window = list(history_window)[-cfg.patience:]
    if len(window) < cfg.patience:
        return False
    return all(bool(np.all(meets_tolerances({k: np.asarray(v) for k, v in d.items()}, cfg)))
               for d in window)


# ---------------------------------------------------------------------------
# One iteration
# ---------------------------------------------------------------------------


DIAGNOSTIC_KEYS = (
    "iteration", "student_loss", "student_grad_norm", "student_param_norm", "J", "lagrangian",
    "teacher_grad", "teacher_grad_norm", "teacher_stationarity", "gamma", "delta_gamma", "U",
    "violation", "utility_drop", "dual_grad", "dual_grad_norm", "dual_stationarity", "mu", "streak", "converged",
)


def solver_step(
    game: Game,
    cfg: SolverConfig,
    state: SolverState,
    student_batch,
    eval_batch,
    util_batch,
    optimizers: Optimizers | None = None,
) -> tuple[SolverState, dict]:
    """One iteration of the configured algorithm (see SolverConfig.algorithm).

    Diagnostics (scalars; keys in DIAGNOSTIC_KEYS, in computation order):
      iteration: index of this iteration (0-based);
      student_loss, student_grad_norm: L_D and ‖∇θ L_D‖ at the last inner student step
        (before its update);
      student_param_norm: ‖θ‖ after the student update (non-finite θ shows here);
      J: J(θ⁺(γ)) at the θ and γ the teacher differentiated; lagrangian: its L;
      teacher_grad: ∂L/∂γ (signed, ascent direction); teacher_grad_norm: |∂L/∂teacher_param|;
      teacher_stationarity: see SolverConfig.tol_grad;
      gamma, delta_gamma: γ after the update and |γ_new − γ_old|;
      U, violation: U(γ_new) and U(0) − U(γ_new) − δ (the returned γ's feasibility);
      dual_grad: ∂ψ/∂μ, the direction μ ascends (= violation at the γ the dual saw, when ρ=0);
      dual_grad_norm: its absolute value; dual_stationarity: |μ − max(0, μ + ∂ψ/∂μ)|;
      mu: μ after the update;
      streak: consecutive iterations meeting every tolerance; converged: streak >= patience.
    """
    opt = optimizers or make_optimizers(cfg)
    sg = jax.lax.stop_gradient
    gamma_old = gamma_from_param(state.teacher_param, cfg)
    theta_old = state.theta

    # --- student: k_S descent steps on L_D(θ; γ_old) -----------------------------------
    def student_body(carry, _):
        th, os = carry
        loss, g = jax.value_and_grad(game.student_loss)(th, sg(gamma_old), student_batch)
        upd, os = opt.student.update(g, os, th)
        return (optax.apply_updates(th, upd), os), (loss, tree_norm(g))

    (theta_new, student_os), (losses, gnorms) = jax.lax.scan(
        student_body, (theta_old, state.student_opt_state), None, length=cfg.student_steps
    )

    # --- teacher: one ascent step on the Lagrangian in γ ----------------------------------
    theta_for_teacher = theta_old if cfg.algorithm == "simultaneous" else theta_new
    lag, dlag_dgamma, aux = teacher_lagrangian(
        game, cfg, sg(theta_for_teacher), gamma_old, sg(state.mu), state.delta, state.utility_ref,
        student_batch, eval_batch, util_batch,
    )
    if cfg.gamma_param == "sigmoid":
        dgamma_dparam = jax.grad(lambda p: gamma_from_param(p, cfg))(state.teacher_param)
        g_param = dlag_dgamma * dgamma_dparam
    else:
        g_param = dlag_dgamma
    # Projected-gradient (unit-step gradient mapping) stationarity in γ-space, for both
    # parameterisations: |∂L/∂γ| inside (0, γ_max), 0 at a bound the gradient pushes into.
    teacher_stationarity = jnp.abs(gamma_old - jnp.clip(gamma_old + dlag_dgamma, 0.0, cfg.gamma_max))
    upd, teacher_os = opt.teacher.update(-g_param, state.teacher_opt_state, state.teacher_param)
    param_new = optax.apply_updates(state.teacher_param, upd)
    if cfg.gamma_param == "projection":
        param_new = jnp.clip(param_new, 0.0, cfg.gamma_max)
    gamma_new = gamma_from_param(param_new, cfg)

    # --- dual: one ascent step along ∂ψ/∂μ, projected to μ >= 0 ----------------------------
    U_new = game.utility(gamma_new, util_batch)
    v_new = constraint_violation(cfg, state.utility_ref, U_new, state.delta)
    v_dual = v_new if cfg.algorithm == "alternating" else aux["violation"]
    _, _, dpsi_dmu = augmented_term(v_dual, state.mu, cfg.penalty)
    upd, dual_os = opt.dual.update(-dpsi_dmu, state.dual_opt_state, state.mu)
    mu_new = jnp.maximum(optax.apply_updates(state.mu, upd), 0.0)
    dual_stationarity = jnp.abs(state.mu - jnp.maximum(state.mu + dpsi_dmu, 0.0))

    diag = {
        "iteration": state.iteration,
        "student_loss": losses[-1],
        "student_grad_norm": gnorms[-1],
        "student_param_norm": tree_norm(theta_new),
        "J": aux["J"],
        "lagrangian": lag,
        "teacher_grad": dlag_dgamma,
        "teacher_grad_norm": jnp.abs(g_param),
        "teacher_stationarity": teacher_stationarity,
        "gamma": gamma_new,
        "delta_gamma": jnp.abs(gamma_new - gamma_old),
        "U": U_new,
        "violation": v_new,
        "utility_drop": state.utility_ref - U_new,
        "dual_grad": dpsi_dmu,
        "dual_grad_norm": jnp.abs(dpsi_dmu),
        "dual_stationarity": dual_stationarity,
        "mu": mu_new,
    }
    streak = jnp.where(meets_tolerances(diag, cfg), state.streak + 1, 0).astype(jnp.int32)
    diag["streak"] = streak
    diag["converged"] = streak >= cfg.patience

    new_state = SolverState(
        theta=theta_new,
        student_opt_state=student_os,
        teacher_param=param_new,
        teacher_opt_state=teacher_os,
        mu=mu_new,
        dual_opt_state=dual_os,
        delta=state.delta,
        utility_ref=state.utility_ref,
        iteration=state.iteration + 1,
        streak=streak,
    )
    return new_state, diag


def make_step(
    game: Game, cfg: SolverConfig, batched: bool = False, optimizers: Optimizers | None = None
) -> Callable:
    """A pure `step(state, student_batch, eval_batch, util_batch) -> (state, diagnostics)`
    closing over the (static) game and config, ready for `jax.jit`. With `batched=True`
    it is vmapped over the leading (budget) axis of the state; batches are shared."""
    cfg.validate()
    opt = optimizers or make_optimizers(cfg)

    def step(state, student_batch, eval_batch, util_batch):
        return solver_step(game, cfg, state, student_batch, eval_batch, util_batch, opt)

    if batched:
        return jax.vmap(step, in_axes=(0, None, None, None))
    return step


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


class SolverDivergedError(RuntimeError):
    """A diagnostic became NaN or infinite."""

    def __init__(self, iteration: int, quantity: str, value: Any = None):
        self.iteration = iteration
        self.quantity = quantity
        self.value = value
        kind = "NaN" if value is not None and np.any(np.isnan(np.asarray(value, dtype=float))) else "non-finite value"
        super().__init__(f"{kind} in {quantity} at iteration {iteration}")


def first_nonfinite(diagnostics: dict) -> str | None:
    """Name of the first diagnostic holding a NaN or ±inf, else None. Known keys are checked
    in computation order (DIAGNOSTIC_KEYS; jit returns dicts with sorted keys), then any
    others in dict order."""
    names = [k for k in DIAGNOSTIC_KEYS if k in diagnostics]
    names += [k for k in diagnostics if k not in DIAGNOSTIC_KEYS]
    for name in names:
        value = diagnostics[name]
        arr = np.asarray(value)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            return name
    return None


@functools.lru_cache(maxsize=32)
def _jitted_step(game: Game, cfg: SolverConfig, batched: bool, optimizers: Optimizers | None):
    """One compiled step per (game, config, batched, optimizers): repeated solve() calls
    (e.g. a sweep over initial states) do not recompile."""
    return jax.jit(make_step(game, cfg, batched=batched, optimizers=optimizers))


def _ordered(diag: dict) -> dict:
    out = {k: diag[k] for k in DIAGNOSTIC_KEYS if k in diag}
    out.update((k, v) for k, v in diag.items() if k not in out)
    return out


class SolveResult(NamedTuple):
    state: SolverState
    diagnostics: dict  # last iteration's, as numpy values
    iterations: int  # iterations run
    converged: bool


def solve(
    game: Game,
    cfg: SolverConfig,
    state: SolverState,
    batches,
    callback: Callable[[int, dict], Any] | None = None,
    optimizers: Optimizers | None = None,
    jit: bool = True,
) -> SolveResult:
    """Iterate the jitted step until diagnostics['converged'] (all budgets, for a batched
    state) or cfg.max_iters. `batches` is a tuple (student_batch, eval_batch, util_batch)
    or a callable `batches(i)` returning one (the caller resamples prefixes there).
    `callback(i, diagnostics)` (numpy values) runs after every iteration. Raises
    SolverDivergedError naming the iteration and the first non-finite quantity."""
    cfg.validate()
    batched = jnp.ndim(state.delta) == 1
    if jit:
        step = _jitted_step(game, cfg, batched, optimizers)
    else:
        step = make_step(game, cfg, batched=batched, optimizers=optimizers)
    get = batches if callable(batches) else (lambda i: batches)
    diag: dict = {}
    for i in range(cfg.max_iters):
        new_state, diag_dev = step(state, *get(i))
        diag = _ordered(jax.device_get(diag_dev))
        bad = first_nonfinite(diag)
        if bad is not None:
            raise SolverDivergedError(i, bad, diag[bad])
        state = new_state
        if callback is not None:
            callback(i, diag)
        if bool(np.all(diag["converged"])):
            return SolveResult(state, diag, i + 1, True)
    return SolveResult(state, diag, cfg.max_iters, False)
