"""Figures of the empirical protocol, each returning the list of files it wrote (PNG, CSV, ...):

- ``plot_protocol(results, out_dir)``: ``teacher_vs_student.png`` (+ ``.csv``).
- ``plot_learning_curve(results, out_dir)``: ``learning_curve.png`` (+ ``.csv``).

The equilibrium sweep's figures are in experiments/equilibrium_plots.py; what both share (colours, CSVs, the Agg
canvas) in experiments/plot_common.py. CSVs keep the inputs' own units: accuracies stay fractions in [0, 1] as
given (the figures show them as %). Missing or NaN numbers are empty cells in the CSV and are left out of the
figure.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from etils import epath

from experiments.plot_common import (
    ADAPTIVE_COLOR,
    PASSIVE_COLOR,
    empty_note,
    err_bars,
    figure_paths,
    new_figure,
    pct,
    save,
    stat,
    write_csv,
)
from experiments.plot_labels import place_labels

__all__ = ["plot_protocol", "plot_learning_curve"]


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
    png, csv_path = figure_paths(out_dir, "teacher_vs_student")
    rows = list(results.get("rows") or [])
    kinds = _student_kinds(rows)

    header = ["label", "teacher_mean", "teacher_stderr"]
    for k in kinds:
        header += [f"{k}_mean", f"{k}_stderr"]
    table = []
    for row in rows:
        t_mean, t_se = stat(row.get("teacher_accuracy"))
        line: list[Any] = [str(row.get("label", "")), t_mean, t_se]
        students = row.get("students") or {}
        for k in kinds:
            line += list(stat(students[k])) if k in students else [None, None]
        table.append(line)
    write_csv(csv_path, header, table)

    fig, (ax,) = new_figure((7.5, 5.5))
    adaptive_keys = {_adaptive_key(r) for r in rows} - {None}
    adaptive_name = "adaptive"
    if len(adaptive_keys) == 1:
        detail = next(iter(adaptive_keys)).removeprefix("adaptive").strip("() ")
        adaptive_name = f"adaptive {detail.replace('beta', 'β')}".strip()
    series = {"passive": ([], [], [], []), "adaptive": ([], [], [], [])}
    labels = []
    for row in rows:
        t_mean, t_se = stat(row.get("teacher_accuracy"))
        if not math.isfinite(t_mean):
            continue
        students = row.get("students") or {}
        pts = {}
        for role, key in (("passive", "passive"), ("adaptive", _adaptive_key(row))):
            if key is None or key not in students:
                continue
            s_mean, s_se = stat(students[key])
            if not math.isfinite(s_mean):
                continue
            xs, ys, xe, ye = series[role]
            xs.append(pct(t_mean))
            ys.append(pct(s_mean))
            xe.append(pct(t_se))
            ye.append(pct(s_se))
            pts[role] = (pct(t_mean), pct(s_mean))
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
                xerr=err_bars(xe),
                yerr=err_bars(ye),
                fmt=marker,
                color=color,
                ms=7,
                capsize=3,
                elinewidth=1.2,
                label=name,
                zorder=3,
            )
    if not (series["passive"][0] or series["adaptive"][0]):
        empty_note(ax, "no results")
    else:
        ax.legend(loc="best", framealpha=0.9)
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel("teacher accuracy (%)")
    ax.set_ylabel("student accuracy (%)")
    ax.set_title("Teacher utility vs student capability per defense\n(mean ± stderr over seeds)")
    place_labels(fig, ax, labels)
    save(fig, png)
    return [png, csv_path]


def plot_learning_curve(results: Mapping, out_dir) -> list[epath.Path]:
    """Passive student accuracy (%) vs distillation steps under standard decoding (one run, evaluated
    at each step count of ``protocol.distill.curve``), mean ± stderr over seeds, with the table's step
    count marked. Writes ``learning_curve.{png,csv}``; nothing when no row has a learning curve."""
    row = next((r for r in results.get("rows") or [] if r.get("learning_curve")), None)
    if row is None:
        return []
    png, csv_path = figure_paths(out_dir, "learning_curve")
    points = sorted((int(n), *stat(s)) for n, s in row["learning_curve"].items())
    write_csv(csv_path, ["steps", "passive_mean", "passive_stderr"], points)
    fig, (ax,) = new_figure((6.5, 4.5))
    steps, means, ses = zip(*points)
    ax.errorbar(
        steps,
        [pct(m) for m in means],
        yerr=err_bars([pct(s) for s in ses]),
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
    save(fig, png)
    return [png, csv_path]
