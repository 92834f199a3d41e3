"""What `distgame equilibrium` reports: the summary metrics it is judged by and EQUILIBRIUM.md."""

from __future__ import annotations

from experiments.stats import pm
from game import registry

SUMMARY_KEYS = (
    "interior_budgets_passive",
    "interior_budgets_adaptive",
    "monotone_passive",
    "starts_agree",
    "check_delta_passive",
    "check_delta_passive_se",
    "check_delta_teacher",
    "check_utility_loss",
    "check_within_budget",
)


def summary_metrics(eq: dict) -> dict:
    """The numbers the equilibrium is judged by (last-line JSON of `distgame equilibrium`):
    interior budgets per student kind (0.01 < γ* < γ_max − 0.01), whether the passive γ* is
    non-decreasing in δ, and the empirical check at the largest budget."""
    gmax = eq.get("gamma_max") or 1.0

    def of(betas):
        return [p for p in eq["points"] if p["beta"] in betas]

    adaptive_betas = [b for b in eq["betas"] if b != 0]
    passive = sorted(of([0.0]), key=lambda p: p["delta"])
    gs = [p["gamma_star"] for p in passive]

    def interior(pts):
        return sum(0.01 < p["gamma_star"] < gmax - 0.01 for p in pts)

    out = {
        "interior_budgets_passive": interior(passive),
        "interior_budgets_adaptive": interior(of(adaptive_betas[-1:])) if adaptive_betas else 0,
        "monotone_passive": int(all(b >= a - 1e-3 for a, b in zip(gs, gs[1:]))),
        "starts_agree": int(all(p.get("starts_agree", True) for p in eq["points"])),
    }
    check = eq.get("check") or {}
    if "passive_change" in check:
        out["check_delta_passive"] = check["passive_change"]["mean"]
        out["check_delta_passive_se"] = check["passive_change"]["stderr"]
        out["check_delta_teacher"] = check["teacher_change"]["mean"]
        out["check_utility_loss"] = eq["utility_ref"] - check["utility"]  # nats/token, U(0) − U(γ*)
        out["check_within_budget"] = int(out["check_utility_loss"] <= check["delta"] + 1e-9)
    return out


def equilibrium_markdown(eq: dict) -> str:
    frontier = eq.get("method", "solver") == "frontier"
    how = (
        "found by enumeration: γ_δ is the exact end of the feasible interval, J(γ) is measured on a grid that "
        "contains every γ_δ (mean ± SE over the game's prefix pools); margin = how many SE J(γ*) lies above the "
        "best other feasible point"
        if frontier
        else f"found by the gradient solver (sampling channel: {eq.get('estimator')}); γ*(starts): the end point "
        "from each start γ_0; γ* = nan where every start ended infeasible"
    )
    lines = [
        f"# Equilibrium of the {registry.get(eq.get('defense', registry.POE)).title or eq['defense']} game",
        "",
        f"U(0) = {eq['utility_ref']:.4f} nats/token. γ* solves max J(θ_T(γ)) s.t. U(0) − U(γ) ≤ δ, "
        f"θ_T the student after {eq.get('horizon')} distillation steps from its base (β=0 passive, β>0 adaptive); "
        f"J scores the {eq.get('capability')}; γ* {how}.",
        "",
    ]
    if frontier:
        lines += ["| β | δ (nats/token) | γ_δ | γ* | J | margin (SE) | U | teacher acc (%) | student acc (%) |"]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        row = "| {b:g} | {p[delta]:g} | {p[gamma_bound]:.4f} | {p[gamma_star]:.2f} | {p[J]:.4f} ± {p[J_se]:.4f} | {p[margin_se]:.1f} | {p[U]:.4f} | "
    else:
        lines += [
            "| β | δ (nats/token) | γ* | γ*(starts) | starts agree | converged | iterations | s/iter | J | U | teacher acc (%) | student acc (%) |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|---|---|---|"]
        row = "| {b:g} | {p[delta]:g} | {p[gamma_star]:.4f} | {by_start} | {agree} | {conv} | {p[iterations]} | {spi:.3f} | {p[J]:.4f} | {p[U]:.4f} | "
    for p in eq["points"]:
        lines.append(
            row.format(
                b=p["beta"],
                p=p,
                by_start=", ".join(f"{g:.3f}" for g in p.get("gamma_by_start", [])),
                agree="yes" if p.get("starts_agree", True) else "NO",
                conv="yes" if p["converged"] else "NO",
                spi=p.get("seconds_per_iteration", 0.0),
            )
            + f"{pm(p.get('teacher_accuracy'))} | {pm(p.get('student_accuracy'))} |"
        )
    for c in eq.get("curves", []):
        cells = ", ".join(f"{g:.2f}: {m:.4f} ± {e:.4f}" for g, m, e in zip(c["gamma"], c["J_mean"], c["J_se"]))
        lines += ["", f"J(γ) for β={c['beta']:g} (γ: J ± SE): {cells}"]
    summary = {k: eq[k] for k in SUMMARY_KEYS if k in eq}
    lines += [
        "",
        "Summary: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in summary.items()),
    ]
    plots = "`gamma_star.png`, `frontier.png`, `gap.png`, " + ("`curve.png`" if frontier else "`trajectories.png`")
    lines += ["", f"Plots: {plots} (data in the matching CSVs)."]
    return "\n".join(lines) + "\n"
