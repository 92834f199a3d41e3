"""The leader's problem solved by enumeration: max_γ J(γ) s.t. U(0) − U(γ) ≤ δ.

Why not gradients by default (measured on the default world; docs/design.md, "The differentiable game"):
U(γ) is exact and cheap (cached expert outputs on reference solutions), so the feasible set
is known exactly; J(γ) is the student's capability loss after the protocol-like horizon from
its base, and its exact derivative through a long Adam unroll is chaotic (|dJ/dγ| of 5–300
per unit γ with either sign, where J itself rises by ~0.7 over [0, 0.7]); the meta-learning
literature knows this pathology of long unrolls. J along a grid, with common random numbers
across γ and several pool seeds, is smooth at the scale that matters. So the leader
enumerates: the exact feasible bound γ_δ of every budget, J on a grid that contains those
bounds, and γ*(δ) the best feasible grid point. The solver (game/solver.py) stays for the
toy games and for `equilibrium.method: solver`.

Pure numpy on values the caller computed (U on a fine grid, J with standard errors).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def feasible_bounds(
    utility: Callable[[np.ndarray], np.ndarray],
    budgets,
    gamma_max: float,
    grid: int = 257,
    bisect_iters: int = 40,
) -> dict:
    """γ_δ = sup{γ ∈ [0, γ_max] : U(0) − U(γ') ≤ δ for all γ' ≤ γ} for every budget δ: the end of
    the feasible interval that starts at γ = 0 (undefended decoding is always feasible).

    `utility` maps an array of strengths to U (vectorised). The first infeasible point of a
    `grid`-point scan is bracketed, then bisected. `interval[j]` says whether the feasible set is
    that one interval on the grid (False: some γ beyond the bound is feasible again, i.e. U is
    not monotone there; the bound is still the end of the first interval)."""
    gammas = np.linspace(0.0, gamma_max, grid)
    u = np.asarray(utility(gammas), np.float64)
    u0 = float(u[0])
    bounds, interval = [], []
    for delta in np.asarray(budgets, np.float64):
        ok = u0 - u <= delta
        bad = np.flatnonzero(~ok)
        if bad.size == 0:
            bounds.append(float(gamma_max))
            interval.append(True)
            continue
        lo, hi = float(gammas[bad[0] - 1]), float(gammas[bad[0]])
        for _ in range(bisect_iters):
            mid = 0.5 * (lo + hi)
            if u0 - float(np.asarray(utility(np.array([mid])))[0]) <= delta:
                lo = mid
            else:
                hi = mid
        bounds.append(lo)
        interval.append(not ok[bad[0] :].any())
    return {"bound": np.asarray(bounds), "interval": np.asarray(interval), "utility_ref": u0}


def best_feasible(gammas, J_mean, J_se, bounds, tol: float = 1e-9) -> list[dict]:
    """γ*(δ) = argmax of J over the grid points within each feasible bound.

    Returns per bound: `gamma_star`, `index` (into `gammas`), `J`, `J_se`, and `margin_se`: how
    many standard errors J(γ*) lies above the best *other* feasible point (inf when γ* is the only
    one; a small margin says the data cannot tell γ* from that point)."""
    g = np.asarray(gammas, np.float64)
    m, s = np.asarray(J_mean, np.float64), np.asarray(J_se, np.float64)
    out = []
    for b in np.asarray(bounds, np.float64):
        feasible = np.flatnonzero(g <= b + tol)
        k = int(feasible[np.argmax(m[feasible])])
        others = feasible[feasible != k]
        margin = np.inf
        if others.size:
            r = int(others[np.argmax(m[others])])
            se = np.hypot(s[k], s[r])
            margin = float((m[k] - m[r]) / se) if se > 0 else np.inf
        out.append({"gamma_star": float(g[k]), "index": k, "J": float(m[k]), "J_se": float(s[k]), "margin_se": margin})
    return out


def curve_grid(base, bounds, decimals: int = 2) -> np.ndarray:
    """The strengths where J is evaluated: the base grid plus every feasible bound rounded *down*
    to `decimals` (so it stays feasible, and the protocol's defense settings, which round strengths
    to 2 decimals, play exactly that point), sorted and deduplicated."""
    scale = 10.0**decimals
    floored = np.floor(np.asarray(bounds, float) * scale + 1e-9) / scale
    return np.unique(np.round(np.concatenate([np.asarray(base, float), floored]), decimals))


__all__ = ["feasible_bounds", "best_feasible", "curve_grid"]
