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

The student's response θ_T(γ) (`SolverConfig.unroll_from`: 'base', the Stackelberg horizon
from the student's base, or 'current', a myopic K-step lookahead) and the teacher's exact
forward-mode gradient through it: game/solver_objective.py.

Parameterisations of γ (`SolverConfig.gamma_param`):

- "projection" (default): the teacher parameter *is* γ, clipped to [0, γ_max]
  after every update. Reaches γ_max exactly when the budget is slack.
- "sigmoid": teacher parameter ρ_T with γ = γ_max · sigmoid(ρ_T); smooth and
  unconstrained but approaches the bounds only asymptotically.

Pure API, one job per module and every name importable from here: `Game` and `SolverConfig`
(game/solver_config.py); the optimizers, `SolverState`, `init_state` (game/solver_state.py);
the response and the teacher's Lagrangian (game/solver_objective.py); the three player updates
`student_update`, `teacher_update`, `dual_update`, their composition `solver_step`, `make_step`
(jittable, vmappable over budgets and starts) and `check_converged`
(game/solver_iteration.py); here `multi_start`/`best_of_starts`, `first_nonfinite` and `solve`
(the one driver: Python loop, optional checkpoint and stop hooks, no I/O of its own).

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

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from game.solver_config import (
    ALGORITHMS,
    GAMMA_PARAMS,
    OPTIMISTIC_VARIANTS,
    PLAYER_OPTIMIZERS,
    STUDENT_OPTIMIZERS,
    UNROLL_FROM,
    Game,
    PyTree,
    SolverConfig,
)
from game.solver_iteration import (
    DIAGNOSTIC_KEYS,
    check_converged,
    dual_update,
    make_step,
    meets_tolerances,
    solver_step,
    student_update,
    teacher_update,
)
from game.solver_objective import (
    augmented_term,
    capability_hypergradient,
    constraint_violation,
    horizon_student,
    student_response,
    teacher_lagrangian,
    tree_norm,
    unrolled_student,
)
from game.solver_state import (
    UNROLL_ADAM_EPS_ROOT,
    Optimizers,
    SolverState,
    gamma_from_param,
    init_state,
    make_optimizers,
    make_player_optimizer,
    make_unroll_optimizer,
    param_from_gamma,
    state_gamma,
)

__all__ = [
    # game/solver_config.py
    "ALGORITHMS",
    "GAMMA_PARAMS",
    "OPTIMISTIC_VARIANTS",
    "PLAYER_OPTIMIZERS",
    "STUDENT_OPTIMIZERS",
    "UNROLL_FROM",
    "Game",
    "PyTree",
    "SolverConfig",
    # game/solver_state.py
    "UNROLL_ADAM_EPS_ROOT",
    "Optimizers",
    "SolverState",
    "gamma_from_param",
    "init_state",
    "make_optimizers",
    "make_player_optimizer",
    "make_unroll_optimizer",
    "param_from_gamma",
    "state_gamma",
    # game/solver_objective.py
    "augmented_term",
    "capability_hypergradient",
    "constraint_violation",
    "horizon_student",
    "student_response",
    "teacher_lagrangian",
    "tree_norm",
    "unrolled_student",
    # game/solver_iteration.py
    "DIAGNOSTIC_KEYS",
    "check_converged",
    "dual_update",
    "make_step",
    "meets_tolerances",
    "solver_step",
    "student_update",
    "teacher_update",
    # here
    "start_gammas",
    "multi_start",
    "best_of_starts",
    "SolverDivergedError",
    "first_nonfinite",
    "SolveResult",
    "solve",
]


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
