"""The game's J(γ) curve on the trained models, and the equilibrium read off it
(equilibrium.method='frontier', game/frontier.py says why).

J(γ) = the student's capability loss (NLL of reference solutions of test prompts) after
`horizon` steps of the protocol's optimizer from its base on the game's own pool of prefixes
sampled from the defense at γ (soft targets of the defended teacher, the adaptive student's
weights for β > 0). Every γ of one pool seed decodes the same problems with the same sampling
key and trains on the same minibatch order (common random numbers), so differences along the
curve are the defense's, not the pools'. Mean ± SE over `curve_seeds` pool seeds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.game_wiring import horizon_optimizer, horizon_steps, make_game, on_one_cpu_device
from experiments.progress import tqdm
from experiments.stats import mean_stderr
from game import frontier
from game import solver as sv


def capability_curves(
    sweep, models, betas, gammas, heldout, eval_batch, seeds: int, progress: bool = True
) -> dict[float, np.ndarray]:
    """J(θ_T(γ)) of every student tilt β for every γ of `gammas` and each of `seeds` pool seeds:
    {β: [seeds, len(gammas)]}. A pool does not depend on β, so each is sampled once and every β trains on it."""
    cfg, ec = sweep.cfg, sweep.ec
    steps = horizon_steps(cfg)
    tx = horizon_optimizer(cfg.protocol.distill, steps)
    theta0, eval_batch = on_one_cpu_device((models["student"].params, eval_batch))

    def J_after_horizon(beta):
        game = make_game(models["student"], beta, cfg.protocol.distill, cfg.protocol.temperature, "soft", ec.defense)
        return jax.jit(
            lambda gamma, pool: game.capability_loss(
                sv.horizon_student(game, tx, theta0, gamma, pool, steps), eval_batch
            )
        )

    J_of = {beta: J_after_horizon(beta) for beta in betas}
    gammas = np.asarray(gammas, np.float32)
    J = {beta: np.zeros((seeds, len(gammas))) for beta in betas}
    bar = tqdm(total=seeds * len(gammas) * len(betas), desc="J(γ) curves", leave=False, disable=not progress)
    for s in range(seeds):
        for k, g in enumerate(gammas):
            # round 30_000 + s: one sampling key per pool seed, the same for every γ (common random numbers)
            pool = sweep.prefixes(models, gammas[k : k + 1], 30_000 + s, heldout, steps, pool_seed=s)
            pool = on_one_cpu_device(jax.tree.map(lambda x: x[0], pool))
            for beta in betas:
                J[beta][s, k] = float(J_of[beta](jnp.float32(g), pool))
                bar.update()
    bar.close()
    return J


def utility_of(game: sv.Game, util_batch):
    """U(γ) for an array of strengths (the exact, cached-expert utility), as numpy."""
    f = jax.jit(jax.vmap(lambda g: game.utility(g, util_batch)))
    return lambda gammas: np.asarray(f(jnp.asarray(gammas, jnp.float32)), np.float64)


def frontier_points(sweep, models, eval_batch, util_batch, heldout, progress: bool = True) -> tuple[list, list, dict]:
    """(points, curves, bounds): γ*(δ) per budget and β read off the J curves within the exact
    feasible bounds; `curves` keeps every β's J(γ) for the plot and the JSON."""
    cfg, ec = sweep.cfg, sweep.ec
    gamma_max = ec.solver.gamma_max
    game0 = make_game(models["student"], 0.0, cfg.protocol.distill, 1.0, "soft", ec.defense)
    utility = utility_of(game0, util_batch)
    fb = frontier.feasible_bounds(utility, ec.budgets, gamma_max)
    gammas = frontier.curve_grid([g for g in ec.curve_gammas if g <= gamma_max], fb["bound"])
    U = utility(gammas)
    points, curves = [], []
    J_by_beta = capability_curves(sweep, models, ec.betas, gammas, heldout, eval_batch, ec.curve_seeds, progress)
    for beta in ec.betas:
        J = J_by_beta[beta]
        per_gamma = [mean_stderr(J[:, k]) for k in range(len(gammas))]
        mean, se = np.array([m["mean"] for m in per_gamma]), np.array([m["stderr"] for m in per_gamma])
        curves.append(
            {"beta": beta, "gamma": gammas.tolist(), "J": J.tolist(), "J_mean": mean.tolist(), "J_se": se.tolist()}
        )
        for delta, bound, interval, best in zip(
            ec.budgets,
            fb["bound"],
            fb["interval"],
            frontier.best_feasible(gammas, mean, np.nan_to_num(se), fb["bound"]),
        ):
            k = best["index"]
            points.append(
                {
                    "beta": beta,
                    "delta": delta,
                    "gamma_star": best["gamma_star"],
                    "gamma_bound": float(bound),
                    "bound_binds": bool(bound < gamma_max),
                    "feasible_interval": bool(interval),
                    "J": best["J"],
                    "J_se": best["J_se"],
                    "margin_se": best["margin_se"],
                    "U": float(U[k]),
                    "violation": float(fb["utility_ref"] - U[k] - delta),
                    "converged": True,  # enumeration: exact within the grid, nothing iterates
                    "iterations": 0,
                }
            )
    return (
        points,
        curves,
        {"utility_ref": fb["utility_ref"], "bounds": fb["bound"].tolist(), "horizon": horizon_steps(cfg)},
    )


__all__ = ["capability_curves", "frontier_points", "utility_of"]
