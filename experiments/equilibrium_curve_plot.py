"""``curve.png`` + ``.csv`` of equilibrium.method='frontier': the game's J(γ) per student tilt with
its standard error, every budget's feasible bound γ_δ (dotted) and the γ* read off the curve."""

from __future__ import annotations

from typing import Mapping

from etils import epath

from experiments.plot_common import beta_label, empty_note, err_bars, figure_paths, new_figure, num, save, write_csv


def plot_curve(eq: Mapping, styles, out_dir) -> list[epath.Path]:
    png, csv_path = figure_paths(out_dir, "curve")
    curves = eq.get("curves") or []
    write_csv(
        csv_path,
        ["beta", "gamma", "J_mean", "J_se"],
        [[c["beta"], g, m, e] for c in curves for g, m, e in zip(c["gamma"], c["J_mean"], c["J_se"])],
    )
    fig, (ax,) = new_figure((8.0, 5.0))
    for c in curves:
        color, marker = styles.get(num(c["beta"]), ("0.3", "o"))
        ax.errorbar(
            c["gamma"],
            c["J_mean"],
            yerr=err_bars([num(e) for e in c["J_se"]]),
            color=color,
            marker=marker,
            capsize=3,
            label=f"{beta_label(num(c['beta']))}: J(γ)",
        )
        stars = [p for p in eq.get("points") or [] if p["beta"] == c["beta"]]
        ax.scatter([p["gamma_star"] for p in stars], [p["J"] for p in stars], s=160, marker="*", color=color, zorder=5)
    for p in eq.get("points") or []:
        if p["beta"] == (eq.get("betas") or [0.0])[0]:
            ax.axvline(p["gamma_bound"], color="0.4", ls=":", lw=1)
            ax.annotate(
                f"δ={p['delta']:g}",
                (p["gamma_bound"], 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
                color="0.3",
            )
    if curves:
        ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    else:
        empty_note(ax, "no J(γ) curve recorded")
    ax.set_xlabel("defense strength γ")
    ax.set_ylabel("J: student NLL of reference solutions (nats/token)")
    ax.set_title("The game's J(γ) after the horizon; dotted: feasible bound γ_δ per budget; ★ γ*")
    save(fig, png)
    return [png, csv_path]
