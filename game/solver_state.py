"""The solver's optimizers and state: the players' optax transformations (`make_optimizers`),
`SolverState`, the γ parameterisation (`SolverConfig.gamma_param`) and `init_state`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from game.solver_config import Game, PyTree, SolverConfig


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
