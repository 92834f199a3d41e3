"""The equilibrium's settings (`distgame equilibrium`, `distgame calibrate`): what game is played,
how γ*(δ) is found, and the empirical check. A section of experiments/config.py's Config."""

from __future__ import annotations

import dataclasses

from experiments.fields import ConfigError
from experiments.fields import documented as _help
from game import registry
from game.solver import SolverConfig

METHODS = ("frontier", "solver")


@dataclasses.dataclass(frozen=True)
class EquilibriumConfig:
    """The defense game solved on the trained models (distgame equilibrium)."""

    defense: str = _help(
        "the defense whose strength the teacher plays (γ in the solver): a registered defense with a differentiable "
        "strength (game/registry.py): 'poe' (γ in [0, 1)) or 'ads' (λ >= 0); solver.gamma_max bounds it",
        "poe",
    )
    method: str = _help(
        "how γ*(δ) is found: 'frontier' (the exact feasible bound of every budget from U, J(γ) on a grid "
        "through the horizon with common random numbers, γ* = the best feasible grid point: game/frontier.py "
        "says why) or 'solver' (the gradient min-max solver, game/solver.py, with equilibrium.solver)",
        "frontier",
    )
    curve_gammas: tuple[float, ...] = _help(
        "method 'frontier': strengths where J(γ) is evaluated (every budget's feasible bound is added)",
        (0.0, 0.3, 0.6, 0.9),
    )
    curve_seeds: int = _help("method 'frontier': the game's own prefix pools per strength (mean ± SE of J)", 2)
    budgets: tuple[float, ...] = _help(
        "utility budgets δ (nats/token the teacher may lose), increasing, solved at once under vmap", (0.01, 0.03, 0.1)
    )
    betas: tuple[float, ...] = _help("student tilts beta_s (0 = passive); one solve per tilt", (0.0, 4.0))
    prefixes: int = _help(
        "prefixes sampled from the defended teacher per strength (frontier: per pool seed; solver: per budget)", 64
    )
    resample_every: int = _help("iterations between prefix resamples (R)", 25)
    heldout_batch: int = _help("the adaptive student's held-out examples per resample (its g_S)", 16)
    n_eval: int = _help("reference solutions of test prompts in J (student capability loss)", 128)
    n_utility: int = _help("reference solutions of held-out prompts in U (teacher utility)", 128)
    empirical_check: bool = _help(
        "sample defended traces at the equilibria and distill real students (protocol.distill)", True
    )
    check_points: str = _help(
        "which equilibria the empirical check distills students at: 'all' (every β and budget) or 'largest' "
        "(the passive student at the largest budget's γ*, against γ = 0: the summary's check_delta_passive)",
        "all",
    )
    check_seeds: int = _help("seeds of the empirical check", 1)
    horizon: int = _help(
        "T: student steps of the protocol's optimizer from the base in the teacher's objective J(θ_T(γ)) "
        "(method 'frontier', and 'solver' with solver.unroll_from='base'); 0 = protocol.distill.steps",
        0,
    )
    horizon_batch: int = _help(
        "prefixes per unrolled step, drawn from the pool in a fixed order (0 = protocol.distill.batch_size)", 0
    )
    estimator: str = _help(
        "gamma's effect on which prefixes are sampled: 'score' (score-function estimator, game/sampling.py) or 'soft' (stopped)",
        "score",
    )
    capability: str = _help(
        "what J scores on reference solutions of test prompts: 'solution' (every solution token) or 'answer' (final answer + EOS)",
        "solution",
    )
    multi_start: bool = _help(
        "solve every budget from gamma0 in {0, gamma_max/2, gamma_max} and keep the best feasible objective", True
    )
    calibration_gammas: tuple[float, ...] = _help(
        "distgame calibrate: strengths (>= 5, increasing, in the defense's range) where the game's J meets the protocol's",
        (0.0, 0.15, 0.3, 0.45, 0.6),
    )
    calibration_seeds: int = _help("distgame calibrate: protocol seeds per gamma (paired)", 3)
    calibration_game_seeds: int = _help("distgame calibrate: the game's own prefix pools per gamma", 3)
    solver: SolverConfig = _help("the min-max solver (game/solver.py documents every field)", factory=SolverConfig)

    def validate(self) -> None:
        b = self.budgets
        if not b:
            raise ConfigError("equilibrium.budgets is empty; give at least one budget")
        if any(x < 0 for x in b):
            raise ConfigError(f"equilibrium.budgets={list(b)} must be >= 0")
        if any(y <= x for x, y in zip(b, b[1:])):
            raise ConfigError(f"equilibrium.budgets={list(b)} must be strictly increasing")
        if not self.betas:
            raise ConfigError("equilibrium.betas is empty; give at least 0 (the passive student)")
        if self.check_points not in ("all", "largest"):
            raise ConfigError(f"equilibrium.check_points={self.check_points!r} must be 'all' or 'largest'")
        if self.method not in METHODS:
            raise ConfigError(f"equilibrium.method={self.method!r} must be one of {', '.join(METHODS)}")
        for name in (
            "prefixes",
            "resample_every",
            "curve_seeds",
            "heldout_batch",
            "n_eval",
            "n_utility",
            "check_seeds",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"equilibrium.{name}={getattr(self, name)} must be >= 1")
        for name in ("horizon", "horizon_batch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"equilibrium.{name}={getattr(self, name)} must be >= 0")
        if self.defense not in registry.differentiable_names():
            raise ConfigError(
                f"equilibrium.defense={self.defense!r} must be a defense with a differentiable strength: "
                f"{', '.join(registry.differentiable_names())}"
            )
        r = registry.get(self.defense).strength.range
        for name in ("calibration_gammas", "curve_gammas"):
            g = getattr(self, name)
            if len(g) < 2 or any(y <= x for x, y in zip(g, g[1:])) or not all(x in r for x in g):
                raise ConfigError(f"equilibrium.{name}={list(g)} must be >= 2 increasing values {r.describe(False)}")
        if self.calibration_seeds < 1 or self.calibration_game_seeds < 1:
            raise ConfigError("equilibrium.calibration_seeds and equilibrium.calibration_game_seeds must be >= 1")
        if self.estimator not in ("score", "soft"):
            raise ConfigError(f"equilibrium.estimator={self.estimator!r} must be 'score' or 'soft'")
        if self.capability not in ("solution", "answer"):
            raise ConfigError(f"equilibrium.capability={self.capability!r} must be 'solution' or 'answer'")
        try:
            self.solver.validate(registry.get(self.defense).strength.range.high)
        except ValueError as e:
            raise ConfigError(str(e).replace("SolverConfig.", "equilibrium.solver.")) from None
