"""calibration.png (+ calibration.csv): the game's predicted J(γ) against the protocol's
measured passive-student NLL and accuracy, one point per γ, error bars = SE over seeds.
Drawn like experiments/plots.py (Agg canvas, object API, no pyplot)."""

from __future__ import annotations

import csv
import io
import math

from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import io as rio

DPI = 130
CSV_HEADER = (
    "gamma",
    "J_pred",
    "J_pred_se",
    "dJ_pred",
    "dJ_pred_se",
    "nll_measured",
    "nll_measured_se",
    "accuracy_measured",
    "accuracy_measured_se",
)


def _cell(x) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else repr(float(x))


def plot_calibration(result: dict, out_dir) -> list[epath.Path]:
    """Writes calibration.png and calibration.csv into out_dir (local or gs://); returns both paths."""
    out = rio.makedirs(out_dir)
    pts = result["points"]
    csv_path, png_path = out / "calibration.csv", out / "calibration.png"
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(CSV_HEADER)
    for p in pts:
        w.writerow(
            [_cell(p["gamma"])] + [_cell(p[k][s]) for k in ("J", "dJ", "nll", "accuracy") for s in ("mean", "stderr")]
        )
    rio.write_text(csv_path, buf.getvalue())
    fig = Figure(figsize=(11.0, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    x = [p["J"]["mean"] for p in pts]
    xe = [0.0 if not math.isfinite(p["J"]["stderr"]) else p["J"]["stderr"] for p in pts]
    for ax, key, label, scale in (
        (axes[0], "nll", "measured passive-student NLL (nats/token)", 1.0),
        (axes[1], "accuracy", "measured passive-student accuracy (%)", 100.0),
    ):
        y = [p[key]["mean"] * scale for p in pts]
        ye = [0.0 if not math.isfinite(p[key]["stderr"]) else p[key]["stderr"] * scale for p in pts]
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", color="tab:blue", capsize=3)
        for p, xi, yi in zip(pts, x, y):
            ax.annotate(f"γ={p['gamma']:g}", (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("game's predicted J(γ) (student NLL after the horizon)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    sa = result.get("sign_agreement")
    fig.suptitle(
        f"Calibration ({result.get('config', '')}): spearman(J, NLL) = {result['spearman']:.2f}, "
        f"sign agreement = {'n/a' if sa is None or not math.isfinite(sa) else f'{sa:.2f}'}"
    )
    fig.tight_layout()
    rio.save_figure(fig, png_path, dpi=DPI)
    return [png_path, csv_path]
