"""Closed-form toy games: the PoE game on categorical distributions, and x·y.

PoE toy (no networks). C contexts, V outcomes; fixed teacher logits z_T[c], proxy
logits z_P[c] and a correct outcome y*[c]. The student is a table of logits θ[c]
(q_θ[c] = softmax θ[c]); the defended teacher is p_γ[c] = softmax((1−γ) z_T[c] + γ z_P[c]).
Batches are per-context weight vectors (so resampling prefixes = reweighting contexts,
and an adaptive student's weights are folded in):

    L_D(θ; γ) = Σ_c w_S[c] · CE(p_γ[c], q_θ[c])          (student_batch = w_S)
    J(θ)      = Σ_c w_E[c] · −log q_θ[c](y*[c])            (eval_batch    = w_E)
    U(γ)      = Σ_c w_U[c] · log p_γ[c](y*[c])             (util_batch    = w_U)

With all w_S > 0 the student's best response is q = p_γ, so the teacher's problem
collapses to one dimension: maximise J(p_γ) over γ ∈ [0, γ_max] s.t. U(0) − U(γ) <= δ.
`exact_gamma_star` solves that in float64 numpy (grid + bisection + golden section),
independently of the solver. The default numbers make J increasing in γ and the K-step
hypergradient positive, so γ*(δ) is the point where the budget binds (interior and
distinct for δ ∈ {0.1, 0.3, 0.6}) or γ_max when it does not (δ = 2). `myopic_trap_spec`
is a second toy, where the one-step hypergradient has the wrong sign and only a
long-horizon (Stackelberg) teacher finds γ*.

Bilinear game: min_x max_y x·y, equilibrium (0, 0); `run_bilinear` plays it with the
solver's own optax player optimizers to show simultaneous GDA spiralling out,
alternating GDA cycling and optimistic GDA converging.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from game.solver import Game, make_player_optimizer

# ---------------------------------------------------------------------------
# PoE toy
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToySpec:
    """Numbers of a toy game (tuples so the spec is hashable and immutable)."""

    teacher_logits: tuple  # (C, V)
    proxy_logits: tuple  # (C, V)
    correct: tuple  # (C,) index of the correct outcome per context
    student_weights: tuple  # (C,) default student_batch
    eval_weights: tuple  # (C,) default eval_batch
    util_weights: tuple  # (C,) default util_batch
    gamma_max: float = 0.8

    def arrays(self):
        """float64 numpy arrays (z_T, z_P, correct, w_S, w_E, w_U)."""
        zt = np.asarray(self.teacher_logits, np.float64)
        zp = np.asarray(self.proxy_logits, np.float64)
        if zt.shape != zp.shape or zt.ndim != 2:
            raise ValueError(f"teacher {zt.shape} and proxy {zp.shape} logits must share shape (C, V)")
        return (
            zt,
            zp,
            np.asarray(self.correct, np.int64),
            np.asarray(self.student_weights, np.float64),
            np.asarray(self.eval_weights, np.float64),
            np.asarray(self.util_weights, np.float64),
        )


def default_toy_spec() -> ToySpec:
    """4 contexts × 5 outcomes, correct outcome 0; the teacher is confident and right,
    the proxy less so. U(0)−U(γ) grows from 0 to ≈1.12 nats at γ_max = 0.8."""
    return ToySpec(
        teacher_logits=(
            (4.0, 1.0, 0.5, 0.0, -0.5),
            (3.0, 2.0, 0.0, -1.0, 0.0),
            (2.5, 0.0, 1.5, 0.5, -1.0),
            (3.5, 0.5, 0.0, 1.0, 0.0),
        ),
        proxy_logits=(
            (1.0, 2.0, 0.5, 0.0, 0.0),
            (0.5, 1.0, 1.5, 0.0, -0.5),
            (0.0, 0.5, 2.0, 1.0, 0.0),
            (1.5, 0.0, 0.5, 2.5, 0.5),
        ),
        correct=(0, 0, 0, 0),
        student_weights=(0.25, 0.25, 0.25, 0.25),
        eval_weights=(0.4, 0.1, 0.3, 0.2),
        util_weights=(0.25, 0.25, 0.25, 0.25),
        gamma_max=0.8,
    )


TOY_BUDGETS = (0.1, 0.3, 0.6, 2.0)  # three binding budgets and one slack (γ* = γ_max)


def myopic_trap_spec() -> ToySpec:
    """A toy that fails the myopic solver: 2 contexts × 3 outcomes, correct outcome 0.

    Context 0 is rare in the student's data (w_S = 0.05) and the defense hurts the student
    there a lot; context 1 is common (w_S = 0.95) and the defense mildly sharpens the
    student towards the right answer there. At the best response (q = p_γ) the true
    dJ(p_γ)/dγ is positive on all of [0, γ_max] (>= 0.73), so γ* is where the budget
    binds, or γ_max. The one-step lookahead from the best response weights each context
    by its share of the student's data (its gradient is w_S·(q − p_γ)), so context 1
    dominates it and its sign is wrong on all of [0, γ_max] (<= −0.022 at unroll_lr 1):
    a K=1 solver stays at γ = 0. The horizon from the uniform base (Adam, 200 steps,
    lr 0.1) has the right sign everywhere (tests/test_toy.py checks all three)."""
    return ToySpec(
        teacher_logits=((0.5, -3.5, 0.0), (-1.5, -0.5, 1.0)),
        proxy_logits=((-3.0, 0.0, 2.5), (0.5, 1.0, 2.0)),
        correct=(0, 0),
        student_weights=(0.05, 0.95),
        eval_weights=(0.5, 0.5),
        util_weights=(0.5, 0.5),
        gamma_max=0.8,
    )


MYOPIC_TRAP_BUDGETS = (0.3, 2.0)  # one binding budget (γ* ≈ 0.237) and one slack (γ* = γ_max)


def _poe_logprobs(zt, zp, gamma):
    return jax.nn.log_softmax((1.0 - gamma) * zt + gamma * zp, axis=-1)


def toy_game(spec: ToySpec | None = None) -> Game:
    """The toy as a solver `Game`; batches are per-context weight vectors (C,)."""
    spec = spec or default_toy_spec()
    zt_np, zp_np, y_np, *_ = spec.arrays()

    def consts():
        # Created at trace time with an explicit dtype so they follow the default float
        # dtype (x64 or not); without it jax 0.10 may reuse a float32 constant under x64.
        dtype = jnp.result_type(float)
        return jnp.asarray(zt_np, dtype=dtype), jnp.asarray(zp_np, dtype=dtype), jnp.asarray(y_np, dtype=jnp.int32)

    def picked(logp, y):
        return jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]

    def student_loss(theta, gamma, weights):
        zt, zp, _ = consts()
        logp = _poe_logprobs(zt, zp, gamma)
        logq = jax.nn.log_softmax(theta, axis=-1)
        ce = -jnp.sum(jnp.exp(logp) * logq, axis=-1)
        return jnp.sum(weights * ce)

    def capability_loss(theta, weights):
        _, _, y = consts()
        return -jnp.sum(weights * picked(jax.nn.log_softmax(theta, axis=-1), y))

    def utility(gamma, weights):
        zt, zp, y = consts()
        return jnp.sum(weights * picked(_poe_logprobs(zt, zp, gamma), y))

    return Game(student_loss=student_loss, capability_loss=capability_loss, utility=utility)


def toy_batches(spec: ToySpec | None = None):
    """(student_batch, eval_batch, util_batch) = the spec's weight vectors as jnp arrays."""
    spec = spec or default_toy_spec()
    *_, ws, we, wu = spec.arrays()
    return jnp.asarray(ws), jnp.asarray(we), jnp.asarray(wu)


def toy_theta_init(spec: ToySpec | None = None) -> jax.Array:
    """Uniform student (zero logits), shape (C, V)."""
    spec = spec or default_toy_spec()
    zt, *_ = spec.arrays()
    return jnp.zeros(zt.shape)


# --- float64 numpy reference -------------------------------------------------


def _np_logsoftmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def toy_curves(spec: ToySpec, gammas) -> dict:
    """Best-response curves in float64: J(p_γ), U(γ) and the utility drop U(0)−U(γ)."""
    zt, zp, y, _, we, wu = spec.arrays()
    idx = np.arange(zt.shape[0])
    gammas = np.atleast_1d(np.asarray(gammas, np.float64))
    g = gammas[:, None, None]
    lp = _np_logsoftmax((1.0 - g) * zt + g * zp)[:, idx, y]  # (G, C) log p_γ(y*)
    J, U = -(lp @ we), lp @ wu
    u0 = np.sum(wu * _np_logsoftmax(zt)[idx, y])
    return {"gamma": gammas, "J": J, "U": U, "utility_drop": u0 - U}


def _golden_max(f: Callable[[float], float], a: float, b: float, tol: float) -> float:
    invphi = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - invphi * (b - a), a + invphi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - invphi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + invphi * (b - a)
            fd = f(d)
    return 0.5 * (a + b)


def feasible_gamma_bound(
    spec: ToySpec, delta: float, gamma_max: float | None = None, grid: int = 20001, tol: float = 1e-12
) -> float:
    """Largest γ ∈ [0, γ_max] with U(0) − U(γ) <= δ (the drop is convex in γ and 0 at 0,
    so the feasible set is an interval [0, b]); grid scan, then bisection to `tol`."""
    gm = spec.gamma_max if gamma_max is None else gamma_max

    def drop(g):
        return float(toy_curves(spec, g)["utility_drop"][0]) - delta

    gs = np.linspace(0.0, gm, grid)
    viol = toy_curves(spec, gs)["utility_drop"] - delta
    over = np.nonzero(viol > 0)[0]
    if over.size == 0:
        return gm
    hi_i = int(over[0])
    if hi_i == 0:
        return 0.0
    lo, hi = gs[hi_i - 1], gs[hi_i]
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if drop(mid) <= 0:
            lo = mid
        else:
            hi = mid
    return lo


def exact_gamma_star(
    spec: ToySpec | None, delta: float, gamma_max: float | None = None, grid: int = 20001, tol: float = 1e-10
) -> float:
    """Stackelberg γ* of the toy for budget δ, in float64 numpy without the solver:
    argmax of J(p_γ) over the feasible interval [0, b(δ)] (dense grid, then golden-section
    refinement of the best grid bracket; endpoints compared explicitly)."""
    spec = spec or default_toy_spec()
    if delta < 0:
        raise ValueError(f"delta={delta} must be >= 0")
    b = feasible_gamma_bound(spec, delta, gamma_max)
    if b == 0.0:
        return 0.0

    def J(g):
        return float(toy_curves(spec, g)["J"][0])

    gs = np.linspace(0.0, b, grid)
    Js = toy_curves(spec, gs)["J"]
    i = int(np.argmax(Js))
    best_g, best_J = gs[i], Js[i]
    if 0 < i < grid - 1:
        g = _golden_max(J, gs[i - 1], gs[i + 1], tol)
        if J(g) > best_J:
            best_g, best_J = g, J(g)
    return float(best_g)


# ---------------------------------------------------------------------------
# Bilinear game
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BilinearGame:
    """min_x max_y f(x, y) = x·y; the unique equilibrium is (0, 0)."""

    equilibrium: tuple = (0.0, 0.0)

    @staticmethod
    def value(x, y):
        return x * y

    @staticmethod
    def grads(x, y):
        """(∂f/∂x, ∂f/∂y)."""
        return y, x


def bilinear_game() -> BilinearGame:
    return BilinearGame()


def run_bilinear(algorithm: str, lr: float = 0.1, num_steps: int = 500, x0: float = 1.0, y0: float = 1.0) -> np.ndarray:
    """Play min_x max_y x·y with the solver's optax player optimizers and return the
    distance to the equilibrium after each step (length num_steps + 1).

    'simultaneous': SGD for both, gradients at the same old point (spirals out:
    |z| grows by sqrt(1 + lr²) per step); 'alternating': SGD, y moves after x and sees
    the new x (bounded cycle, no convergence); 'optimistic':
    optax.optimistic_gradient_descent for both, simultaneous (converges)."""
    game = bilinear_game()
    name = {"simultaneous": "sgd", "alternating": "sgd", "optimistic": "ogd"}.get(algorithm)
    if name is None:
        raise ValueError(f"algorithm={algorithm!r} must be 'simultaneous', 'alternating' or 'optimistic'")
    tx_x, tx_y = make_player_optimizer(name, lr), make_player_optimizer(name, lr)
    x, y = jnp.asarray(x0, jnp.float32), jnp.asarray(y0, jnp.float32)
    sx, sy = tx_x.init(x), tx_y.init(y)

    @jax.jit
    def step(x, y, sx, sy):
        gx, _ = game.grads(x, y)
        ux, sx = tx_x.update(gx, sx, x)  # x descends
        x_new = optax.apply_updates(x, ux)
        _, gy = game.grads(x_new if algorithm == "alternating" else x, y)
        uy, sy = tx_y.update(-gy, sy, y)  # y ascends: descent on −∂f/∂y
        return x_new, optax.apply_updates(y, uy), sx, sy

    dist = [float(np.hypot(x0, y0))]
    for _ in range(num_steps):
        x, y, sx, sy = step(x, y, sx, sy)
        dist.append(float(jnp.hypot(x, y)))
    return np.asarray(dist)
