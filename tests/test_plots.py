"""experiments.plots and experiments.equilibrium_plots: every figure is a real PNG and its CSV holds exactly the input
numbers."""

import csv
import math

import matplotlib.image as mpimg
import numpy as np
import pytest

from experiments.equilibrium_plots import plot_equilibrium
from experiments.plots import plot_protocol

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    assert path.exists() and path.suffix == ".png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 300


def _read_csv(path):
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _f(cell):
    return math.nan if cell == "" else float(cell)


def _check_outputs(paths, stems):
    assert [p.name for p in paths] == [f"{s}.{e}" for s in stems for e in ("png", "csv")]
    for p in paths:
        if p.suffix == ".png":
            _check_png(p)
            assert p.with_suffix(".csv") in paths


def _stat(mean, stderr=None):
    d = {"mean": mean, "values": [mean]}
    if stderr is not None:
        d["stderr"] = stderr
    return d


def _protocol_results():
    return {
        "rows": [
            {
                "label": "standard",
                "defense": "standard",
                "strength": None,
                "teacher_accuracy": _stat(0.97, 0.01),
                "students": {
                    "passive": _stat(0.6, 0.02),
                    "adaptive(beta=2)": _stat(0.62, 0.02),
                    "soft_topk": _stat(0.64, 0.015),
                },
                "adaptive_key": "adaptive(beta=2)",
            },
            {
                "label": "PoE γ=0.5",
                "defense": "poe",
                "strength": 0.5,
                "teacher_accuracy": _stat(0.91, 0.012),
                "students": {
                    "passive": _stat(0.41, 0.03),
                    "adaptive(beta=2)": _stat(0.52, 0.025),
                    "poe_inversion": _stat(0.55, 0.02),
                },
                "adaptive_key": "adaptive(beta=2)",
            },
            {
                "label": "PoE γ=0.75",
                "defense": "poe",
                "strength": 0.75,
                "teacher_accuracy": _stat(0.905, 0.011),
                "students": {"passive": _stat(0.405, 0.02), "adaptive(beta=2)": _stat(0.515, 0.02)},
                "adaptive_key": "adaptive(beta=2)",
            },
            {
                "label": "ADS λ=1",
                "defense": "ads",
                "strength": 1.0,
                "teacher_accuracy": _stat(0.85),  # no stderr
                "students": {"passive": _stat(0.3), "adaptive(beta=2)": _stat(float("nan"))},
                "adaptive_key": "adaptive(beta=2)",
            },
        ]
    }


def test_protocol_png_and_csv(tmp_path):
    results = _protocol_results()
    paths = plot_protocol(results, tmp_path / "out")
    _check_outputs(paths, ["teacher_vs_student"])
    header, rows = _read_csv(paths[1])
    kinds = ["passive", "adaptive(beta=2)", "soft_topk", "poe_inversion"]
    assert header == ["label", "teacher_mean", "teacher_stderr"] + [
        f"{k}_{s}" for k in kinds for s in ("mean", "stderr")
    ]
    assert len(rows) == len(results["rows"])
    for row, src in zip(rows, results["rows"]):
        assert row[0] == src["label"]
        t = src["teacher_accuracy"]
        assert _f(row[1]) == t["mean"]
        assert row[2] == ("" if "stderr" not in t else repr(t["stderr"]))
        for i, k in enumerate(kinds):
            mean, se = row[3 + 2 * i], row[4 + 2 * i]
            if k not in src["students"]:
                assert mean == "" and se == ""
                continue
            s = src["students"][k]
            if math.isnan(s["mean"]):
                assert mean == ""
            else:
                assert _f(mean) == s["mean"]
            assert se == ("" if "stderr" not in s else repr(s["stderr"]))


def test_protocol_degenerate(tmp_path):
    # No rows, a row without adaptive student, a row with NaN teacher accuracy.
    assert len(plot_protocol({"rows": []}, tmp_path / "a")) == 2
    paths = plot_protocol(
        {
            "rows": [
                {"label": "only passive", "teacher_accuracy": {"mean": 0.9}, "students": {"passive": {"mean": 0.5}}},
                {
                    "label": "nan teacher",
                    "teacher_accuracy": {"mean": float("nan"), "stderr": 0.1},
                    "students": {"passive": {"mean": 0.5, "stderr": 0.1}},
                    "adaptive_key": "missing",
                },
            ]
        },
        tmp_path / "b",
    )
    _check_outputs(paths, ["teacher_vs_student"])
    header, rows = _read_csv(paths[1])
    assert header == ["label", "teacher_mean", "teacher_stderr", "passive_mean", "passive_stderr"]
    assert rows[0] == ["only passive", "0.9", "", "0.5", ""]
    assert rows[1] == ["nan teacher", "", "0.1", "0.5", "0.1"]


EQ_STEMS = ["gamma_star", "frontier", "gap", "trajectories"]


def _equilibrium(budgets=(0.02, 0.05, 0.1), betas=(0.0, 2.0, 5.0), stderr=True):
    points, trajs = [], []
    for bi, beta in enumerate(betas):
        for di, delta in enumerate(budgets):
            sa = 0.4 + 0.05 * di + 0.04 * bi
            points.append(
                {
                    "beta": beta,
                    "delta": delta,
                    "gamma_star": 0.2 + 0.1 * di + 0.03 * bi,
                    "converged": not (bi == 1 and di == 0),
                    "iterations": 100 + 10 * di,
                    "teacher_accuracy": {"mean": 0.96 - 0.03 * di - 0.005 * bi, **({"stderr": 0.01} if stderr else {})},
                    "student_accuracy": {"mean": sa, **({"stderr": 0.02 + 0.001 * bi} if stderr else {})},
                    "J": 1.2 + 0.1 * di,
                    "U": -0.3 - 0.01 * di,
                }
            )
            n = 30 + 5 * di
            trajs.append(
                {
                    "beta": beta,
                    "delta": delta,
                    "gamma": [(0.2 + 0.1 * di + 0.03 * bi) * (1 - math.exp(-i / (6 + 3 * bi))) for i in range(n)],
                    "mu": [max(0.0, 1.0 - i / n) * (1 + di) * (1 + 0.25 * bi) for i in range(n - 1)],
                }
            )
    return {"budgets": list(budgets), "betas": list(betas), "points": points, "trajectories": trajs}


def test_equilibrium_pngs_and_csvs(tmp_path):
    eq = _equilibrium()
    paths = plot_equilibrium(eq, tmp_path)
    _check_outputs(paths, EQ_STEMS)
    csvs = {p.stem: _read_csv(p) for p in paths if p.suffix == ".csv"}
    by_key = {(p["beta"], p["delta"]): p for p in eq["points"]}

    header, rows = csvs["gamma_star"]
    assert header == ["beta", "delta", "gamma_star", "converged", "iterations", "J", "U"]
    assert len(rows) == len(eq["points"])
    for r in rows:
        p = by_key[(_f(r[0]), _f(r[1]))]
        assert _f(r[2]) == p["gamma_star"]
        assert r[3] == str(p["converged"])
        assert int(r[4]) == p["iterations"]
        assert (_f(r[5]), _f(r[6])) == (p["J"], p["U"])

    header, rows = csvs["frontier"]
    assert header == ["beta", "delta", "teacher_mean", "teacher_stderr", "student_mean", "student_stderr"]
    assert len(rows) == len(eq["points"])
    for r in rows:
        p = by_key[(_f(r[0]), _f(r[1]))]
        t, s = p["teacher_accuracy"], p["student_accuracy"]
        assert [_f(c) for c in r[2:]] == [t["mean"], t["stderr"], s["mean"], s["stderr"]]

    header, rows = csvs["gap"]
    assert header == [
        "delta",
        "beta",
        "adaptive_mean",
        "adaptive_stderr",
        "passive_mean",
        "passive_stderr",
        "gap_pp",
        "gap_stderr_pp",
    ]
    assert len(rows) == len(eq["budgets"]) * 2  # two adaptive betas
    for r in rows:
        d, b = _f(r[0]), _f(r[1])
        a, p = by_key[(b, d)]["student_accuracy"], by_key[(0.0, d)]["student_accuracy"]
        assert [_f(c) for c in r[2:6]] == [a["mean"], a["stderr"], p["mean"], p["stderr"]]
        assert _f(r[6]) == pytest.approx(100 * (a["mean"] - p["mean"]))
        assert _f(r[7]) == pytest.approx(100 * math.hypot(a["stderr"], p["stderr"]))

    header, rows = csvs["trajectories"]
    assert header == ["beta", "delta", "iteration", "gamma", "mu"]
    assert len(rows) == sum(max(len(t["gamma"]), len(t["mu"])) for t in eq["trajectories"])
    trajs = {(t["beta"], t["delta"]): t for t in eq["trajectories"]}
    for r in rows:
        t, i = trajs[(_f(r[0]), _f(r[1]))], int(r[2])
        assert _f(r[3]) == t["gamma"][i]
        if i < len(t["mu"]):
            assert _f(r[4]) == t["mu"][i]
        else:
            assert r[4] == ""


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(budgets=(0.05,)),  # single budget
        dict(betas=(0.0,)),  # single beta: no adaptive student
        dict(betas=(2.0,)),  # no passive baseline
        dict(stderr=False),  # no error bars
    ],
)
def test_equilibrium_degenerate(tmp_path, kwargs):
    eq = _equilibrium(**kwargs)
    _check_outputs(plot_equilibrium(eq, tmp_path), EQ_STEMS)


def test_equilibrium_nan_and_missing(tmp_path):
    eq = _equilibrium(budgets=(0.02, 0.05))
    eq["points"][0]["gamma_star"] = float("nan")
    eq["points"][1]["student_accuracy"]["mean"] = float("nan")
    eq["points"][2]["teacher_accuracy"] = {"mean": float("nan")}
    eq["trajectories"][0]["gamma"][3] = float("nan")
    paths = plot_equilibrium(eq, tmp_path)
    _check_outputs(paths, EQ_STEMS)
    _, rows = _read_csv(tmp_path / "gamma_star.csv")
    assert rows[0][2] == ""
    # Nothing at all: still four figures, with notes instead of data.
    _check_outputs(plot_equilibrium({}, tmp_path / "empty"), EQ_STEMS)
    _, rows = _read_csv(tmp_path / "empty" / "gap.csv")
    assert rows == []


def test_paired_deltas_cancel_the_seed_spread():
    """Δ vs standard is taken seed by seed: a defense that costs every seed exactly 3 points has
    Δ = -3.0 ± 0.0 although each row's own ± (spread over seeds) is large."""
    from experiments.protocol import add_paired_deltas, results_markdown
    from experiments.stats import mean_stderr

    def row(label, defense, teacher, passive):
        return {
            "label": label,
            "defense": defense,
            "teacher_accuracy": mean_stderr(teacher),
            "students": {"passive": mean_stderr(passive)},
            "relative_gain": None,
            "cost": {"forward_passes_per_token": 1, "flops_ratio": 1.0, "wallclock_ratio": 1.0},
            "mean_trace_length": 30.0,
            "degeneracy_rate": 0.0,
        }

    rows = [
        row("standard", "standard", [0.99, 0.98, 1.0], [0.30, 0.40, 0.50]),
        row("poe γ=0.5", "poe_x", [0.95, 0.93, 0.96], [0.27, 0.37, 0.47]),
    ]
    add_paired_deltas(rows)
    d = rows[1]["paired_delta"]
    assert np.isclose(d["passive"]["mean"], -0.03) and np.isclose(d["passive"]["stderr"], 0.0, atol=1e-12)
    assert np.isclose(d["teacher"]["mean"], -0.01 * (4 + 5 + 4) / 3)
    assert rows[1]["students"]["passive"]["stderr"] > 0.05  # the unpaired spread
    md = results_markdown(
        {"config": "t", "seeds": 3, "n_test": 8, "n_traces": 8, "temperature": 1.0, "rows": rows, "seconds": 1.0}
    )
    assert "Δ passive, paired (pts)" in md and "| -3.0 ± 0.0 |" in md
    single = [row("standard", "standard", [0.99], [0.3])]
    add_paired_deltas(single)  # one seed: nothing to pair
    assert "paired_delta" not in single[0]
