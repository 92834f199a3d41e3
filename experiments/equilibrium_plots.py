"""Figures of the equilibrium sweep: ``plot_equilibrium(eq, out_dir)`` writes ``gamma_star``, ``frontier``,
``gap`` and ``trajectories`` (each ``.png`` + ``.csv``) and returns the list of files it wrote (PNG, CSV, PNG,
CSV, ...).

Drawn like the protocol's figures (experiments/plots.py; shared helpers in experiments/plot_common.py). CSVs keep
the inputs' own units: accuracies stay fractions in [0, 1] as given (the figures show them as %); the gap CSV's
derived columns are in percentage points (``*_pp``). Missing or NaN numbers are empty cells in the CSV and are left
out of the figure.
"""

from __future__ import annotations

import math
from typing import Mapping

from etils import epath
from matplotlib.lines import Line2D

from experiments.equilibrium_curve_plot import plot_curve
from experiments.plot_common import (
    beta_label,
    beta_styles,
    empty_note,
    err_bars,
    figure_paths,
    finite,
    new_figure,
    num,
    pct,
    save,
    stat,
    write_csv,
)
from experiments.plot_labels import place_labels

__all__ = ["plot_equilibrium"]

# Line styles for the budgets δ in the trajectory plot.
_DASHES = ["-", "--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 1)), (0, (8, 3)), (0, (3, 1, 1, 1))]


def _eq_points(eq: Mapping) -> list[dict]:
    pts = []
    for p in eq.get("points") or []:
        t_mean, t_se = stat(p.get("teacher_accuracy"))
        s_mean, s_se = stat(p.get("student_accuracy"))
        pts.append(
            dict(
                beta=num(p.get("beta")),
                delta=num(p.get("delta")),
                gamma_star=num(p.get("gamma_star")),
                converged=bool(p.get("converged", True)),
                iterations=p.get("iterations"),
                J=num(p.get("J")),
                U=num(p.get("U")),
                t_mean=t_mean,
                t_se=t_se,
                s_mean=s_mean,
                s_se=s_se,
            )
        )
    return pts


def _by_beta(pts: list[dict]) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for p in sorted(pts, key=lambda p: (p["beta"], p["delta"])):
        out.setdefault(p["beta"], []).append(p)
    return out


def _all_betas(eq: Mapping, pts: list[dict]) -> list[float]:
    betas = {num(b) for b in (eq.get("betas") or [])} | {p["beta"] for p in pts}
    betas |= {num(t.get("beta")) for t in (eq.get("trajectories") or [])}
    return sorted(b for b in betas if math.isfinite(b))


def _plot_gamma_star(pts, styles, out_dir) -> list[epath.Path]:
    png, csv_path = figure_paths(out_dir, "gamma_star")
    write_csv(
        csv_path,
        ["beta", "delta", "gamma_star", "converged", "iterations", "J", "U"],
        [
            [p["beta"], p["delta"], p["gamma_star"], p["converged"], p["iterations"], p["J"], p["U"]]
            for p in sorted(pts, key=lambda p: (p["beta"], p["delta"]))
        ],
    )
    fig, (ax,) = new_figure()
    any_hollow = False
    for beta, group in _by_beta(pts).items():
        if beta not in styles:
            continue
        color, marker = styles[beta]
        good = [p for p in group if finite(p["delta"], p["gamma_star"])]
        if not good:
            continue
        ax.plot(
            [p["delta"] for p in good],
            [p["gamma_star"] for p in good],
            color=color,
            lw=1.8,
            marker=marker,
            ms=7,
            label=beta_label(beta),
        )
        hollow = [p for p in good if not p["converged"]]
        if hollow:
            any_hollow = True
            ax.plot(
                [p["delta"] for p in hollow],
                [p["gamma_star"] for p in hollow],
                ls="none",
                marker=marker,
                ms=7,
                mfc="white",
                mec=color,
                mew=1.8,
                zorder=4,
            )
    handles, labels = ax.get_legend_handles_labels()
    if any_hollow:
        handles.append(Line2D([], [], ls="none", marker="o", mfc="white", mec="0.3", ms=7))
        labels.append("not converged")
    if handles:
        ax.legend(handles, labels, loc="best", framealpha=0.9)
    else:
        empty_note(ax, "no finite γ* values")
    ax.set_xlabel("utility budget δ (nats/token)")
    ax.set_ylabel("equilibrium PoE weight γ* (unitless)")
    ax.set_title("Teacher's equilibrium defense strength γ*(δ)")
    ax.margins(x=0.08, y=0.1)
    save(fig, png)
    return [png, csv_path]


def _plot_frontier(pts, styles, out_dir) -> list[epath.Path]:
    png, csv_path = figure_paths(out_dir, "frontier")
    write_csv(
        csv_path,
        ["beta", "delta", "teacher_mean", "teacher_stderr", "student_mean", "student_stderr"],
        [
            [p["beta"], p["delta"], p["t_mean"], p["t_se"], p["s_mean"], p["s_se"]]
            for p in sorted(pts, key=lambda p: (p["beta"], p["delta"]))
        ],
    )
    fig, (ax,) = new_figure((7.5, 5.5))
    labels = []
    for beta, group in _by_beta(pts).items():
        if beta not in styles:
            continue
        color, marker = styles[beta]
        good = [p for p in group if finite(p["t_mean"], p["s_mean"])]
        if not good:
            continue
        xs = [pct(p["t_mean"]) for p in good]
        ys = [pct(p["s_mean"]) for p in good]
        ax.errorbar(
            xs,
            ys,
            xerr=err_bars([pct(p["t_se"]) for p in good]),
            yerr=err_bars([pct(p["s_se"]) for p in good]),
            color=color,
            marker=marker,
            ms=7,
            lw=1.6,
            capsize=3,
            elinewidth=1.0,
            label=beta_label(beta),
        )
        for p, x, y in zip(good, xs, ys):
            if math.isfinite(p["delta"]):
                labels.append((f"δ={p['delta']:g}", (x, y), dict(fontsize=8.5, color=color)))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", framealpha=0.9)
    else:
        empty_note(ax, "no finite accuracies")
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel("teacher accuracy (%)")
    ax.set_ylabel("student accuracy (%)")
    ax.set_title(
        "Equilibrium frontier: teacher utility vs student capability\n(one point per utility budget δ, nats/token)"
    )
    place_labels(fig, ax, labels)
    save(fig, png)
    return [png, csv_path]


def _plot_gap(pts, betas, styles, out_dir) -> list[epath.Path]:
    png, csv_path = figure_paths(out_dir, "gap")
    passive = {p["delta"]: p for p in pts if p["beta"] == 0}
    adaptive_betas = [b for b in betas if b != 0]
    deltas = sorted({p["delta"] for p in pts if math.isfinite(p["delta"])})
    table = []
    bars: dict[float, list[tuple[int, float, float]]] = {b: [] for b in adaptive_betas}
    for di, d in enumerate(deltas):
        base = passive.get(d)
        for b in adaptive_betas:
            a = next((p for p in pts if p["beta"] == b and p["delta"] == d), None)
            if a is None:
                continue
            pm, pse = (base["s_mean"], base["s_se"]) if base else (math.nan, math.nan)
            gap = pct(a["s_mean"] - pm)
            gap_se = pct(math.sqrt(a["s_se"] ** 2 + pse**2))
            table.append([d, b, a["s_mean"], a["s_se"], pm, pse, gap, gap_se])
            if math.isfinite(gap):
                bars[b].append((di, gap, gap_se))
    write_csv(
        csv_path,
        [
            "delta",
            "beta",
            "adaptive_mean",
            "adaptive_stderr",
            "passive_mean",
            "passive_stderr",
            "gap_pp",
            "gap_stderr_pp",
        ],
        table,
    )

    fig, (ax,) = new_figure()
    ax.axhline(0.0, color="0.2", lw=1.0, zorder=2)
    n = max(len(adaptive_betas), 1)
    width = min(0.8 / n, 0.4)
    drawn = False
    for k, b in enumerate(adaptive_betas):
        if not bars[b]:
            continue
        color, _ = styles[b]
        xs = [di + width * (k - (n - 1) / 2) for di, _, _ in bars[b]]
        ax.bar(
            xs,
            [g for _, g, _ in bars[b]],
            width=width * 0.92,
            color=color,
            alpha=0.85,
            yerr=err_bars([e for _, _, e in bars[b]]),
            capsize=3,
            label=beta_label(b),
            edgecolor="0.2",
            linewidth=0.6,
            zorder=3,
            error_kw=dict(ecolor="0.25", elinewidth=1.1, capthick=1.1),
        )
        drawn = True
    ax.set_xticks(range(len(deltas)))
    ax.set_xticklabels([f"δ={d:g}" for d in deltas])
    if not adaptive_betas:
        empty_note(ax, "no adaptive student")
    elif not passive:
        empty_note(ax, "no passive student (β=0) to compare with")
    elif not drawn:
        empty_note(ax, "no finite accuracies")
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9, title="student")
    ax.set_xlim(-0.6, max(len(deltas), 1) - 0.4)
    if not drawn:
        ax.set_ylim(-1.0, 1.0)
    ax.set_xlabel("utility budget δ (nats/token)")
    ax.set_ylabel("adaptive − passive student accuracy (pp)")
    ax.set_title("Adaptive student's advantage at each equilibrium\n(± combined stderr)")
    ax.grid(False, axis="x")
    save(fig, png)
    return [png, csv_path]


def _plot_trajectories(eq, styles, out_dir) -> list[epath.Path]:
    png, csv_path = figure_paths(out_dir, "trajectories")
    runs = []
    for t in eq.get("trajectories") or []:
        runs.append(
            (
                num(t.get("beta")),
                num(t.get("delta")),
                [num(v) for v in (t.get("gamma") or [])],
                [num(v) for v in (t.get("mu") or [])],
            )
        )
    runs.sort(key=lambda r: (r[0], r[1]))
    table = []
    for beta, delta, g, mu in runs:
        for it in range(max(len(g), len(mu))):
            table.append([beta, delta, it, g[it] if it < len(g) else None, mu[it] if it < len(mu) else None])
    write_csv(csv_path, ["beta", "delta", "iteration", "gamma", "mu"], table)

    fig, (ax_g, ax_m) = new_figure((8.0, 6.5), nrows=2, sharex=True)
    # Colour = student β (passive blue, adaptive orange, ...), line style = budget δ.
    deltas = sorted({d for _, d, _, _ in runs}, key=lambda d: (not math.isfinite(d), d))
    dash = {d: _DASHES[i % len(_DASHES)] for i, d in enumerate(deltas)}
    for beta, delta, g, mu in runs:
        color, _ = styles.get(beta, ("0.3", "o"))
        for ax, ys in ((ax_g, g), (ax_m, mu)):
            pts = [(i, y) for i, y in enumerate(ys) if math.isfinite(y)]
            if pts:
                ax.plot(
                    [i for i, _ in pts],
                    [y for _, y in pts],
                    color=color,
                    lw=1.6,
                    ls=dash[delta],
                    label=f"{beta_label(beta)}, δ={delta:g}",
                )
    if runs:
        betas_seen = sorted({b for b, _, _, _ in runs}, key=lambda b: (not math.isfinite(b), b))
        by_beta = [Line2D([], [], color=styles.get(b, ("0.3",))[0], lw=2.2) for b in betas_seen]
        by_delta = [Line2D([], [], color="0.25", lw=1.6, ls=dash[d]) for d in deltas]
        first = ax_g.legend(
            by_beta,
            [beta_label(b) for b in betas_seen],
            title="student (colour)",
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            fontsize=9,
            framealpha=0.9,
        )
        ax_g.add_artist(first)
        ax_m.legend(
            by_delta,
            [f"δ={d:g}" for d in deltas],
            title="budget δ (nats/token)",
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            fontsize=9,
            framealpha=0.9,
        )
    else:
        empty_note(ax_g, "no trajectories recorded")
    ax_g.set_ylabel("γ (PoE weight)")
    ax_m.set_ylabel("μ (dual variable)")
    ax_m.set_xlabel("solver iteration")
    ax_g.set_title("Solver trajectories: defense strength γ and budget multiplier μ")
    save(fig, png)
    return [png, csv_path]


def plot_equilibrium(eq: Mapping, out_dir) -> list[epath.Path]:
    """Equilibrium sweep figures (each PNG followed by its CSV in the returned list).

    ``eq``: ``budgets`` (δ values, nats/token), ``betas`` (student tilts β_s; 0 = passive),
    ``points`` (one per (β, δ): gamma_star, converged, iterations, teacher_accuracy and
    student_accuracy as {mean, stderr} fractions, J, U) and ``trajectories`` (per run:
    beta, delta, gamma[], mu[]). Writes
      gamma_star   γ*(δ) per β (unconverged points hollow)
      frontier     teacher vs student accuracy (%) per β, points annotated with δ
      gap          adaptive − passive student accuracy (pp) per δ, bar per adaptive β
      trajectories γ and μ against solver iteration, one line per (β, δ) run (method 'solver')
      curve        J(γ) ± SE per β with the feasible bounds and γ* (method 'frontier')
    """
    pts = [p for p in _eq_points(eq) if math.isfinite(p["beta"])]
    betas = _all_betas(eq, pts)
    styles = beta_styles(betas)
    paths: list[epath.Path] = []
    paths += _plot_gamma_star(pts, styles, out_dir)
    paths += _plot_frontier(pts, styles, out_dir)
    paths += _plot_gap(pts, betas, styles, out_dir)
    paths += plot_curve(eq, styles, out_dir) if eq.get("curves") else _plot_trajectories(eq, styles, out_dir)
    return paths
