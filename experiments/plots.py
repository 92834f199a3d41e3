"""Figures for the distillation game: the empirical protocol and the equilibrium sweep.

Two entry points, each returning the list of files it wrote (PNG, CSV, PNG, CSV, ...):

- ``plot_protocol(results, out_dir)``: ``teacher_vs_student.png`` (+ ``.csv``).
- ``plot_equilibrium(eq, out_dir)``: ``gamma_star``, ``frontier``, ``gap`` and
  ``trajectories`` (each ``.png`` + ``.csv``).

Every figure is drawn with the Agg canvas through matplotlib's object API (no
pyplot, no display, no global backend switch), so this module is safe to import
anywhere. Each PNG has a CSV next to it with the same stem holding exactly the
numbers that were plotted. CSVs keep the inputs' own units: accuracies stay
fractions in [0, 1] as given (the figures show them as %); the gap CSV's derived
columns are in percentage points (``*_pp``). Missing or NaN numbers are empty
cells in the CSV and are left out of the figure.

Colours and markers are fixed across figures: the passive student (β_s = 0) is
``tab:blue`` circles, the (first) adaptive student ``tab:orange`` squares, and
further adaptive tilts / other attacks take the next entries of ``_PALETTE``.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from experiments import io as rio

__all__ = ["plot_protocol", "plot_equilibrium", "DPI"]

DPI = 130
PASSIVE_COLOR = "tab:blue"
ADAPTIVE_COLOR = "tab:orange"
# Colour/marker for the passive student first, then adaptive tilts / other attacks.
_PALETTE = [
    PASSIVE_COLOR,
    ADAPTIVE_COLOR,
    "tab:red",
    "tab:purple",
    "tab:green",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:gray",
]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]
# Line styles for the budgets δ in the trajectory plot.
_DASHES = ["-", "--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 1)), (0, (8, 3)), (0, (3, 1, 1, 1))]


# --------------------------------------------------------------------------- helpers


def _num(x: Any) -> float:
    """A float, or NaN for None / non-numbers."""
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _finite(*xs: float) -> bool:
    return all(math.isfinite(x) for x in xs)


def _stat(entry: Any) -> tuple[float, float]:
    """(mean, stderr) from ``{"mean", "stderr"}`` or a bare number; NaN where missing."""
    if isinstance(entry, Mapping):
        return _num(entry.get("mean")), _num(entry.get("stderr"))
    return _num(entry), math.nan


def _cell(x: Any) -> str:
    """CSV cell: exact round-trippable float, '' for missing / NaN."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, str):
        return x
    v = _num(x)
    if not math.isfinite(v):
        return ""
    if isinstance(x, int):
        return str(x)
    return repr(v)


def _write_csv(path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    for row in rows:
        w.writerow([_cell(v) for v in row])
    rio.write_text(path, buf.getvalue())


def _new_figure(figsize=(7.0, 5.0), nrows=1, sharex=False):
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
    return fig, axes


def _save(fig: Figure, path) -> None:
    fig.tight_layout()
    # bbox_inches="tight" keeps legends placed outside the axes from being clipped.
    rio.save_figure(fig, path, dpi=DPI, bbox_inches="tight", pad_inches=0.15)


def _empty_note(ax, text: str) -> None:
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=12,
        color="0.35",
        zorder=10,
        bbox=dict(boxstyle="round,pad=0.4", fc="white", ec="0.8"),
    )


def _err(values: Sequence[float]):
    """Error-bar array with NaN -> 0, or None when nothing is finite (no bars)."""
    if not any(math.isfinite(v) for v in values):
        return None
    return [v if math.isfinite(v) else 0.0 for v in values]


def _pct(x: float) -> float:
    return 100.0 * x


def _beta_label(beta: float) -> str:
    return "passive" if beta == 0 else f"adaptive β={beta:g}"


def _beta_styles(betas: Iterable[float]) -> dict[float, tuple[str, str]]:
    """β -> (colour, marker): β=0 is passive blue, adaptive tilts take orange, red, ..."""
    styles: dict[float, tuple[str, str]] = {}
    adaptive = sorted(b for b in set(betas) if b != 0)
    if any(b == 0 for b in betas):
        styles[0.0] = (_PALETTE[0], _MARKERS[0])
    for i, b in enumerate(adaptive):
        j = 1 + i % (len(_PALETTE) - 1)
        styles[b] = (_PALETTE[j], _MARKERS[j])
    return styles


def _freeze_legend(fig: Figure, ax) -> None:
    """Pin a ``loc="best"`` legend where it lands now (before labels are added), so
    labels can avoid it without it jumping elsewhere afterwards."""
    leg = ax.get_legend()
    if leg is None:
        return
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    bb, ab = leg.get_window_extent(renderer), ax.get_window_extent(renderer)
    leg.set_loc(((bb.x0 - ab.x0) / ab.width, (bb.y0 - ab.y0) / ab.height))


def _densify(xy: np.ndarray, connected: bool, step_px: float = 3.0) -> np.ndarray:
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    if not connected or len(xy) < 2:
        return xy[np.isfinite(xy).all(axis=1)]
    out = [xy[:1]]
    for a, b in zip(xy[:-1], xy[1:]):
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            out.append(b[None] if np.isfinite(b).all() else np.zeros((0, 2)))
            continue
        n = max(int(np.hypot(*(b - a)) // step_px), 1)
        out.append(a + (b - a) * np.linspace(0, 1, n + 1)[1:, None])
    xy = np.concatenate(out)
    return xy[np.isfinite(xy).all(axis=1)]


def _obstacles(ax) -> np.ndarray:
    """Display-space sample points of everything drawn in ``ax`` (lines, markers, error bars)."""
    pts = [np.zeros((0, 2))]
    for line in ax.get_lines():
        xy = line.get_transform().transform(line.get_xydata())
        pts.append(_densify(xy, line.get_linestyle() not in ("None", "none", "", " ")))
    for coll in ax.collections:
        for seg in getattr(coll, "get_segments", lambda: [])():
            pts.append(_densify(coll.get_transform().transform(seg), True))
    return np.concatenate(pts)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


# Candidate label offsets (points) and alignment, nearest first.
_SPOTS = [
    (7, 5, "left", "bottom"),
    (7, -5, "left", "top"),
    (-7, 5, "right", "bottom"),
    (-7, -5, "right", "top"),
    (0, 9, "center", "bottom"),
    (0, -9, "center", "top"),
    (10, 0, "left", "center"),
    (-10, 0, "right", "center"),
]


def _place_labels(fig: Figure, ax, items: Sequence[tuple[str, tuple[float, float], dict]]) -> list:
    """Annotate each (text, (x, y), text kwargs) at the nearby spot that overlaps the
    fewest drawn things, other labels, the legend and the axes edge. Labels pushed
    further out get a thin leader line back to their point."""
    if not items:
        return []
    fig.tight_layout()
    _freeze_legend(fig, ax)
    renderer = fig.canvas.get_renderer()
    obstacles = _obstacles(ax)
    ab = ax.get_window_extent(renderer)
    leg = ax.get_legend()
    blocked = [leg.get_window_extent(renderer)] if leg is not None else []
    pad = 3.0
    anns = []
    for text, xy, kw in items:
        ann = ax.annotate(text, xy, xytext=(0, 0), textcoords="offset points", **kw)
        best = None
        for ring, scale in enumerate((1.0, 2.0, 3.2)):
            for rank, (dx, dy, ha, va) in enumerate(_SPOTS):
                ann.xyann = (dx * scale, dy * scale)
                ann.set_ha(ha)
                ann.set_va(va)
                bb = ann.get_window_extent(renderer)
                area = max(bb.width * bb.height, 1.0)
                inside = (
                    (obstacles[:, 0] > bb.x0 - pad)
                    & (obstacles[:, 0] < bb.x1 + pad)
                    & (obstacles[:, 1] > bb.y0 - pad)
                    & (obstacles[:, 1] < bb.y1 + pad)
                )
                score = (
                    float(inside.sum())
                    + 1000.0 * sum(_overlap(bb, o) for o in blocked) / area
                    + 1000.0 * (1.0 - _overlap(bb, ab) / area)
                    + 4.0 * ring
                    + 0.3 * rank
                )
                if best is None or score < best[0]:
                    best = (score, ann.xyann, ha, va, ring)
        _, off, ha, va, ring = best
        ann.remove()
        arrow = dict(arrowstyle="-", color="0.55", lw=0.6, shrinkA=1, shrinkB=4) if ring else None
        ann = ax.annotate(text, xy, xytext=off, textcoords="offset points", ha=ha, va=va, arrowprops=arrow, **kw)
        blocked.append(ann.get_window_extent(renderer))
        anns.append(ann)
    return anns


def _paths(out_dir, stem: str) -> tuple[epath.Path, epath.Path]:
    """The .png and .csv of `stem` in `out_dir` (local or gs://; epath paths)."""
    out = rio.makedirs(out_dir)
    return out / f"{stem}.png", out / f"{stem}.csv"


# --------------------------------------------------------------------------- protocol


def _student_kinds(rows: Sequence[Mapping]) -> list[str]:
    kinds: list[str] = []
    for row in rows:
        for k in row.get("students") or {}:
            if k not in kinds:
                kinds.append(k)
    if "passive" in kinds:
        kinds.remove("passive")
        kinds.insert(0, "passive")
    return kinds


def _adaptive_key(row: Mapping) -> str | None:
    students = row.get("students") or {}
    key = row.get("adaptive_key")
    if key in students:
        return key
    for k in students:
        if k.startswith("adaptive"):
            return k
    return None


def plot_protocol(results: Mapping, out_dir) -> list[epath.Path]:
    """Teacher accuracy (x, %) vs student accuracy (y, %) per defense setting.

    ``results["rows"]``: dicts with ``label``, ``teacher_accuracy`` ({mean, stderr}),
    ``students`` (kind -> {mean, stderr}; "passive" plus e.g. "adaptive(beta=2)") and
    ``adaptive_key`` (which student entry is the adaptive one). Passive and adaptive
    students are plotted with stderr bars in x and y, joined by a dashed line, and
    annotated with the row label. Writes ``teacher_vs_student.{png,csv}``; the CSV has
    label, teacher_mean, teacher_stderr, then <kind>_mean, <kind>_stderr for every
    student kind present in any row (fractions as given; empty where absent).
    """
    png, csv_path = _paths(out_dir, "teacher_vs_student")
    rows = list(results.get("rows") or [])
    kinds = _student_kinds(rows)

    header = ["label", "teacher_mean", "teacher_stderr"]
    for k in kinds:
        header += [f"{k}_mean", f"{k}_stderr"]
    table = []
    for row in rows:
        t_mean, t_se = _stat(row.get("teacher_accuracy"))
        line: list[Any] = [str(row.get("label", "")), t_mean, t_se]
        students = row.get("students") or {}
        for k in kinds:
            line += list(_stat(students[k])) if k in students else [None, None]
        table.append(line)
    _write_csv(csv_path, header, table)

    fig, (ax,) = _new_figure((7.5, 5.5))
    adaptive_keys = {_adaptive_key(r) for r in rows} - {None}
    adaptive_name = "adaptive"
    if len(adaptive_keys) == 1:
        detail = next(iter(adaptive_keys)).removeprefix("adaptive").strip("() ")
        adaptive_name = f"adaptive {detail.replace('beta', 'β')}".strip()
    series = {"passive": ([], [], [], []), "adaptive": ([], [], [], [])}
    labels = []
    for row in rows:
        t_mean, t_se = _stat(row.get("teacher_accuracy"))
        if not math.isfinite(t_mean):
            continue
        students = row.get("students") or {}
        pts = {}
        for role, key in (("passive", "passive"), ("adaptive", _adaptive_key(row))):
            if key is None or key not in students:
                continue
            s_mean, s_se = _stat(students[key])
            if not math.isfinite(s_mean):
                continue
            xs, ys, xe, ye = series[role]
            xs.append(_pct(t_mean))
            ys.append(_pct(s_mean))
            xe.append(_pct(t_se))
            ye.append(_pct(s_se))
            pts[role] = (_pct(t_mean), _pct(s_mean))
        if len(pts) == 2:
            (x0, y0), (x1, y1) = pts["passive"], pts["adaptive"]
            ax.plot([x0, x1], [y0, y1], ls="--", color="0.55", lw=1.0, zorder=1)
        if pts:
            x, y = max(pts.values(), key=lambda p: p[1])
            labels.append((str(row.get("label", "")), (x, y), dict(fontsize=9, color="0.15")))
    for role, color, marker, name in (
        ("passive", PASSIVE_COLOR, "o", "passive student"),
        ("adaptive", ADAPTIVE_COLOR, "s", f"{adaptive_name} student"),
    ):
        xs, ys, xe, ye = series[role]
        if xs:
            ax.errorbar(
                xs,
                ys,
                xerr=_err(xe),
                yerr=_err(ye),
                fmt=marker,
                color=color,
                ms=7,
                capsize=3,
                elinewidth=1.2,
                label=name,
                zorder=3,
            )
    if not (series["passive"][0] or series["adaptive"][0]):
        _empty_note(ax, "no results")
    else:
        ax.legend(loc="best", framealpha=0.9)
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel("teacher accuracy (%)")
    ax.set_ylabel("student accuracy (%)")
    ax.set_title("Teacher utility vs student capability per defense\n(mean ± stderr over seeds)")
    _place_labels(fig, ax, labels)
    _save(fig, png)
    return [png, csv_path]


# --------------------------------------------------------------------------- equilibrium


def _eq_points(eq: Mapping) -> list[dict]:
    pts = []
    for p in eq.get("points") or []:
        t_mean, t_se = _stat(p.get("teacher_accuracy"))
        s_mean, s_se = _stat(p.get("student_accuracy"))
        pts.append(
            dict(
                beta=_num(p.get("beta")),
                delta=_num(p.get("delta")),
                gamma_star=_num(p.get("gamma_star")),
                converged=bool(p.get("converged", True)),
                iterations=p.get("iterations"),
                J=_num(p.get("J")),
                U=_num(p.get("U")),
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
    betas = {_num(b) for b in (eq.get("betas") or [])} | {p["beta"] for p in pts}
    betas |= {_num(t.get("beta")) for t in (eq.get("trajectories") or [])}
    return sorted(b for b in betas if math.isfinite(b))


def _plot_gamma_star(pts, styles, out_dir) -> list[epath.Path]:
    png, csv_path = _paths(out_dir, "gamma_star")
    _write_csv(
        csv_path,
        ["beta", "delta", "gamma_star", "converged", "iterations", "J", "U"],
        [
            [p["beta"], p["delta"], p["gamma_star"], p["converged"], p["iterations"], p["J"], p["U"]]
            for p in sorted(pts, key=lambda p: (p["beta"], p["delta"]))
        ],
    )
    fig, (ax,) = _new_figure()
    any_hollow = False
    for beta, group in _by_beta(pts).items():
        if beta not in styles:
            continue
        color, marker = styles[beta]
        good = [p for p in group if _finite(p["delta"], p["gamma_star"])]
        if not good:
            continue
        ax.plot(
            [p["delta"] for p in good],
            [p["gamma_star"] for p in good],
            color=color,
            lw=1.8,
            marker=marker,
            ms=7,
            label=_beta_label(beta),
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
        _empty_note(ax, "no finite γ* values")
    ax.set_xlabel("utility budget δ (nats/token)")
    ax.set_ylabel("equilibrium PoE weight γ* (unitless)")
    ax.set_title("Teacher's equilibrium defense strength γ*(δ)")
    ax.margins(x=0.08, y=0.1)
    _save(fig, png)
    return [png, csv_path]


def _plot_frontier(pts, styles, out_dir) -> list[epath.Path]:
    png, csv_path = _paths(out_dir, "frontier")
    _write_csv(
        csv_path,
        ["beta", "delta", "teacher_mean", "teacher_stderr", "student_mean", "student_stderr"],
        [
            [p["beta"], p["delta"], p["t_mean"], p["t_se"], p["s_mean"], p["s_se"]]
            for p in sorted(pts, key=lambda p: (p["beta"], p["delta"]))
        ],
    )
    fig, (ax,) = _new_figure((7.5, 5.5))
    labels = []
    for beta, group in _by_beta(pts).items():
        if beta not in styles:
            continue
        color, marker = styles[beta]
        good = [p for p in group if _finite(p["t_mean"], p["s_mean"])]
        if not good:
            continue
        xs = [_pct(p["t_mean"]) for p in good]
        ys = [_pct(p["s_mean"]) for p in good]
        ax.errorbar(
            xs,
            ys,
            xerr=_err([_pct(p["t_se"]) for p in good]),
            yerr=_err([_pct(p["s_se"]) for p in good]),
            color=color,
            marker=marker,
            ms=7,
            lw=1.6,
            capsize=3,
            elinewidth=1.0,
            label=_beta_label(beta),
        )
        for p, x, y in zip(good, xs, ys):
            if math.isfinite(p["delta"]):
                labels.append((f"δ={p['delta']:g}", (x, y), dict(fontsize=8.5, color=color)))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", framealpha=0.9)
    else:
        _empty_note(ax, "no finite accuracies")
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel("teacher accuracy (%)")
    ax.set_ylabel("student accuracy (%)")
    ax.set_title(
        "Equilibrium frontier: teacher utility vs student capability\n(one point per utility budget δ, nats/token)"
    )
    _place_labels(fig, ax, labels)
    _save(fig, png)
    return [png, csv_path]


def _plot_gap(pts, betas, styles, out_dir) -> list[epath.Path]:
    png, csv_path = _paths(out_dir, "gap")
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
            gap = _pct(a["s_mean"] - pm)
            gap_se = _pct(math.sqrt(a["s_se"] ** 2 + pse**2))
            table.append([d, b, a["s_mean"], a["s_se"], pm, pse, gap, gap_se])
            if math.isfinite(gap):
                bars[b].append((di, gap, gap_se))
    _write_csv(
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

    fig, (ax,) = _new_figure()
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
            yerr=_err([e for _, _, e in bars[b]]),
            capsize=3,
            label=_beta_label(b),
            edgecolor="0.2",
            linewidth=0.6,
            zorder=3,
            error_kw=dict(ecolor="0.25", elinewidth=1.1, capthick=1.1),
        )
        drawn = True
    ax.set_xticks(range(len(deltas)))
    ax.set_xticklabels([f"δ={d:g}" for d in deltas])
    if not adaptive_betas:
        _empty_note(ax, "no adaptive student")
    elif not passive:
        _empty_note(ax, "no passive student (β=0) to compare with")
    elif not drawn:
        _empty_note(ax, "no finite accuracies")
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9, title="student")
    ax.set_xlim(-0.6, max(len(deltas), 1) - 0.4)
    if not drawn:
        ax.set_ylim(-1.0, 1.0)
    ax.set_xlabel("utility budget δ (nats/token)")
    ax.set_ylabel("adaptive − passive student accuracy (pp)")
    ax.set_title("Adaptive student's advantage at each equilibrium\n(± combined stderr)")
    ax.grid(False, axis="x")
    _save(fig, png)
    return [png, csv_path]


def _plot_trajectories(eq, styles, out_dir) -> list[epath.Path]:
    png, csv_path = _paths(out_dir, "trajectories")
    runs = []
    for t in eq.get("trajectories") or []:
        runs.append(
            (
                _num(t.get("beta")),
                _num(t.get("delta")),
                [_num(v) for v in (t.get("gamma") or [])],
                [_num(v) for v in (t.get("mu") or [])],
            )
        )
    runs.sort(key=lambda r: (r[0], r[1]))
    table = []
    for beta, delta, g, mu in runs:
        for it in range(max(len(g), len(mu))):
            table.append([beta, delta, it, g[it] if it < len(g) else None, mu[it] if it < len(mu) else None])
    _write_csv(csv_path, ["beta", "delta", "iteration", "gamma", "mu"], table)

    fig, (ax_g, ax_m) = _new_figure((8.0, 6.5), nrows=2, sharex=True)
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
                    label=f"{_beta_label(beta)}, δ={delta:g}",
                )
    if runs:
        betas_seen = sorted({b for b, _, _, _ in runs}, key=lambda b: (not math.isfinite(b), b))
        by_beta = [Line2D([], [], color=styles.get(b, ("0.3",))[0], lw=2.2) for b in betas_seen]
        by_delta = [Line2D([], [], color="0.25", lw=1.6, ls=dash[d]) for d in deltas]
        first = ax_g.legend(
            by_beta,
            [_beta_label(b) for b in betas_seen],
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
        _empty_note(ax_g, "no trajectories recorded")
    ax_g.set_ylabel("γ (PoE weight)")
    ax_m.set_ylabel("μ (dual variable)")
    ax_m.set_xlabel("solver iteration")
    ax_g.set_title("Solver trajectories: defense strength γ and budget multiplier μ")
    _save(fig, png)
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
      trajectories γ and μ against solver iteration, one line per (β, δ) run
    """
    pts = [p for p in _eq_points(eq) if math.isfinite(p["beta"])]
    betas = _all_betas(eq, pts)
    styles = _beta_styles(betas)
    paths: list[epath.Path] = []
    paths += _plot_gamma_star(pts, styles, out_dir)
    paths += _plot_frontier(pts, styles, out_dir)
    paths += _plot_gap(pts, betas, styles, out_dir)
    paths += _plot_trajectories(eq, styles, out_dir)
    return paths


def plot_learning_curve(results: Mapping, out_dir) -> list[epath.Path]:
    """Passive student accuracy (%) vs distillation steps under standard decoding (one run, evaluated
    at each step count of ``protocol.distill.curve``), mean ± stderr over seeds, with the table's step
    count marked. Writes ``learning_curve.{png,csv}``; nothing when no row has a learning curve."""
    row = next((r for r in results.get("rows") or [] if r.get("learning_curve")), None)
    if row is None:
        return []
    png, csv_path = _paths(out_dir, "learning_curve")
    points = sorted((int(n), *_stat(s)) for n, s in row["learning_curve"].items())
    _write_csv(csv_path, ["steps", "passive_mean", "passive_stderr"], points)
    fig, (ax,) = _new_figure((6.5, 4.5))
    steps, means, ses = zip(*points)
    ax.errorbar(
        steps,
        [_pct(m) for m in means],
        yerr=_err([_pct(s) for s in ses]),
        fmt="o-",
        color=PASSIVE_COLOR,
        ms=6,
        capsize=3,
        label=f"passive student on {row.get('label', 'standard')} traces",
    )
    if results.get("distill_steps"):
        ax.axvline(results["distill_steps"], color="0.5", ls="--", lw=1, label="steps in the results table")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("distillation steps")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title("Is the student trained to a plateau?\n(mean ± stderr over seeds)")
    ax.legend(loc="lower right", framealpha=0.9)
    _save(fig, png)
    return [png, csv_path]
