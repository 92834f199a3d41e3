"""Alternating / simultaneous / optimistic gradient descent-ascent for the PoE game.

The game (docs/design.md, "The differentiable game") has three players:

- the **student** θ (any pytree) descends the distillation loss `L_D(θ; γ)`;
- the **teacher** chooses the PoE weight γ ∈ [0, γ_max] and ascends the Lagrangian

      L(γ, μ) = J(θ_T(γ)) − ψ_ρ(v(γ), μ),      v(γ) = U(0) − U(γ) − δ,

  where `θ_T(γ)` is the student's response to γ, `J` the student's capability loss,
  `U` the teacher's utility and δ the utility budget in nats/token. ψ_ρ is the
  augmented-Lagrangian term for an inequality constraint (Rockafellar):
  `ψ_ρ(v, μ) = μ v + ρ/2 v²` if `μ + ρ v >= 0`, else `−μ²/(2ρ)`; with ρ = 0 it is the
  plain `μ v`. Its KKT points are the same for every ρ >= 0; ρ > 0 only adds curvature
  `−ρ U'(γ)²` to the teacher's problem near an active constraint, which damps the
  rotation between γ and μ (see "Tuning" below);
- the **dual** μ >= 0 descends L, i.e. ascends along the violation `∂ψ/∂μ`
  (= v when ρ = 0), and is projected back onto μ >= 0.

The student's response θ_T(γ) (`SolverConfig.unroll_from`):

- "base" (Stackelberg, the protocol's setting): T = `unroll_steps` steps of the unroll
  optimizer (`unroll_optimizer`, `unroll_lr`) from the student's *base* θ_0, which the
  state keeps fixed (no student updates). J(θ_T(γ)) is the capability the protocol
  measures after distilling for T steps; its γ-derivative is the true dJ/dγ for that
  horizon, whatever its sign.
- "current" (myopic): K = `unroll_steps` plain gradient-descent steps from the student's
  current θ, which itself descends L_D every iteration. With small K this is a one-step
  lookahead; at a best response its sign can be wrong (the closed-form
  `toy.myopic_trap_spec` is built so that it is, and the "base" horizon is not).

The teacher's gradient is exact forward-mode (`jax.jvp`) in the scalar γ through the
unroll, a `lax.scan` over student steps (forward-over-reverse: no tape over the
horizon, so memory stays at about two copies of the student and its optimizer state,
whatever T; time is about 3x the T student steps). tests/test_solver.py checks it
against central finite differences, also vmapped over budgets with their own batches
(the jax problem noted in earlier versions, forward mode of a vmapped scan over
`jax.grad` off by ~1e24, does not reproduce on jax 0.10.2: a test pins it).

Parameterisations of γ (`SolverConfig.gamma_param`):

- "projection" (default): the teacher parameter *is* γ, clipped to [0, γ_max]
  after every update. Reaches γ_max exactly when the budget is slack.
- "sigmoid": teacher parameter ρ_T with γ = γ_max · sigmoid(ρ_T); smooth and
  unconstrained but approaches the bounds only asymptotically.

Pure API: `init_state`, the three player updates `student_update`, `teacher_update`,
`dual_update` and their composition `solver_step`, `make_step` (jittable, vmappable
over budgets and starts), `solve` (the one driver: Python loop, optional checkpoint and
stop hooks, no I/O of its own), `multi_start`/`best_of_starts`, `check_converged`,
`first_nonfinite`.

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
- unroll_lr with unroll_from='current': the K-step lookahead is a different objective
  for every step size, not a rescaled one. At a best response and for small lr·K its
  hypergradient is about lr·K times a Fisher-weighted dJ/dγ, whose sign can differ from
  the true dJ/dγ; away from a best response (e.g. the student's base) a large lr
  overshoots and the sign can flip with lr. Only with a binding budget and a
  hypergradient whose sign is right on the whole feasible interval is γ* independent
  of lr (μ* scales with it). With unroll_from='base' it is the distillation learning
  rate the horizon models.
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
UNROLL_FROM = ("current", "base")


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


# ---------------------------------------------------------------------------
# Optimizers, state
# ---------------------------------------------------------------------------


class Optimizers(NamedTuple):
    student: optax.GradientTransformation
    teacher: optax.GradientTransformation
    dual: optax.GradientTransformation
    unroll: optax.GradientTransformation | None = None  # the horizon's (unroll_from='base'); None = from cfg


def make_player_optimizer(name: str, lr: float, decay: float = 0.0) -> optax.GradientTransformation:
    """The optax transformation for one player: 'sgd', 'adam', 'ogd'
    (optax.optimistic_gradient_descent) or 'optimistic_adam' (optax.optimistic_adam_v2),
    with step size lr / (1 + decay·t). Optax minimises; a maximising player feeds it the
    negated gradient."""
    if decay:

        def lr(count, lr0=lr):
            return lr0 / (1.0 + decay * count)

    if name == "sgd":
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr)
    if name == "ogd":
        return optax.optimistic_gradient_descent(lr)
    if name == "optimistic_adam":
        return optax.optimistic_adam_v2(lr)
    raise ValueError(f"unknown optimizer {name!r}")


# sqrt(v + eps_root): d sqrt(v)/dv is infinite at v = 0, and a parameter whose gradient is
# exactly 0 (an unused embedding row) would turn the forward-mode tangent into NaN.
UNROLL_ADAM_EPS_ROOT = 1e-16


def make_unroll_optimizer(name: str, lr) -> optax.GradientTransformation:
    """The horizon's student optimizer, differentiable in forward mode everywhere."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr, eps_root=UNROLL_ADAM_EPS_ROOT)
    raise ValueError(f"unknown unroll optimizer {name!r}")


def make_optimizers(cfg: SolverConfig, unroll: optax.GradientTransformation | None = None) -> Optimizers:
    """The players' optax transformations as the config specifies them (`unroll` overrides
    the horizon's optimizer, e.g. with the protocol's learning-rate schedule)."""
    if cfg.algorithm == "optimistic":
        name = "ogd" if cfg.optimistic_variant == "ogd" else "optimistic_adam"
        teacher, dual = name, name
    else:
        teacher, dual = cfg.teacher_optimizer, cfg.dual_optimizer
    return Optimizers(
        student=make_player_optimizer(cfg.student_optimizer, cfg.student_lr),
        teacher=make_player_optimizer(teacher, cfg.teacher_lr, cfg.lr_decay),
        dual=make_player_optimizer(dual, cfg.dual_lr, cfg.lr_decay),
        unroll=unroll or make_unroll_optimizer(cfg.unroll_optimizer, cfg.effective_unroll_lr),
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
    gamma_init=None,
) -> SolverState:
    """Initial state. `delta` None = cfg.delta; a 1-D array of budgets gives a batched
    state (leading axis = budget) for `make_step(..., batched=True)` / `solve`.
    `gamma_init` None = cfg.gamma_init; an array of the same length as `delta` starts each
    state at its own γ (multi-start, see `multi_start`).
    U(0) is evaluated here, once, on `util_batch` (keep that batch fixed, or
    re-initialise, if the utility batch changes)."""
    cfg.validate(game.strength_sup)
    opt = optimizers or make_optimizers(cfg)
    delta = jnp.asarray(cfg.delta if delta is None else delta, dtype=jnp.result_type(float))
    if delta.ndim > 1:
        raise ValueError(f"delta must be a scalar or a 1-D array of budgets, got shape {delta.shape}")
    if not isinstance(delta, jax.core.Tracer) and bool(jnp.any(delta < 0)):
        raise ValueError(f"delta={delta} must be >= 0")
    if cfg.violation_scale == "relative" and not isinstance(delta, jax.core.Tracer) and bool(jnp.any(delta <= 0)):
        raise ValueError(f"delta={delta} must be > 0 with violation_scale='relative'")
    gamma0 = jnp.broadcast_to(
        jnp.asarray(cfg.gamma_init if gamma_init is None else gamma_init, dtype=jnp.result_type(float)), delta.shape
    )
    u0 = jnp.asarray(game.utility(jnp.zeros((), jnp.result_type(float)), util_batch))

    def one(d, g0):
        param = param_from_gamma(g0, cfg)
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
        return one(delta, gamma0)
    return jax.vmap(one)(delta, gamma0)


# ---------------------------------------------------------------------------
# The student's response and the teacher's objective
# ---------------------------------------------------------------------------


def tree_norm(tree: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros(())
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _step_batch(game: Game, student_batch, t):
    return student_batch if game.minibatch is None else game.minibatch(student_batch, t)


def unrolled_student(game: Game, theta: PyTree, gamma, student_batch, steps: int, lr: float):
    """θ⁺(γ): `steps` plain gradient-descent steps of the student on L_D(·; γ) from θ,
    differentiable in γ (and θ). A `lax.scan`: compiled once whatever `steps`."""

    def body(th, t):
        g = jax.grad(game.student_loss)(th, gamma, _step_batch(game, student_batch, t))
        return jax.tree_util.tree_map(lambda p, d: p - lr * d, th, g), None

    return jax.lax.scan(body, theta, jnp.arange(steps))[0]


def horizon_student(game: Game, tx: optax.GradientTransformation, theta0: PyTree, gamma, student_batch, steps: int):
    """θ_T(γ): `steps` steps of the optax optimizer `tx` on L_D(·; γ) from the base θ_0
    (fresh optimizer state), as the protocol's distillation trains a student from its base.
    A `lax.scan`; forward mode through it keeps memory at one step's."""

    def body(carry, t):
        th, os = carry
        g = jax.grad(game.student_loss)(th, gamma, _step_batch(game, student_batch, t))
        upd, os = tx.update(g, os, th)
        return (optax.apply_updates(th, upd), os), None

    (theta, _), _ = jax.lax.scan(body, (theta0, tx.init(theta0)), jnp.arange(steps))
    return theta


def student_response(game: Game, cfg: SolverConfig, theta, gamma, student_batch, optimizers: Optimizers | None = None):
    """θ_T(γ) as `cfg.unroll_from` defines it (see the module docstring)."""
    if cfg.unroll_from == "base":
        tx = (
            optimizers.unroll
            if optimizers is not None and optimizers.unroll is not None
            else make_unroll_optimizer(cfg.unroll_optimizer, cfg.effective_unroll_lr)
        )
        return horizon_student(game, tx, theta, gamma, student_batch, cfg.unroll_steps)
    return unrolled_student(game, theta, gamma, student_batch, cfg.unroll_steps, cfg.effective_unroll_lr)


def capability_hypergradient(
    game: Game,
    cfg: SolverConfig,
    theta: PyTree,
    gamma,
    student_batch,
    eval_batch,
    optimizers: Optimizers | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(J(θ_T(γ)), dJ(θ_T(γ))/dγ) with θ_T the student's response; forward mode in the scalar γ."""

    def f(g):
        return game.capability_loss(student_response(game, cfg, theta, g, student_batch, optimizers), eval_batch)

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
    game: Game,
    cfg: SolverConfig,
    theta,
    gamma,
    mu,
    delta,
    utility_ref,
    student_batch,
    eval_batch,
    util_batch,
    optimizers: Optimizers | None = None,
) -> tuple[jax.Array, jax.Array, dict]:
    """(L, ∂L/∂γ, aux) of the teacher's (augmented) Lagrangian
    `J(θ_T(γ)) − ψ_ρ(U(0) − U(γ) − δ, μ)`. The teacher ascends it."""
    gamma = jnp.asarray(gamma, dtype=jnp.result_type(float))
    one = jnp.ones_like(gamma)
    J, dJ = capability_hypergradient(game, cfg, theta, gamma, student_batch, eval_batch, optimizers)
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
    if math.isfinite(cfg.tol_student_grad) and cfg.unroll_from == "current":
        ok = ok & (diag["student_grad_norm"] <= cfg.tol_student_grad)
    return ok


def check_converged(history_window: Sequence[dict], cfg: SolverConfig) -> bool:
    """Stopping rule as a pure function of the last iterations' diagnostics: the last
    `cfg.patience` iterations all meet every tolerance (|Δγ| < tol_gamma, violation <=
    tol_violation, dual stationarity <= tol_violation, teacher stationarity <= tol_grad,
    and, for a student that trains (unroll_from='current'), the student gradient norm <=
    tol_student_grad when finite). For batched (vmapped-budget) diagnostics every budget
    must meet them. The step carries the same rule as `state.streak` and reports it as
    diagnostics['converged']."""
    window = list(history_window)[-cfg.patience :]
    if len(window) < cfg.patience:
        return False
    return all(bool(np.all(meets_tolerances({k: np.asarray(v) for k, v in d.items()}, cfg))) for d in window)


# ---------------------------------------------------------------------------
# One iteration: student, teacher, dual
# ---------------------------------------------------------------------------


DIAGNOSTIC_KEYS = (
    "iteration",
    "student_loss",
    "student_grad_norm",
    "student_param_norm",
    "J",
    "lagrangian",
    "teacher_grad",
    "teacher_grad_norm",
    "teacher_stationarity",
    "gamma",
    "delta_gamma",
    "U",
    "violation",
    "utility_drop",
    "dual_grad",
    "dual_grad_norm",
    "dual_stationarity",
    "mu",
    "streak",
    "converged",
)


def student_update(game: Game, cfg: SolverConfig, opt: Optimizers, theta, opt_state, gamma, student_batch):
    """The student's move: k_S optimizer steps on L_D(θ; γ) at a fixed (stop-gradient) γ,
    or none with unroll_from='base' (its θ is the base the horizon starts from).
    Returns (θ, optimizer state, L_D and ‖∇θ L_D‖ at the last step before its update)."""
    gamma = jax.lax.stop_gradient(gamma)
    if cfg.unroll_from == "base":
        loss, g = jax.value_and_grad(game.student_loss)(theta, gamma, _step_batch(game, student_batch, 0))
        return theta, opt_state, loss, tree_norm(g)

    def body(carry, _):
        th, os = carry
        loss, g = jax.value_and_grad(game.student_loss)(th, gamma, student_batch)
        upd, os = opt.student.update(g, os, th)
        return (optax.apply_updates(th, upd), os), (loss, tree_norm(g))

    (theta, opt_state), (losses, gnorms) = jax.lax.scan(body, (theta, opt_state), None, length=cfg.student_steps)
    return theta, opt_state, losses[-1], gnorms[-1]


def teacher_update(
    game: Game, cfg: SolverConfig, opt: Optimizers, state: SolverState, theta, student_batch, eval_batch, util_batch
):
    """The teacher's move: one ascent step on the Lagrangian in γ at the student's θ.
    Returns (new teacher parameter, its optimizer state, γ_new, diagnostics)."""
    sg = jax.lax.stop_gradient
    gamma_old = gamma_from_param(state.teacher_param, cfg)
    lag, dlag_dgamma, aux = teacher_lagrangian(
        game,
        cfg,
        sg(theta),
        gamma_old,
        sg(state.mu),
        state.delta,
        state.utility_ref,
        student_batch,
        eval_batch,
        util_batch,
        opt,
    )
    if cfg.gamma_param == "sigmoid":
        dgamma_dparam = jax.grad(lambda p: gamma_from_param(p, cfg))(state.teacher_param)
        g_param = dlag_dgamma * dgamma_dparam
    else:
        g_param = dlag_dgamma
    # Projected-gradient (unit-step gradient mapping) stationarity in γ-space, for both
    # parameterisations: |∂L/∂γ| inside (0, γ_max), 0 at a bound the gradient pushes into.
    stationarity = jnp.abs(gamma_old - jnp.clip(gamma_old + dlag_dgamma, 0.0, cfg.gamma_max))
    upd, teacher_os = opt.teacher.update(-g_param, state.teacher_opt_state, state.teacher_param)
    param_new = optax.apply_updates(state.teacher_param, upd)
    if cfg.gamma_param == "projection":
        param_new = jnp.clip(param_new, 0.0, cfg.gamma_max)
    gamma_new = gamma_from_param(param_new, cfg)
    diag = {
        "J": aux["J"],
        "lagrangian": lag,
        "teacher_grad": dlag_dgamma,
        "teacher_grad_norm": jnp.abs(g_param),
        "teacher_stationarity": stationarity,
        "gamma": gamma_new,
        "delta_gamma": jnp.abs(gamma_new - gamma_old),
    }
    return param_new, teacher_os, gamma_new, aux["violation"], diag


def dual_update(
    game: Game, cfg: SolverConfig, opt: Optimizers, state: SolverState, gamma_new, violation_old, util_batch
):
    """The dual's move: one ascent step along ∂ψ/∂μ, projected to μ >= 0. 'alternating'
    sees the teacher's new γ, the others the violation at the old one.
    Returns (μ_new, its optimizer state, diagnostics)."""
    U_new = game.utility(gamma_new, util_batch)
    v_new = constraint_violation(cfg, state.utility_ref, U_new, state.delta)
    v_dual = v_new if cfg.algorithm == "alternating" else violation_old
    _, _, dpsi_dmu = augmented_term(v_dual, state.mu, cfg.penalty)
    upd, dual_os = opt.dual.update(-dpsi_dmu, state.dual_opt_state, state.mu)
    mu_new = jnp.maximum(optax.apply_updates(state.mu, upd), 0.0)
    diag = {
        "U": U_new,
        "violation": v_new,
        "utility_drop": state.utility_ref - U_new,
        "dual_grad": dpsi_dmu,
        "dual_grad_norm": jnp.abs(dpsi_dmu),
        "dual_stationarity": jnp.abs(state.mu - jnp.maximum(state.mu + dpsi_dmu, 0.0)),
        "mu": mu_new,
    }
    return mu_new, dual_os, diag


def solver_step(
    game: Game,
    cfg: SolverConfig,
    state: SolverState,
    student_batch,
    eval_batch,
    util_batch,
    optimizers: Optimizers | None = None,
) -> tuple[SolverState, dict]:
    """One iteration of the configured algorithm (see SolverConfig.algorithm): the student,
    teacher and dual updates in turn ('simultaneous': the teacher sees the old θ).

    Diagnostics (scalars; keys in DIAGNOSTIC_KEYS, in computation order):
      iteration: index of this iteration (0-based);
      student_loss, student_grad_norm: L_D and ‖∇θ L_D‖ at the last inner student step
        (before its update; at the base with unroll_from='base');
      student_param_norm: ‖θ‖ after the student update (non-finite θ shows here);
      J: J(θ_T(γ)) at the θ and γ the teacher differentiated; lagrangian: its L;
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
    gamma_old = gamma_from_param(state.teacher_param, cfg)
    theta_new, student_os, loss, gnorm = student_update(
        game, cfg, opt, state.theta, state.student_opt_state, gamma_old, student_batch
    )
    theta_for_teacher = state.theta if cfg.algorithm == "simultaneous" else theta_new
    param_new, teacher_os, gamma_new, v_old, t_diag = teacher_update(
        game, cfg, opt, state, theta_for_teacher, student_batch, eval_batch, util_batch
    )
    mu_new, dual_os, d_diag = dual_update(game, cfg, opt, state, gamma_new, v_old, util_batch)

    diag = {
        "iteration": state.iteration,
        "student_loss": loss,
        "student_grad_norm": gnorm,
        "student_param_norm": tree_norm(theta_new),
        **t_diag,
        **d_diag,
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
    game: Game,
    cfg: SolverConfig,
    batched: bool = False,
    optimizers: Optimizers | None = None,
    per_state_student_batch: bool = False,
) -> Callable:
    """A pure `step(state, student_batch, eval_batch, util_batch) -> (state, diagnostics)`
    closing over the (static) game and config, ready for `jax.jit`. With `batched=True`
    it is vmapped over the leading (budget/start) axis of the state; batches are shared,
    except the student batch with `per_state_student_batch=True` (each state's own
    prefixes, sampled at its γ)."""
    cfg.validate(game.strength_sup)
    opt = optimizers or make_optimizers(cfg)

    def step(state, student_batch, eval_batch, util_batch):
        return solver_step(game, cfg, state, student_batch, eval_batch, util_batch, opt)

    if batched:
        return jax.vmap(step, in_axes=(0, 0 if per_state_student_batch else None, None, None))
    return step


# ---------------------------------------------------------------------------
# Multi-start
# ---------------------------------------------------------------------------


def start_gammas(cfg: SolverConfig) -> tuple[float, float, float]:
    """γ_0 ∈ {0, γ_max/2, γ_max} (moved inside the open interval for the sigmoid)."""
    if cfg.gamma_param == "sigmoid":
        return (0.02 * cfg.gamma_max, 0.5 * cfg.gamma_max, 0.98 * cfg.gamma_max)
    return (0.0, 0.5 * cfg.gamma_max, cfg.gamma_max)


def multi_start(cfg: SolverConfig, budgets, starts: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(delta, gamma_init) for `init_state`: every budget from every start, budget-major
    (state j·S + s = budget j, start s), solved at once as one batch."""
    starts = start_gammas(cfg) if starts is None else tuple(starts)
    budgets = np.atleast_1d(np.asarray(budgets, np.float64))
    return np.repeat(budgets, len(starts)), np.tile(np.asarray(starts, np.float64), len(budgets))


def best_of_starts(diag: dict, n_starts: int, cfg: SolverConfig, agree_tol: float = 1e-2) -> dict:
    """Per budget, the start with the best objective: the highest J among starts whose
    violation <= tol_violation (the least violated start if none is feasible). Returns
    numpy arrays over budgets: 'best_start', 'gamma', 'J', 'violation', 'converged',
    'starts_agree' (every start's γ within agree_tol of the best, and all converged),
    'gamma_spread' (max − min γ over starts) and 'gamma_by_start' (budgets × starts)."""

    def per(key):
        return np.asarray(diag[key]).reshape(-1, n_starts)

    gamma, J, viol, conv = per("gamma"), per("J"), per("violation"), per("converged").astype(bool)
    feasible = viol <= cfg.tol_violation
    score = np.where(feasible, J, -np.inf)
    best = np.where(feasible.any(1), np.argmax(score, 1), np.argmin(viol, 1))
    rows = np.arange(len(best))
    return {
        "best_start": best,
        "gamma": gamma[rows, best],
        "J": J[rows, best],
        "violation": viol[rows, best],
        "converged": conv[rows, best],
        "starts_agree": (np.abs(gamma - gamma[rows, best][:, None]).max(1) <= agree_tol) & conv.all(1),
        "gamma_spread": gamma.max(1) - gamma.min(1),
        "gamma_by_start": gamma,
    }


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
def _jitted_step(game: Game, cfg: SolverConfig, batched: bool, optimizers: Optimizers | None, per_state: bool):
    """One compiled step per (game, config, batched, optimizers): repeated solve() calls
    (e.g. a sweep over initial states) do not recompile."""
    return jax.jit(make_step(game, cfg, batched=batched, optimizers=optimizers, per_state_student_batch=per_state))


def _ordered(diag: dict) -> dict:
    out = {k: diag[k] for k in DIAGNOSTIC_KEYS if k in diag}
    out.update((k, v) for k, v in diag.items() if k not in out)
    return out


class SolveResult(NamedTuple):
    state: SolverState
    diagnostics: dict  # last iteration's, as numpy values
    iterations: int  # iterations run (in total, over resumed runs)
    converged: bool
    meta: dict  # what a checkpoint saves besides the state (iteration, done, converged, diag, caller's keys)
    stopped: bool = False  # should_stop() asked to stop; the state was checkpointed


def solve(
    game: Game,
    cfg: SolverConfig,
    state: SolverState,
    batches,
    callback: Callable[[int, dict, dict], Any] | None = None,
    optimizers: Optimizers | None = None,
    jit: bool = True,
    per_state_student_batch: bool = False,
    checkpoint: Any = None,
    should_stop: Callable[[], bool] | None = None,
) -> SolveResult:
    """The one solver loop: iterate the jitted step until diagnostics['converged'] (all
    states, for a batched state) or cfg.max_iters.

    - `batches`: a tuple (student_batch, eval_batch, util_batch), or a callable
      `batches(i, state, meta, previous)` returning one for iteration i (it may reuse
      `previous`, None after a start or resume, and keep in `meta` what it needs to
      rebuild them: the run is then deterministic given the state and meta);
    - `callback(i, diagnostics, meta)` (numpy values) runs after every accepted iteration;
    - `checkpoint`: an object with `restore(template) -> (state, meta) | None` and
      `save(state, meta)` (experiments/solver_run.py has the orbax one): the solve
      resumes from it, saves when `should_stop()` turns true (then returns with
      stopped=True) and when it finishes (a finished solve is not rerun).
    Raises SolverDivergedError naming the iteration and the first non-finite quantity
    (the last good state is not saved)."""
    cfg.validate(game.strength_sup)
    batched = jnp.ndim(state.delta) == 1
    if jit:
        step = _jitted_step(game, cfg, batched, optimizers, per_state_student_batch)
    else:
        step = make_step(
            game, cfg, batched=batched, optimizers=optimizers, per_state_student_batch=per_state_student_batch
        )
    get = batches if callable(batches) else (lambda i, state, meta, previous: batches)
    meta: dict = {"iteration": 0, "done": False, "converged": False, "diag": {}}
    if checkpoint is not None and (restored := checkpoint.restore(state)) is not None:
        state, meta = restored
    already_done, current, diag = meta["done"], None, {k: np.asarray(v) for k, v in meta["diag"].items()}
    while not meta["done"] and int(meta["iteration"]) < cfg.max_iters:
        i = int(meta["iteration"])
        current = get(i, state, meta, current)
        new_state, diag_dev = step(state, *current)
        diag = _ordered({k: np.asarray(v) for k, v in jax.device_get(diag_dev).items()})
        bad = first_nonfinite(diag)
        if bad is not None:
            raise SolverDivergedError(i, bad, diag[bad])
        state = new_state
        meta["iteration"] = i + 1
        meta["diag"] = {k: v.tolist() for k, v in diag.items()}
        if callback is not None:
            callback(i, diag, meta)
        meta["converged"] = bool(np.all(diag["converged"]))
        meta["done"] = meta["converged"] or i + 1 >= cfg.max_iters
        if not meta["done"] and should_stop is not None and should_stop():
            if checkpoint is not None:
                checkpoint.save(state, meta)
            return SolveResult(state, diag, i + 1, False, meta, stopped=True)
    meta["done"] = True
    if checkpoint is not None and not already_done:
        checkpoint.save(state, meta)  # the finished solve: a re-run reuses it instead of solving again
    return SolveResult(state, diag, int(meta["iteration"]), bool(meta["converged"]), meta)
