"""What every figure of experiments/plots.py and experiments/equilibrium_plots.py shares: the fixed colours
and markers, number coercion (missing / non-numbers -> NaN), the CSV writer (each PNG has a CSV next to it with
the same stem holding exactly the numbers that were plotted; missing or NaN numbers are empty cells), and the
figure's creation and saving on the Agg canvas through matplotlib's object API (no pyplot, no display, no global
backend switch), so this module is safe to import anywhere.

Colours and markers are fixed across figures: the passive student (β_s = 0) is ``tab:blue`` circles, the (first)
adaptive student ``tab:orange`` squares, and further adaptive tilts / other attacks take the next entries of
``PALETTE``.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable, Mapping, Sequence

from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import io as rio

DPI = 130
PASSIVE_COLOR = "tab:blue"
ADAPTIVE_COLOR = "tab:orange"
# Colour/marker for the passive student first, then adaptive tilts / other attacks.
PALETTE = [
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
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]


def num(x: Any) -> float:
    """A float, or NaN for None / non-numbers."""
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def finite(*xs: float) -> bool:
    return all(math.isfinite(x) for x in xs)


def stat(entry: Any) -> tuple[float, float]:
    """(mean, stderr) from ``{"mean", "stderr"}`` or a bare number; NaN where missing."""
    if isinstance(entry, Mapping):
        return num(entry.get("mean")), num(entry.get("stderr"))
    return num(entry), math.nan


def cell(x: Any) -> str:
    """CSV cell: exact round-trippable float, '' for missing / NaN."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, str):
        return x
    v = num(x)
    if not math.isfinite(v):
        return ""
    if isinstance(x, int):
        return str(x)
    return repr(v)


def write_csv(path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    for row in rows:
        w.writerow([cell(v) for v in row])
    rio.write_text(path, buf.getvalue())


def new_figure(figsize=(7.0, 5.0), nrows=1, sharex=False):
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
    return fig, axes


def save(fig: Figure, path) -> None:
    fig.tight_layout()
    # bbox_inches="tight" keeps legends placed outside the axes from being clipped.
    rio.save_figure(fig, path, dpi=DPI, bbox_inches="tight", pad_inches=0.15)


def empty_note(ax, text: str) -> None:
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


def err_bars(values: Sequence[float]):
    """Error-bar array with NaN -> 0, or None when nothing is finite (no bars)."""
    if not any(math.isfinite(v) for v in values):
        return None
    return [v if math.isfinite(v) else 0.0 for v in values]


def pct(x: float) -> float:
    return 100.0 * x


def beta_label(beta: float) -> str:
    return "passive" if beta == 0 else f"adaptive β={beta:g}"


def beta_styles(betas: Iterable[float]) -> dict[float, tuple[str, str]]:
    """β -> (colour, marker): β=0 is passive blue, adaptive tilts take orange, red, ..."""
    styles: dict[float, tuple[str, str]] = {}
    adaptive = sorted(b for b in set(betas) if b != 0)
    if any(b == 0 for b in betas):
        styles[0.0] = (PALETTE[0], MARKERS[0])
    for i, b in enumerate(adaptive):
        j = 1 + i % (len(PALETTE) - 1)
        styles[b] = (PALETTE[j], MARKERS[j])
    return styles


def figure_paths(out_dir, stem: str) -> tuple[epath.Path, epath.Path]:
    """The .png and .csv of `stem` in `out_dir` (local or gs://; epath paths)."""
    out = rio.makedirs(out_dir)
    return out / f"{stem}.png", out / f"{stem}.csv"
