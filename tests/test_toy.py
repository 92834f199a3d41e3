"""The closed-form toy game: its float64 reference solution and its JAX functions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from game import solver, toy

SPEC = toy.default_toy_spec()


def test_exact_gamma_star_interior_distinct_and_binding():
    stars = [toy.exact_gamma_star(SPEC, d) for d in toy.TOY_BUDGETS]
    binding, slack = stars[:-1], stars[-1]
    assert all(0.05 < g < SPEC.gamma_max - 0.05 for g in binding)
    assert np.all(np.diff(stars) > 0.05)  # distinct, increasing in δ
    assert slack == SPEC.gamma_max  # budget slack: the teacher goes to γ_max
    for d, g in zip(toy.TOY_BUDGETS[:-1], binding):
        drop = toy.toy_curves(SPEC, g)["utility_drop"][0]
        assert abs(drop - d) < 1e-8  # the utility budget binds exactly at γ*


def test_exact_gamma_star_edge_cases():
    assert toy.exact_gamma_star(SPEC, 0.0) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="delta"):
        toy.exact_gamma_star(SPEC, -0.1)
    # a tighter cap binds before the budget does
    assert toy.exact_gamma_star(SPEC, 0.6, gamma_max=0.3) == 0.3


def test_exact_gamma_star_is_zero_when_defending_helps_the_student():
    # A proxy more confident in the right answer than the teacher: J(p_γ) decreases in γ,
    # so the best defense is none, whatever the budget.
    zt = np.asarray(SPEC.teacher_logits)
    spec = dataclasses.replace(SPEC, proxy_logits=tuple(map(tuple, zt + np.eye(5)[0] * 2.0 - 1.0)))
    curves = toy.toy_curves(spec, np.linspace(0, spec.gamma_max, 101))
    assert np.all(np.diff(curves["J"]) < 0)
    assert toy.exact_gamma_star(spec, 5.0) == pytest.approx(0.0, abs=1e-9)


def test_golden_section_finds_interior_maximum():
    assert toy._golden_max(lambda g: -((g - 0.3141) ** 2), 0.0, 1.0, 1e-10) == pytest.approx(0.3141, abs=1e-9)


def test_toy_assumptions_hold():
    """J(p_γ) increases with γ and the K-step hypergradient at the best response is
    positive on [0, γ_max]: the solver's fixed points are then exactly exact_gamma_star."""
    gs = np.linspace(0.0, SPEC.gamma_max, 41)
    curves = toy.toy_curves(SPEC, gs)
    assert np.all(np.diff(curves["J"]) > 0)
    assert np.all(np.diff(curves["utility_drop"]) > 0)
    game = toy.toy_game(SPEC)
    sb, eb, _ = toy.toy_batches(SPEC)
    zt, zp = jnp.asarray(SPEC.teacher_logits), jnp.asarray(SPEC.proxy_logits)
    for unroll_lr in (0.1, 1.0):
        cfg = solver.SolverConfig(gamma_max=SPEC.gamma_max, unroll_lr=unroll_lr, unroll_from="current")

        def hyper_at_best_response(g, cfg=cfg):
            theta_br = jax.nn.log_softmax((1 - g) * zt + g * zp, axis=-1)
            return solver.capability_hypergradient(game, cfg, theta_br, g, sb, eb)[1]

        dj = jax.jit(jax.vmap(hyper_at_best_response))(jnp.asarray(gs))
        assert np.all(np.asarray(dj) > 0)


def test_toy_functions_match_numpy():
    game = toy.toy_game(SPEC)
    sb, eb, ub = toy.toy_batches(SPEC)
    zt, zp = jnp.asarray(SPEC.teacher_logits), jnp.asarray(SPEC.proxy_logits)
    for g in (0.0, 0.37, 0.8):
        curves = toy.toy_curves(SPEC, g)
        theta_br = jax.nn.log_softmax((1 - g) * zt + g * zp, axis=-1)
        np.testing.assert_allclose(game.utility(g, ub), curves["U"][0], rtol=1e-5)
        np.testing.assert_allclose(game.capability_loss(theta_br, eb), curves["J"][0], rtol=1e-5)
        # q = p_γ is the student's best response: zero gradient, loss = weighted entropy
        grad = jax.grad(game.student_loss)(theta_br, g, sb)
        assert float(jnp.max(jnp.abs(grad))) < 1e-6
        p = jnp.exp(theta_br)
        np.testing.assert_allclose(
            game.student_loss(theta_br, g, sb), jnp.sum(sb * -jnp.sum(p * theta_br, -1)), rtol=1e-5
        )
    # any other student does worse
    other = toy.toy_theta_init(SPEC)
    theta_br = jax.nn.log_softmax((1 - 0.37) * zt + 0.37 * zp, axis=-1)
    assert game.student_loss(other, 0.37, sb) > game.student_loss(theta_br, 0.37, sb)


def test_toy_spec_rejects_mismatched_vocab():
    bad = dataclasses.replace(SPEC, proxy_logits=tuple(row[:4] for row in SPEC.proxy_logits))
    with pytest.raises(ValueError, match="share shape"):
        toy.toy_game(bad)


def test_bilinear_game():
    game = toy.bilinear_game()
    assert game.value(2.0, 3.0) == 6.0
    assert game.grads(2.0, 3.0) == (3.0, 2.0)
    assert game.equilibrium == (0.0, 0.0)
    with pytest.raises(ValueError, match="algorithm"):
        toy.run_bilinear("extragradient")


# --- the toy that fails the myopic solver ----------------------------------------------

TRAP = toy.myopic_trap_spec()


def test_myopic_trap_signs():
    """True dJ(p_γ)/dγ > 0 on [0, γ_max]; the one-step hypergradient at the best response < 0
    there (wrong sign); the 200-step Adam horizon from the uniform base > 0 there."""
    gs = np.linspace(0.0, TRAP.gamma_max, 33)
    curves = toy.toy_curves(TRAP, gs)
    assert np.all(np.diff(curves["J"]) > 0) and np.all(np.diff(curves["utility_drop"]) > 0)
    game = toy.toy_game(TRAP)
    sb, eb, _ = toy.toy_batches(TRAP)
    zt, zp = jnp.asarray(TRAP.teacher_logits), jnp.asarray(TRAP.proxy_logits)
    myopic = solver.SolverConfig(gamma_max=TRAP.gamma_max, unroll_lr=1.0, unroll_steps=1, unroll_from="current")
    horizon = solver.SolverConfig(
        gamma_max=TRAP.gamma_max, unroll_from="base", unroll_optimizer="adam", unroll_lr=0.1, unroll_steps=200
    )

    def one_step_at_best_response(g):
        theta_br = jax.nn.log_softmax((1 - g) * zt + g * zp, axis=-1)
        return solver.capability_hypergradient(game, myopic, theta_br, g, sb, eb)[1]

    def long_horizon(g):
        return solver.capability_hypergradient(game, horizon, toy.toy_theta_init(TRAP), g, sb, eb)[1]

    one = np.asarray(jax.jit(jax.vmap(one_step_at_best_response))(jnp.asarray(gs)))
    far = np.asarray(jax.jit(jax.vmap(long_horizon))(jnp.asarray(gs)))
    assert np.all(one < -0.01), one
    assert np.all(far > 0.5), far
    # the true derivative of the best-response curve, by central differences in float64
    h = 1e-6
    true = (toy.toy_curves(TRAP, gs + h)["J"] - toy.toy_curves(TRAP, gs - h)["J"]) / (2 * h)
    assert np.all(true > 0.5), true


def test_myopic_trap_exact_gamma_star():
    binding, slack = (toy.exact_gamma_star(TRAP, d) for d in toy.MYOPIC_TRAP_BUDGETS)
    assert 0.2 < binding < 0.6 and slack == TRAP.gamma_max
    assert toy.toy_curves(TRAP, binding)["utility_drop"][0] == pytest.approx(toy.MYOPIC_TRAP_BUDGETS[0], abs=1e-8)
