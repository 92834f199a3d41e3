"""The student's response θ_T(γ) and the teacher's objective: the forward-mode hypergradient
dJ(θ_T(γ))/dγ, the constraint violation and the (augmented) Lagrangian
(the game and its players: game/solver.py's docstring).

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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from game.solver_config import Game, PyTree, SolverConfig
from game.solver_state import Optimizers, make_unroll_optimizer


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
