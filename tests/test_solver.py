"""The min-max solver: equilibrium on the closed-form toy, algorithms, signs, failures."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from game import solver, toy

SPEC = toy.default_toy_spec()
GAME = toy.toy_game(SPEC)
BATCHES = toy.toy_batches(SPEC)
SB, EB, UB = BATCHES

# The tuned toy configuration (see the module docstring of game/solver.py).
CFG = solver.SolverConfig(
    unroll_from="current",  # the myopic solver: the student trains, K=1 lookahead
    gamma_max=SPEC.gamma_max,
    student_steps=3,
    student_lr=0.1,
    unroll_lr=1.0,
    teacher_lr=0.2,
    dual_lr=0.5,
    penalty=1.0,
    tol_student_grad=1e-3,
    max_iters=3000,
)


def _init(cfg=CFG, delta=None, theta=None):
    theta = toy.toy_theta_init(SPEC) if theta is None else theta
    return solver.init_state(GAME, cfg, theta, UB, delta=delta)


# --- equilibrium -------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", solver.ALGORITHMS)
@pytest.mark.parametrize("delta", toy.TOY_BUDGETS)
def test_solver_matches_exact_gamma_star(algorithm, delta):
    cfg = dataclasses.replace(CFG, algorithm=algorithm)
    t0 = time.perf_counter()
    result = solver.solve(GAME, cfg, _init(cfg, delta), BATCHES)
    wall = time.perf_counter() - t0
    exact = toy.exact_gamma_star(SPEC, delta)
    d = result.diagnostics
    assert result.converged, (result.iterations, d)
    assert abs(float(d["gamma"]) - exact) < 1e-3, (float(d["gamma"]), exact)
    assert float(d["gamma"]) == pytest.approx(float(solver.state_gamma(result.state, cfg)))
    assert d["violation"] <= cfg.tol_violation
    assert d["mu"] >= 0
    if exact < SPEC.gamma_max:
        assert d["mu"] > 0  # binding budget: positive multiplier
    else:
        assert d["mu"] == 0  # slack budget: complementary slackness
    print(f"{algorithm} δ={delta}: {result.iterations} iterations, {wall:.2f} s, γ={float(d['gamma']):.6f}")


def test_converged_flag_agrees_with_check_converged():
    history = []
    result = solver.solve(GAME, CFG, _init(delta=0.3), BATCHES, callback=lambda i, d, meta: history.append(d))
    assert result.converged and len(history) == result.iterations
    assert solver.check_converged(history, CFG)
    assert not solver.check_converged(history[:-1], CFG)
    assert not solver.check_converged(history[: CFG.patience - 1], CFG)
    assert [int(d["iteration"]) for d in history] == list(range(result.iterations))
    assert set(history[-1]) == set(solver.DIAGNOSTIC_KEYS)


def test_not_converged_reports_false():
    cfg = dataclasses.replace(CFG, max_iters=5)
    result = solver.solve(GAME, cfg, _init(cfg, 0.3), BATCHES)
    assert not result.converged and result.iterations == 5


def test_penalty_and_optimism_matter_on_the_toy():
    """Plain-Lagrangian alternating GDA limit-cycles around the binding budget (J is convex
    in γ here, so nothing damps the γ–μ rotation); the augmented-Lagrangian penalty or
    optimistic updates for the teacher and dual fix it."""
    plain = dataclasses.replace(CFG, penalty=0.0, max_iters=1500)
    r = solver.solve(GAME, plain, _init(plain, 0.3), BATCHES)
    assert not r.converged
    opt = dataclasses.replace(plain, algorithm="optimistic")
    r = solver.solve(GAME, opt, _init(opt, 0.3), BATCHES)
    assert r.converged and abs(float(r.diagnostics["gamma"]) - toy.exact_gamma_star(SPEC, 0.3)) < 1e-3


def test_sigmoid_parameterisation_converges_when_budget_binds():
    cfg = dataclasses.replace(CFG, gamma_param="sigmoid", max_iters=8000)
    r = solver.solve(GAME, cfg, _init(cfg, 0.3), BATCHES)
    assert r.converged
    assert abs(float(r.diagnostics["gamma"]) - toy.exact_gamma_star(SPEC, 0.3)) < 1e-3


# --- vectorised budgets ------------------------------------------------------------


def test_vmap_over_budgets_equals_separate_runs():
    deltas = jnp.asarray(toy.TOY_BUDGETS)
    n = 120
    batched_step = jax.jit(solver.make_step(GAME, CFG, batched=True))
    single_step = jax.jit(solver.make_step(GAME, CFG))
    states = _init(delta=deltas)
    assert states.teacher_param.shape == (len(toy.TOY_BUDGETS),)
    for _ in range(n):
        states, diag_b = batched_step(states, *BATCHES)
    for j, d in enumerate(toy.TOY_BUDGETS):
        st = _init(delta=d)
        for _ in range(n):
            st, diag = single_step(st, *BATCHES)
        for key in ("gamma", "mu", "violation", "J", "student_loss"):
            np.testing.assert_allclose(diag_b[key][j], diag[key], rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(states.theta[j], st.theta, rtol=1e-5, atol=1e-6)


def test_solve_with_batched_budgets():
    result = solver.solve(GAME, CFG, _init(delta=jnp.asarray(toy.TOY_BUDGETS)), BATCHES)
    assert result.converged
    exact = [toy.exact_gamma_star(SPEC, d) for d in toy.TOY_BUDGETS]
    np.testing.assert_allclose(result.diagnostics["gamma"], exact, atol=1e-3)


# --- hypergradient and sign conventions ----------------------------------------------


@pytest.mark.parametrize("unroll_steps", [1, 3])
def test_hypergradient_matches_finite_differences(unroll_steps):
    with jax.enable_x64(True):
        cfg = dataclasses.replace(CFG, unroll_steps=unroll_steps, unroll_lr=0.7)
        theta = jax.random.normal(jax.random.key(0), (4, 5), jnp.float64)
        sb, eb, ub = (jnp.asarray(b, jnp.float64) for b in BATCHES)

        @jax.jit
        def j_of(g):
            tp = solver.unrolled_student(GAME, theta, g, sb, cfg.unroll_steps, cfg.effective_unroll_lr)
            return GAME.capability_loss(tp, eb)

        hyper = jax.jit(lambda g: solver.capability_hypergradient(GAME, cfg, theta, g, sb, eb))
        lagr = jax.jit(
            lambda g, mu, delta, u0: solver.teacher_lagrangian(GAME, cfg, theta, g, mu, delta, u0, sb, eb, ub)[:2]
        )
        h = 1e-5
        for g in (0.1, 0.45, 0.75):
            J, dJ = hyper(jnp.float64(g))
            assert J.dtype == jnp.float64
            fd = (j_of(g + h) - j_of(g - h)) / (2 * h)
            np.testing.assert_allclose(dJ, fd, rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(J, j_of(g), rtol=1e-12)
            # the full (augmented) Lagrangian, in both branches of ψ_ρ
            for mu, delta in ((0.3, 0.05), (0.0, 1.0)):
                u0 = GAME.utility(0.0, ub)
                _, dlag = lagr(g, mu, delta, u0)
                fd = (lagr(g + h, mu, delta, u0)[0] - lagr(g - h, mu, delta, u0)[0]) / (2 * h)
                np.testing.assert_allclose(dlag, fd, rtol=1e-6, atol=1e-9)


def test_teacher_ascent_increases_lagrangian():
    cfg = dataclasses.replace(CFG, algorithm="simultaneous", teacher_lr=0.01, mu_init=0.05, gamma_init=0.2)
    for delta in (0.0, 0.3, 2.0):  # violated, slack, very slack
        st = _init(cfg, delta)
        new, diag = jax.jit(solver.make_step(GAME, cfg))(st, *BATCHES)

        @jax.jit
        def lag(g, st=st):
            return solver.teacher_lagrangian(GAME, cfg, st.theta, g, st.mu, st.delta, st.utility_ref, SB, EB, UB)[0]

        assert diag["teacher_grad"] != 0
        assert lag(diag["gamma"]) > lag(jnp.float32(0.2))
        assert np.sign(diag["gamma"] - 0.2) == np.sign(diag["teacher_grad"])


def test_dual_grows_when_violated_and_stays_nonnegative():
    step = jax.jit(solver.make_step(GAME, CFG))
    # budget violated: γ = 0.5 drops utility by ≈0.53 nats > δ = 0.1
    cfg = dataclasses.replace(CFG, gamma_init=0.5, mu_init=0.0)
    st = _init(cfg, 0.1)
    new, diag = jax.jit(solver.make_step(GAME, cfg))(st, *BATCHES)
    assert diag["violation"] > 0 and diag["dual_grad"] > 0 and new.mu > st.mu
    # budget slack: μ shrinks towards 0 and is clipped there, never negative
    cfg = dataclasses.replace(CFG, gamma_init=0.1, mu_init=0.2, dual_lr=10.0)
    st = _init(cfg, 2.0)
    new, diag = jax.jit(solver.make_step(GAME, cfg))(st, *BATCHES)
    assert diag["violation"] < 0 and new.mu == 0.0
    cfg = dataclasses.replace(CFG, gamma_init=0.1, mu_init=0.0)
    st = _init(cfg, 2.0)
    for _ in range(5):
        st, diag = step(st, *BATCHES)
        assert st.mu >= 0.0


def test_student_descent_lowers_distillation_loss():
    for opt_name in ("adam", "sgd"):
        cfg = dataclasses.replace(CFG, student_optimizer=opt_name, gamma_init=0.4, student_steps=1)
        st = _init(cfg, 0.3)
        new, diag = jax.jit(solver.make_step(GAME, cfg))(st, *BATCHES)
        before = GAME.student_loss(st.theta, 0.4, SB)
        assert diag["student_loss"] == pytest.approx(float(before), rel=1e-5)
        assert GAME.student_loss(new.theta, 0.4, SB) < before
        assert diag["student_grad_norm"] > 0


# --- the bilinear game: why the algorithm matters ------------------------------------


def test_bilinear_simultaneous_diverges_alternating_cycles_optimistic_converges():
    lr, n = 0.2, 500
    sim = toy.run_bilinear("simultaneous", lr=lr, num_steps=n)
    alt = toy.run_bilinear("alternating", lr=lr, num_steps=n)
    ogd = toy.run_bilinear("optimistic", lr=lr, num_steps=n)
    d0 = sim[0]
    assert sim[-1] > 10 * d0 and np.all(np.diff(sim) > 0)  # spirals out
    assert alt.min() > 0.5 * d0 and alt[-1] > 0.5 * d0  # cycles: does not shrink
    assert ogd[-1] < 1e-3  # optimistic GDA converges


# --- failures --------------------------------------------------------------------------


def test_nan_in_student_loss_raises_with_iteration_and_quantity():
    def batches(i, state, meta, previous):
        sb = SB.at[2].set(jnp.nan) if i == 7 else SB
        return sb, EB, UB

    seen = []
    with pytest.raises(solver.SolverDivergedError, match=r"NaN in student_loss at iteration 7") as err:
        solver.solve(GAME, CFG, _init(delta=0.3), batches, callback=lambda i, d, meta: seen.append(i))
    assert err.value.iteration == 7 and err.value.quantity == "student_loss"
    assert seen == list(range(7))


def test_nan_in_capability_loss_is_named():
    def batches(i, state, meta, previous):
        return SB, (EB * jnp.inf if i == 3 else EB), UB

    with pytest.raises(solver.SolverDivergedError, match=r"in J at iteration 3"):
        solver.solve(GAME, CFG, _init(delta=jnp.asarray([0.1, 0.3])), batches)


def test_first_nonfinite_order():
    assert solver.first_nonfinite({"a": 1.0, "b": np.array([1.0, 2.0])}) is None
    assert solver.first_nonfinite({"a": 1.0, "b": np.inf, "c": np.nan}) == "b"
    assert solver.first_nonfinite({"converged": True, "mu": np.array([0.0, np.nan])}) == "mu"


# --- config validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("unroll_steps", 0),
        ("student_steps", 0),
        ("gamma_max", 1.0),
        ("gamma_max", 0.0),
        ("delta", -0.1),
        ("algorithm", "extragradient"),
        ("student_optimizer", "lion"),
        ("penalty", -1.0),
        ("teacher_lr", 0.0),
        ("gamma_init", 0.99),
        ("patience", 0),
        ("lr_decay", -0.1),
    ],
)
def test_validate_names_the_field(field, value):
    cfg = dataclasses.replace(solver.SolverConfig(), **{field: value})
    with pytest.raises(ValueError, match=rf"SolverConfig\.{field}\b"):
        cfg.validate()


def test_every_config_field_is_documented():
    for f in dataclasses.fields(solver.SolverConfig):
        assert f.metadata.get("help"), f.name
    solver.SolverConfig().validate()
    with pytest.raises(ValueError, match="gamma_init"):
        dataclasses.replace(solver.SolverConfig(), gamma_param="sigmoid", gamma_init=0.0).validate()


def test_init_state_rejects_negative_budget():
    with pytest.raises(ValueError, match="delta"):
        _init(delta=jnp.asarray([0.1, -0.2]))


def test_lr_decay_is_robbins_monro_and_keeps_the_equilibrium():
    """Step t of a decayed player moves by lr/(1 + decay·t)·grad (t counted from 0), and the
    decayed solver still reaches the exact γ* on the toy."""
    tx = solver.make_player_optimizer("sgd", 0.5, decay=0.25)
    state = tx.init(jnp.zeros(()))
    for t in range(4):
        update, state = tx.update(jnp.asarray(2.0), state)
        assert float(update) == pytest.approx(-0.5 / (1 + 0.25 * t) * 2.0)
    delta = toy.TOY_BUDGETS[1]
    cfg = dataclasses.replace(CFG, lr_decay=1e-3)
    result = solver.solve(GAME, cfg, _init(cfg, delta), BATCHES)
    assert result.converged
    assert abs(float(result.diagnostics["gamma"]) - toy.exact_gamma_star(SPEC, delta)) < 1e-3


def test_relative_violation_reaches_the_same_gamma_star():
    """Measuring the violation in units of δ rescales μ (μ_rel = δ μ), not the equilibrium γ*:
    with penalty and dual step rescaled by δ² the iterates are the same game's."""
    delta = toy.TOY_BUDGETS[1]
    cfg = dataclasses.replace(
        CFG,
        violation_scale="relative",
        penalty=CFG.penalty * delta**2,
        dual_lr=CFG.dual_lr * delta**2,
        tol_violation=CFG.tol_violation / delta,
    )
    result = solver.solve(GAME, cfg, _init(cfg, delta), BATCHES)
    assert result.converged
    assert abs(float(result.diagnostics["gamma"]) - toy.exact_gamma_star(SPEC, delta)) < 1e-3
    absolute = solver.solve(GAME, CFG, _init(CFG, delta), BATCHES)
    assert float(result.diagnostics["mu"]) == pytest.approx(delta * float(absolute.diagnostics["mu"]), rel=1e-2)


def test_vmapped_hypergradient_with_batched_student_batches_matches_finite_differences():
    """Budgets vmapped with a different student batch each (as the equilibrium sweep does):
    dJ(θ⁺(γ))/dγ must still match central differences, for K = 1 and 2."""
    import jax
    import jax.numpy as jnp

    w = jax.random.normal(jax.random.key(0), (6, 4))
    game = solver.Game(
        student_loss=lambda th, g, b: jnp.mean((jnp.tanh(b @ th) - g * jnp.sin(b @ w).sum(-1, keepdims=True)) ** 2),
        capability_loss=lambda th, b: jnp.mean(jnp.cos(b @ th) ** 2),
        utility=lambda g, b: -(g**2),
    )
    theta = jax.random.normal(jax.random.key(1), (6, 3))
    batches = jax.random.normal(jax.random.key(2), (3, 5, 6))
    eval_b = jax.random.normal(jax.random.key(3), (7, 6))
    gammas = jnp.array([0.2, 0.4, 0.6])
    for k in (1, 2):
        cfg = dataclasses.replace(CFG, unroll_steps=k, unroll_lr=0.5)

        def f(g, b):
            return solver.capability_hypergradient(game, cfg, theta, g, b, eval_b)[1]

        jvp = jax.jit(jax.vmap(f))(gammas, batches)

        def J(g, b):
            return game.capability_loss(solver.unrolled_student(game, theta, g, b, k, 0.5), eval_b)

        h = 1e-3
        fd = jax.vmap(lambda g, b: (J(g + h, b) - J(g - h, b)) / (2 * h))(gammas, batches)
        np.testing.assert_allclose(np.asarray(jvp), np.asarray(fd), rtol=2e-2, atol=1e-4)


def test_vmapped_hypergradient_through_a_transformer_student_matches_finite_differences():
    """The equilibrium sweep's case: a transformer student, PoE soft targets, budgets vmapped
    with their own prefixes."""
    import jax
    import jax.numpy as jnp

    from models import transformer as tfm

    cfg_m = tfm.ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
    gd, theta = tfm.split_params(tfm.build(cfg_m, 11, 0))
    keys = jax.random.split(jax.random.key(4), 4)
    tokens = jax.random.randint(keys[0], (3, 4, 6), 0, 11)
    z_t = jax.random.normal(keys[1], (3, 4, 5, 11)) * 3
    z_p = jax.random.normal(keys[2], (3, 4, 5, 11))
    eval_tokens = jax.random.randint(keys[3], (4, 6), 0, 11)

    def student_loss(th, g, b):
        logq = jax.nn.log_softmax(tfm.forward(gd, th, b["tokens"][:, :-1])[0], -1)
        logp = jax.nn.log_softmax((1 - g) * b["z_t"] + g * b["z_p"], -1)
        return -jnp.mean(jnp.sum(jnp.exp(logp) * logq, -1))

    def capability(th, toks):
        return -jnp.mean(tfm.token_logprobs(gd, th, toks))

    game = solver.Game(student_loss, capability, lambda g, b: -(g**2))
    batches = {"tokens": tokens, "z_t": z_t, "z_p": z_p}
    gammas = jnp.array([0.2, 0.5, 0.8])
    cfg = dataclasses.replace(CFG, unroll_steps=1, unroll_lr=1.0)
    jvp = jax.jit(jax.vmap(lambda g, b: solver.capability_hypergradient(game, cfg, theta, g, b, eval_tokens)[1]))(
        gammas, batches
    )

    def J(g, b):
        return capability(solver.unrolled_student(game, theta, g, b, 1, 1.0), eval_tokens)

    fd = jax.vmap(lambda g, b: (J(g + 1e-2, b) - J(g - 1e-2, b)) / 2e-2)(gammas, batches)
    np.testing.assert_allclose(np.asarray(jvp), np.asarray(fd), rtol=5e-2, atol=1e-4)


# --- long horizon: the toy that fails the myopic solver ---------------------------------

TRAP = toy.myopic_trap_spec()
TRAP_GAME = toy.toy_game(TRAP)
TRAP_BATCHES = toy.toy_batches(TRAP)
TRAP_HORIZON = dataclasses.replace(
    CFG,
    gamma_max=TRAP.gamma_max,
    unroll_from="base",
    unroll_optimizer="adam",
    unroll_lr=0.1,
    unroll_steps=200,
    teacher_lr=0.1,
    max_iters=800,
)


def test_long_horizon_solver_reaches_gamma_star_where_one_step_fails():
    """Stackelberg horizon (200 Adam steps from the base) reaches the exact γ* (binding and
    slack budgets) within 1e-3 from every start; the K=1 myopic solver stays near γ=0."""
    deltas = np.asarray(toy.MYOPIC_TRAP_BUDGETS)
    exact = np.asarray([toy.exact_gamma_star(TRAP, d) for d in deltas])
    delta, gamma0 = solver.multi_start(TRAP_HORIZON, deltas)
    theta0 = toy.toy_theta_init(TRAP)
    state = solver.init_state(TRAP_GAME, TRAP_HORIZON, theta0, TRAP_BATCHES[2], delta=delta, gamma_init=gamma0)
    result = solver.solve(TRAP_GAME, TRAP_HORIZON, state, TRAP_BATCHES)
    assert result.converged, result.iterations
    best = solver.best_of_starts(result.diagnostics, 3, TRAP_HORIZON)
    np.testing.assert_allclose(best["gamma"], exact, atol=1e-3)
    np.testing.assert_allclose(best["gamma_by_start"], np.repeat(exact[:, None], 3, 1), atol=1e-3)
    assert best["starts_agree"].all()
    # the base is never trained: the horizon starts from it every iteration
    np.testing.assert_array_equal(np.asarray(result.state.theta), np.broadcast_to(theta0, (6,) + theta0.shape))

    myopic = dataclasses.replace(CFG, gamma_max=TRAP.gamma_max, gamma_init=0.0, max_iters=400)
    state = solver.init_state(TRAP_GAME, myopic, theta0, TRAP_BATCHES[2], delta=jnp.asarray(deltas))
    r = solver.solve(TRAP_GAME, myopic, state, TRAP_BATCHES)
    assert np.all(r.diagnostics["gamma"] < 0.05), r.diagnostics["gamma"]
    assert np.all(np.abs(r.diagnostics["gamma"] - exact) > 0.2)


def test_best_of_starts_prefers_feasible_highest_J():
    diag = {
        "gamma": np.array([0.0, 0.4, 0.8, 0.1, 0.1, 0.1]),
        "J": np.array([1.0, 2.0, 3.0, 1.0, 1.0, 1.0]),
        "violation": np.array([-0.1, 0.0, 0.5, 0.0, 0.0, 0.0]),
        "converged": np.ones(6, bool),
    }
    best = solver.best_of_starts(diag, 3, CFG)
    assert best["best_start"].tolist() == [1, 0] and best["gamma"].tolist() == [0.4, 0.1]
    assert best["starts_agree"].tolist() == [False, True]
    np.testing.assert_allclose(best["gamma_spread"], [0.8, 0.0])


def test_long_horizon_hypergradient_matches_finite_differences():
    """dJ(θ_T(γ))/dγ through a 60-step Adam horizon (forward mode over lax.scan) vs central
    differences, float64, within 1e-3 relative (measured: ~1e-8)."""
    with jax.enable_x64(True):
        cfg = dataclasses.replace(TRAP_HORIZON, unroll_steps=60)
        theta0 = jax.random.normal(jax.random.key(0), (2, 3), jnp.float64)
        sb, eb, _ = (jnp.asarray(b, jnp.float64) for b in TRAP_BATCHES)
        J = jax.jit(lambda g: TRAP_GAME.capability_loss(solver.student_response(TRAP_GAME, cfg, theta0, g, sb), eb))
        hyper = jax.jit(lambda g: solver.capability_hypergradient(TRAP_GAME, cfg, theta0, g, sb, eb))
        h = 1e-6
        for g in (0.0 + h, 0.3, 0.7):
            value, dJ = hyper(jnp.float64(g))
            fd = (J(g + h) - J(g - h)) / (2 * h)
            assert abs(float(dJ) - float(fd)) <= 1e-3 * abs(float(fd)), (g, dJ, fd)
            assert float(value) == pytest.approx(float(J(g)), rel=1e-12)


def test_vmapped_scan_hypergradient_is_right_on_this_jax():
    """The jax problem noted in earlier versions of `unrolled_student` (forward mode of a
    lax.scan over jax.grad under vmap, budgets with their own batches, off by ~1e24 on jax
    0.10.2) does not reproduce: the scan unroll agrees with a Python loop for a plain and an
    adaptive (nested-jvp, stop-gradient weights) student loss, and with finite differences
    for the plain one."""
    from game import example_values as ev
    from game import example_weights as ew

    w = jax.random.normal(jax.random.key(0), (6, 4))

    def plain(th, g, b):
        return jnp.mean((jnp.tanh(b @ th) - g * jnp.sin(b @ w).sum(-1, keepdims=True)) ** 2)

    def adaptive(th, g, b):
        def per(t, gg):
            return jnp.mean((jnp.tanh(b @ t) - gg * jnp.sin(b @ w).sum(-1, keepdims=True)) ** 2, -1)

        v = ev.example_values(lambda t: per(t, jax.lax.stop_gradient(g)), th, jax.grad(lambda t: jnp.sum(t**2))(th))
        return jnp.mean(jax.lax.stop_gradient(ew.adaptive_weights(v, 2.0)) * per(th, g))

    theta = jax.random.normal(jax.random.key(1), (6, 3))
    batches = jax.random.normal(jax.random.key(2), (3, 5, 6))
    eval_b = jax.random.normal(jax.random.key(3), (7, 6))
    gammas = jnp.array([0.2, 0.4, 0.6])
    for loss in (plain, adaptive):
        game = solver.Game(loss, lambda th, b: jnp.mean(jnp.cos(b @ th) ** 2), lambda g, b: -(g**2))

        def loop(g, b, k=3):
            th = theta
            for _ in range(k):
                th = th - 0.5 * jax.grad(loss)(th, g, b)
            return game.capability_loss(th, eval_b)

        cfg = dataclasses.replace(CFG, unroll_steps=3, unroll_lr=0.5)
        scan = jax.jit(jax.vmap(lambda g, b: solver.capability_hypergradient(game, cfg, theta, g, b, eval_b)[1]))(
            gammas, batches
        )
        ref = jax.jit(jax.vmap(lambda g, b: jax.jvp(lambda x: loop(x, b), (g,), (1.0,))[1]))(gammas, batches)
        fd = jax.vmap(lambda g, b: (loop(g + 1e-3, b) - loop(g - 1e-3, b)) / 2e-3)(gammas, batches)
        np.testing.assert_allclose(np.asarray(scan), np.asarray(ref), rtol=1e-4, atol=1e-6)
        if loss is plain:  # the adaptive weights are stop-gradient by design: differences see them move
            np.testing.assert_allclose(np.asarray(scan), np.asarray(fd), rtol=2e-2, atol=1e-4)
