"""Calibration metrics (experiments/calibrate.py) and the equilibrium's summary numbers."""

import math

import numpy as np
import pytest

from experiments.calibrate import rank, sign_agreement, spearman
from experiments.calibration_plot import CSV_HEADER, plot_calibration
from experiments.equilibrium_report import summary_metrics


def test_spearman_against_hand_ranks():
    assert spearman([1, 2, 3, 4, 5], [10, 20, 30, 40, 50]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    np.testing.assert_allclose(rank([3.0, 1.0, 3.0, 2.0]), [2.5, 0.0, 2.5, 1.0])
    # one swapped pair out of 5: 1 − 6·Σd²/(n(n²−1)) = 1 − 6·2/120 = 0.9
    assert spearman([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]) == pytest.approx(0.9)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_sign_agreement_counts_only_significant_pairs():
    pred = np.array([1.0, 2.0, 3.0, 2.5])
    # seeds x grid: pair 0 rises clearly (agrees), pair 1 is noise, pair 2 rises clearly (disagrees: predicted fall)
    measured = np.array([[0.0, 1.0, 1.1, 2.0], [0.1, 1.1, 0.9, 2.1], [0.0, 1.0, 1.2, 2.2]])
    share, pairs = sign_agreement(pred, measured)
    assert [p["significant"] for p in pairs] == [True, False, True]
    assert [p["agree"] for p in pairs] == [True, True, False]
    assert share == pytest.approx(0.5)
    share, _ = sign_agreement(pred, np.zeros((3, 4)))
    assert math.isnan(share)


def test_calibration_plot_writes_png_and_csv(tmp_path):
    def stat(m, s):
        return {"mean": m, "stderr": s}

    result = {
        "config": "t",
        "spearman": 0.9,
        "sign_agreement": float("nan"),
        "points": [
            {
                "gamma": g,
                "J": stat(1 + g, 0.01),
                "dJ": stat(1.0, 0.1),
                "nll": stat(2 + g, float("nan")),
                "accuracy": stat(0.5 - g, 0.02),
            }
            for g in (0.0, 0.3, 0.6)
        ],
    }
    png, csv_path = plot_calibration(result, tmp_path)
    assert png.stat().st_size > 1000
    rows = csv_path.read_text().splitlines()
    assert rows[0].split(",") == list(CSV_HEADER) and len(rows) == 4
    assert rows[2].split(",")[:3] == ["0.3", "1.3", "0.01"] and rows[1].split(",")[6] == ""


def test_equilibrium_summary_metrics():
    def pts(beta, gs):
        return [
            {"beta": beta, "delta": d, "gamma_star": g, "starts_agree": True} for d, g in zip((0.01, 0.03, 0.1), gs)
        ]

    eq = {
        "betas": [0.0, 4.0],
        "gamma_max": 0.9,
        "points": pts(0.0, [0.0, 0.2, 0.5]) + pts(4.0, [0.005, 0.3, 0.895]),
        "utility_ref": -0.25,
        "check": {
            "delta": 0.1,
            "utility": -0.3,
            "passive_change": {"mean": -0.04, "stderr": 0.01},
            "teacher_change": {"mean": -0.01, "stderr": 0.0},
        },
    }
    out = summary_metrics(eq)
    assert out["interior_budgets_passive"] == 2 and out["interior_budgets_adaptive"] == 1
    assert out["monotone_passive"] == 1 and out["starts_agree"] == 1
    assert out["check_delta_passive"] == -0.04 and out["check_delta_passive_se"] == 0.01
    assert out["check_utility_loss"] == pytest.approx(0.05) and out["check_within_budget"] == 1
    eq["check"]["utility"] = -0.36  # U(0) − U(γ*) = 0.11 > δ = 0.1
    assert summary_metrics(eq)["check_within_budget"] == 0
    eq["points"][1]["gamma_star"] = 0.6  # 0, 0.6, 0.5: not monotone
    assert summary_metrics(eq)["monotone_passive"] == 0
    eq["points"][1]["gamma_star"] = float("nan")  # no equilibrium found at that budget: neither interior nor monotone
    out = summary_metrics(eq)
    assert out["interior_budgets_passive"] == 1 and out["monotone_passive"] == 0
