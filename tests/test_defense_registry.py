"""The defense registry (game/registry.py): each built-in's declaration, a throw-away defense registered here and
run through the ci protocol, and the equilibrium sweep's game for every defense with a differentiable strength."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import defense_wiring as wiring
from experiments.config import ConfigError, DefenseSetting, load_config
from game import defenses as dfn
from game import registry
from game import solver as sv

# ---------------------------------------------------------------------------
# A throw-away defense, declared the way a new one is: a temperature-sharpened teacher,
# logits = (1 + s) z_T / τ, s in [0, 4]; differentiable, and s = 0 is standard decoding.
# ---------------------------------------------------------------------------

SHARPEN = registry.Defense(
    "sharpen",
    ("teacher",),
    lambda outs, s, tau: dfn.standard_logits(outs[0], tau) * (1.0 + registry.aligned(s, outs[0])),
    strength=registry.Param(registry.Range(0.0, 4.0, high_open=False, what="a sharpening"), "s"),
    differentiable=True,
)


@pytest.fixture
def sharpen():
    registry.register(SHARPEN)
    yield SHARPEN
    registry.unregister(SHARPEN.name)


def test_builtins_keep_their_labels_keys_and_cost_table():
    settings = [
        DefenseSetting("standard"),
        DefenseSetting("poe", 0.5),
        DefenseSetting("ads", 0.5),
        DefenseSetting("ads_fd", 0.5, eps=0.01),
        DefenseSetting("strategic_poe", 0.3, eta=0.1, max_strength=0.8),
        DefenseSetting("strategic_ads", 2.0, eta=-1.0, max_strength=4.0),
    ]
    assert [d.label for d in settings] == [
        "standard",
        "poe γ=0.5",
        "ads λ=0.5",
        "ads_fd λ=0.5",
        "strategic_poe γ=0.3, η=0.1",
        "strategic_ads λ=2, η=-1",
    ]
    assert [d.key for d in settings] == [
        "standard",
        "poe_g0.5",
        "ads_l0.5",
        "ads_fd_l0.5",
        "strategic_poe_g0.3_eta0.1",
        "strategic_ads_l2_eta-1",
    ]
    f_t, f_p = 1000.0, 7.0  # (forward passes, FLOPs) per token: a JVP is 3 proxy passes
    table = {d.name: registry.get(d.name).forward_cost({"teacher": f_t, "proxy": f_p}) for d in settings}
    assert table == {
        "standard": (1, f_t),
        "poe": (2, f_t + f_p),
        "strategic_poe": (2, f_t + f_p),
        "ads": (2, f_t + 3 * f_p),
        "strategic_ads": (2, f_t + 3 * f_p),
        "ads_fd": (3, f_t + 2 * f_p),
    }
    assert set(registry.differentiable_names()) >= {"poe", "ads"}
    assert [n for n in registry.names() if registry.get(n).invertible] == ["poe"]


@pytest.mark.parametrize(
    "setting, message",
    [
        (DefenseSetting("poe", 1.0), "d.strength=1.0 must be a PoE gamma in [0, 1)"),
        (DefenseSetting("ads", -0.1), "d.strength=-0.1 must be an ADS lambda >= 0"),
        (DefenseSetting("ads", math.inf), "d.strength=inf must be an ADS lambda >= 0"),
        (DefenseSetting("strategic_poe", 0.3, max_strength=1.0), "d.max_strength=1.0 must be in (0, 1)"),
        (DefenseSetting("strategic_ads", 0.3, eta=math.nan), "d.eta=nan must be finite"),
        (DefenseSetting("ads_fd", 0.3, eps=0.0), "d.eps=0.0 must be > 0"),
        (DefenseSetting("rot13"), "d.name='rot13' is not a defense; choose one of standard, poe"),
    ],
)
def test_settings_are_checked_against_the_declared_ranges(setting, message):
    with pytest.raises(ConfigError) as e:
        setting.validate("d")
    assert message in str(e.value)


@pytest.mark.parametrize("name", registry.differentiable_names())
def test_a_differentiable_defense_is_standard_decoding_at_strength_zero(name):
    """The equilibrium's utility budget is measured from strength 0 = the undefended teacher."""
    defense = registry.get(name)
    k = jax.random.split(jax.random.key(0), 3)
    z_T, z_P, dz_P = (jax.random.normal(k_, (2, 3, 11)) for k_ in k)
    by_kind = {"teacher": z_T, "proxy": z_P, "proxy_tangent": (z_P, dz_P)}
    outs = tuple(by_kind[e] for e in defense.experts)
    np.testing.assert_array_equal(defense.logits(outs, 0.0, 0.7), dfn.standard_logits(z_T, 0.7))
    slope = jax.grad(lambda s: defense.logprobs(outs, s, 1.0)[0, 0, 0])(0.2)
    assert np.isfinite(slope) and slope != 0


def test_the_combiner_built_from_logits_matches_the_declared_function(sharpen):
    z = jax.random.normal(jax.random.key(1), (4, 9))
    comb = sharpen.make_combiner(DefenseSetting("sharpen", 1.5), 0.5)
    np.testing.assert_array_equal(comb.logits((z,), comb.init(4)), sharpen.logits((z,), 1.5, 0.5))
    per_row = sharpen.per_row_combiner(0.5)
    s_b = jnp.array([0.0, 1.0, 2.0, 1.5])
    np.testing.assert_allclose(per_row.logits((z,), s_b)[3], comb.logits((z,), ())[3], rtol=1e-6)
    assert hash(comb) == hash(sharpen.make_combiner(DefenseSetting("sharpen", 1.5), 0.5))  # static for jit


def test_config_accepts_a_registered_defense_and_rejects_its_out_of_range_strength(sharpen, tmp_path):
    base = [f"run_dir={tmp_path}"]
    cfg = load_config("ci", base + ["protocol.defenses=[{name: standard}, {name: sharpen, strength: 4.0}]"])
    assert [d.label for d in cfg.protocol.defenses] == ["standard", "sharpen s=4"]
    with pytest.raises(ConfigError, match=r"protocol\.defenses\[1\]\.strength=4\.5 must be a sharpening in \[0, 4\]"):
        load_config("ci", base + ["protocol.defenses=[{name: standard}, {name: sharpen, strength: 4.5}]"])
    cfg = load_config("ci", base + ["equilibrium.defense=sharpen", "equilibrium.solver.gamma_max=3.0"])
    assert cfg.equilibrium.defense == "sharpen"


def test_equilibrium_config_reads_the_registry(tmp_path):
    base = [f"run_dir={tmp_path}"]
    assert load_config("ci", base).equilibrium.defense == "poe"
    load_config("ci", base + ["equilibrium.defense=ads", "equilibrium.solver.gamma_max=2.0"])  # λ is not capped at 1
    with pytest.raises(ConfigError, match=r"equilibrium\.solver\.gamma_max=2\.0 must lie in \(0, 1\)"):
        load_config("ci", base + ["equilibrium.solver.gamma_max=2.0"])
    with pytest.raises(ConfigError, match=r"equilibrium\.defense='strategic_poe' must be a defense with a diff"):
        load_config("ci", base + ["equilibrium.defense=strategic_poe"])
    with pytest.raises(ConfigError, match=r"equilibrium\.calibration_gammas=\[0\.0, 1\.5\] must be .* in \[0, 1\)"):
        load_config("ci", base + ["equilibrium.calibration_gammas=[0.0, 1.5]"])


def test_a_throwaway_defense_runs_through_the_ci_protocol(tmp_path):
    """`distgame protocol` in a process that registered SHARPEN first, as a user's own module would (one
    device: the defense's plumbing is the point here, not sharding)."""
    overrides = [
        f"run_dir={tmp_path}",
        "protocol.defenses=[{name: standard}, {name: sharpen, strength: 1.0}]",
        "protocol.distill.attack_defenses=[sharpen]",
        "protocol.distill.attacks=[soft_topk]",
        "protocol.distill.curve=[]",  # cheaper than the ci protocol, still every stage a defense touches
        "protocol.distill.betas=[]",
        "sample.max_new_tokens=16",
    ]
    register_and_run = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_defense_registry as t; from game import registry; "
        "registry.register(t.SHARPEN); from experiments.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", register_and_run, str(pathlib.Path(__file__).parent)]
        + ["protocol", "--config", "ci", *overrides, "--no-progress"],
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["label"]: r for r in results["rows"]}
    assert list(rows) == ["standard", "sharpen s=1"]
    row = rows["sharpen s=1"]
    assert row["defense"] == "sharpen" and row["strength"] == 1.0
    assert {"passive", "soft_topk"} == set(row["students"])
    assert set(rows["standard"]["students"]) == {"passive"}
    numbers = [row["teacher_accuracy"]["mean"], row["mean_trace_length"], row["degeneracy_rate"]]
    numbers += [s["mean"] for s in row["students"].values()] + list(row["paired_delta"]["passive"].values())[:2]
    numbers += [row["cost"][k] for k in ("forward_passes_per_token", "flops_ratio", "wallclock_ratio")]
    assert all(np.isfinite(x) for x in numbers), numbers
    assert row["cost"]["forward_passes_per_token"] == 1 and row["cost"]["flops_ratio"] == 1.0
    assert "| sharpen s=1 |" in (tmp_path / "RESULTS.md").read_text()


# ---------------------------------------------------------------------------
# The equilibrium sweep's game, for every defense whose strength is differentiable (tiny untrained models)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    from experiments.equilibrium import EquilibriumSweep
    from experiments.train import init_role_model

    run_dir = tmp_path_factory.mktemp("eq")
    cfg = load_config(
        "ci",
        [f"run_dir={run_dir}", "sample.max_new_tokens=6", "equilibrium.prefixes=4", "protocol.distill.steps=2"],
    )
    sweep = EquilibriumSweep(cfg, progress=False)
    vocab = sweep.tokenizer.vocab_size
    models = {
        r: init_role_model(cfg.role(r), vocab, sweep.protocol.mesh, cfg.rules, i)
        for i, r in enumerate(("teacher", "proxy", "student"))
    }
    problems = sweep.protocol.task.problems("heldout", cfg.seed, 8)
    clean = sweep.protocol._train_arrays(
        problems,
        sweep.protocol._decode(problems, wiring.defense_setup(DefenseSetting(), models, None, 1.0), jax.random.key(0)),
    )
    return cfg, models, clean


@pytest.mark.parametrize("name", registry.differentiable_names())
def test_the_equilibrium_game_builds_for_each_differentiable_defense(tiny_sweep, name):
    from experiments.equilibrium import EquilibriumSweep, setting_for
    from experiments.game_wiring import make_game, solver_setup

    cfg, models, clean = tiny_sweep
    cfg = dataclasses.replace(cfg, equilibrium=dataclasses.replace(cfg.equilibrium, defense=name))
    sweep = EquilibriumSweep(cfg, progress=False)
    sweep.set_models(models, clean)
    assert (sweep.g_P is not None) == wiring.needs_proxy_gradient(name)
    heldout = {k: clean[k] for k in ("tokens_bt", "loss_mask_bt")}
    util = sweep.reference("heldout", 4, models)
    evals = {k: v for k, v in sweep.reference("test", 4, models).items() if k in ("tokens_bt", "loss_mask_bt")}
    scfg, optimizers = solver_setup(cfg)
    pool = sweep.prefixes(models, np.array([0.3], np.float32), 0, heldout, scfg.unroll_steps)
    game = make_game(models["student"], 0.0, cfg.protocol.distill, 1.0, defense=name)
    state = sv.init_state(game, scfg, models["student"].params, util, delta=jnp.asarray([0.1]), optimizers=optimizers)
    step = jax.jit(sv.make_step(game, scfg, batched=True, optimizers=optimizers, per_state_student_batch=True))
    state, diag = step(state, pool, evals, util)
    assert all(np.isfinite(np.asarray(v)).all() for v in diag.values()), diag
    assert float(jnp.abs(diag["teacher_grad"]).max()) > 0  # the strength moves the student's outcome or U
    assert setting_for(0.3, name) == DefenseSetting(name, 0.3) and setting_for(0.001, name).name == "standard"
