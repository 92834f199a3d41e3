"""One iteration of the solver: the student, teacher and dual updates, their composition
`solver_step` (and `make_step`, jittable and vmappable over budgets and starts), the
diagnostics it reports and the stopping rule on them.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from game.solver_config import Game, SolverConfig
from game.solver_objective import _step_batch, augmented_term, constraint_violation, teacher_lagrangian, tree_norm
from game.solver_state import Optimizers, SolverState, gamma_from_param, make_optimizers


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
