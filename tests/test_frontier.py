"""game/frontier.py against closed forms: the exact feasible bound of a budget, the best feasible grid point."""

import numpy as np
import pytest

from game import frontier


def test_feasible_bound_is_the_closed_form_root_of_the_budget():
    a, u0 = 0.05, -0.25  # U(γ) = U(0) − a γ²: the bound of δ is sqrt(δ / a)
    out = frontier.feasible_bounds(lambda g: u0 - a * np.asarray(g) ** 2, [0.0005, 0.002, 0.008, 1.0], 0.9)
    assert out["utility_ref"] == pytest.approx(u0)
    np.testing.assert_allclose(out["bound"][:3], np.sqrt(np.array([0.0005, 0.002, 0.008]) / a), rtol=1e-9)
    assert out["bound"][3] == 0.9  # a slack budget: the whole range
    assert out["interval"].all()


def test_a_feasible_set_that_is_not_one_interval_ends_at_its_first_gap_and_says_so():
    # U(0) − U(γ) = 0.01 sin²(2πγ): infeasible for δ = 0.005 from γ = 1/8 until 3/8, feasible again around 1/2
    out = frontier.feasible_bounds(lambda g: -0.01 * np.sin(2 * np.pi * np.asarray(g)) ** 2, [0.005], 0.6)
    assert out["bound"][0] == pytest.approx(0.125, abs=1e-9)
    assert not out["interval"][0]


def test_best_feasible_takes_the_bound_of_an_increasing_J_and_the_peak_of_a_humped_one():
    gammas = np.array([0.0, 0.1, 0.2, 0.3, 0.45])
    rising = frontier.best_feasible(gammas, gammas * 2.0, np.full(5, 0.01), [0.25, 0.45])
    assert [b["gamma_star"] for b in rising] == [0.2, 0.45]
    assert rising[0]["margin_se"] == pytest.approx((0.4 - 0.2) / np.hypot(0.01, 0.01))
    humped = frontier.best_feasible(gammas, -((gammas - 0.1) ** 2), np.zeros(5), [0.45])
    assert humped[0]["gamma_star"] == 0.1 and humped[0]["index"] == 1
    only = frontier.best_feasible(gammas, gammas, np.zeros(5), [0.0])
    assert only[0]["gamma_star"] == 0.0 and only[0]["margin_se"] == np.inf


def test_curve_grid_adds_every_bound_rounded_down_so_it_stays_feasible():
    grid = frontier.curve_grid([0.0, 0.3, 0.6], [0.31497, 0.6, 0.729])
    np.testing.assert_allclose(grid, [0.0, 0.3, 0.31, 0.6, 0.72])
