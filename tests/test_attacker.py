"""The attacker's recipes in the protocol (experiments/attacker.py, ablation_report.py): tuned β chosen on the
validation split only, recipes resolved once, ablation summary numbers against hand sums."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiments import ablation_report as AR
from experiments import attacker as A
from experiments.config import ConfigError, DefenseSetting, DistillConfig, load_config
from game import student_losses as SL
from game import students as S


def test_choose_beta_uses_validation_and_prefers_passive_on_ties():
    betas = [0.0, 0.1, 0.3, 1.0]
    val = np.array([[0.50, 0.40, 0.60], [0.55, 0.40, 0.50], [0.55, 0.40, 0.70], [0.20, 0.40, 0.70]])  # [beta, seed]
    np.testing.assert_array_equal(A.choose_beta(val, betas), [1, 0, 2])
    # order of the grid does not matter: ties still go to the smallest |β|
    perm = [3, 2, 1, 0]
    np.testing.assert_array_equal(np.asarray(perm)[A.choose_beta(val[perm], [betas[i] for i in perm])], [1, 0, 2])


class _FakeProtocol:
    """student_record returns canned per-β records: validation favours β=0.3, test favours β=1."""

    def __init__(self, dc):
        self.pc = type("PC", (), {"distill": dc})()
        self.calls = []

    def student_record(self, d, kind, beta, models, traces, heldout):
        self.calls.append((A.kind_label(kind), beta))
        val = {0.0: 0.50, 0.3: 0.62, 1.0: 0.40}.get(beta, 0.3)
        test = {0.0: 0.40, 0.3: 0.45, 1.0: 0.90}.get(beta, 0.3)
        return {"accuracy": [test, test - 0.01], "validation_accuracy": [val, val], "ess_fraction": [1 - beta / 4] * 2}


def test_tuned_student_is_selected_on_validation_only():
    ac = A.AttackerConfig(
        tuned_betas=(0.0, 0.3, 1.0), ablation=("passive_token", "tuned"), ablation_defenses=("standard",)
    )
    dc = DistillConfig(betas=(1.0,), attacker=ac)
    proto = _FakeProtocol(dc)
    out = A.ablation_students(proto, DefenseSetting("standard"), None, None, None)
    assert out["tuned"]["beta"] == [0.3, 0.3]  # the validation winner, although β=1 has the best test accuracy
    assert out["tuned"]["accuracy"] == [0.45, 0.44]
    # β = 0 is the passive student itself (no separate training), the others the configured adaptive recipe
    assert ("passive", 0.0) in proto.calls and ("adaptive", 0.3) in proto.calls and ("adaptive", 1.0) in proto.calls
    summary = AR.ablation_summary([{"label": "standard", "ablation_students": out}])["standard"]
    # paired: (0.45 - 0.40, 0.44 - 0.39) -> +5.0 points, SE 0
    assert summary["tuned_minus_passive"] == pytest.approx(5.0)
    assert summary["tuned_minus_passive_se"] == pytest.approx(0.0, abs=1e-9)


def test_validation_split_of_the_heldout_set_never_touches_test(tmp_path):
    from experiments.protocol import Protocol

    cfg = load_config("ci", [f"run_dir={tmp_path}", "protocol.distill.attacker.ablation_defenses=[standard]"])
    proto = Protocol(cfg, progress=False)
    heldout = proto.task.problems("heldout", cfg.seed)
    n = len(heldout)
    clean = {
        "tokens_bt": np.arange(n)[:, None] * np.ones((1, 5), np.int32),
        "loss_mask_bt": np.ones((n, 5), np.float32),
    }
    held = proto.attacker_heldout(clean)
    val = proto.validation_problems
    n_val = round(cfg.protocol.distill.attacker.validation_fraction * n)
    assert len(val) == n_val and len(held["tokens_bt"]) == n - n_val
    fit_rows = set(held["tokens_bt"][:, 0].tolist())  # which held-out prompts g_S sees
    val_rows = {i for i, p in enumerate(heldout) if any(repr(p) == repr(q) for q in val)}
    assert fit_rows.isdisjoint(val_rows) and len(fit_rows | val_rows) == n
    assert {repr(p) for p in val}.isdisjoint({repr(p) for p in proto.task.problems("test", cfg.seed)})
    # without the tuned row nothing is held back
    proto2 = Protocol(load_config("ci", [f"run_dir={tmp_path}"]), progress=False)
    assert len(proto2.attacker_heldout(clean)["tokens_bt"]) == n and proto2.validation_problems is None


def test_recipes_resolve_once():
    dc = DistillConfig(
        standardize_values=False,
        max_weight=3.0,
        averaging="sequence",
        attacker=A.AttackerConfig(value_refresh=0, weighting="filter", clamp=2.0),
    )
    r = A.recipe_of("adaptive", dc)
    assert (r.refresh_every, r.weighting, r.clamp, r.standardize, r.max_weight, r.averaging) == (
        0,
        "filter",
        2.0,
        False,
        3.0,
        "sequence",
    )
    assert A.recipe_of("passive", dc) == dataclasses.replace(S.PASSIVE_RECIPE, averaging="sequence")
    assert A.recipe_of("soft_topk", dc) is None and A.recipe_of(S.REFERENCE_RECIPE, dc) is S.REFERENCE_RECIPE
    specs = A.ablation_specs(DistillConfig(betas=(0.5,)))
    assert specs["passive_token"] == ("passive", 0.0) and specs["design"] == ("adaptive", 0.5)  # cached students reused
    assert specs["reference"] == (S.REFERENCE_RECIPE, 0.5)
    assert specs["reference_design_sign"][0].sign == 1 and specs["reference_token"][0].averaging == "token"
    assert specs["design_shuffled"][0].shuffle and specs["reference_shuffled"][0].shuffle


@pytest.mark.parametrize(
    "override,key",
    [
        ("protocol.distill.attacker.weighting=soft", "attacker.weighting"),
        ("protocol.distill.attacker.tuned_betas=[0.5,1.0]", "attacker.tuned_betas"),
        ("protocol.distill.attacker.ablation_defenses=[ads]", "attacker.ablation_defenses"),
        ("protocol.distill.attacker.ablation=[bogus]", "attacker.ablation"),
        ("protocol.distill.attacker.validation_fraction=1.5", "attacker.validation_fraction"),
        ("protocol.distill.attacker.value_refresh=-2", "attacker.value_refresh"),
        ("protocol.distill.attacker.fd_dtype=int8", "attacker.fd_dtype"),
    ],
)
def test_attacker_config_errors_name_the_key(override, key):
    base = ["protocol.defenses=[{name: standard}]", "protocol.distill.attacker.ablation_defenses=[standard]"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("ci", base + [override])


def _tiny_student():
    import jax

    from experiments.train import RoleModel
    from models import transformer as tfm

    cfg = tfm.ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32)
    graphdef, params = tfm.split_params(tfm.build(cfg, 30, seed=0))
    return RoleModel(cfg, graphdef, params, None), jax


def test_dataset_level_weights_at_the_base_and_their_shuffled_control():
    """RecipeFeeder: the reference weights are computed once, at the student base, over every
    trace (mean 1 over the valid traces, a degenerate trace gets 0); the shuffled control gives
    each seed the same multiset of weights on permuted traces; later steps reuse them."""
    base, jax = _tiny_student()
    rng = np.random.default_rng(0)
    seeds, n, t = 2, 10, 9
    tokens = rng.integers(1, 30, (seeds, n, t)).astype(np.int32)
    mask = np.ones((seeds, n, t), np.float32)
    mask[..., :3] = 0
    mask[:, 4] = 0  # a dropped (degenerate) trace
    traces = {"tokens_bt": tokens, "loss_mask_bt": mask}
    heldout = {"tokens_bt": tokens[0, :6], "loss_mask_bt": mask[0, :6]}
    dc = DistillConfig(batch_size=4, heldout_batch=4)
    stacked = jax.tree.map(lambda x: np.broadcast_to(x, (seeds,) + x.shape), base.params)
    idx = np.tile(np.arange(n), (seeds, 1))
    ref = A.RecipeFeeder(base, dc, S.REFERENCE_RECIPE, traces, heldout, seeds)
    w = ref.extras(0, stacked, None, idx, 0.5)["weights_b"]
    assert np.all(w[:, 4] == 0)
    np.testing.assert_allclose(np.delete(w, 4, axis=1).mean(1), 1.0, rtol=1e-5)
    # independent assembly for seed 1 (in float32: in bf16 a last-bit change of g can move a loss by
    # one bf16 quantum): g of the whole held-out set, scores at the base, reference weights
    from experiments.train import masked_nll
    from models import transformer as tfm

    ref32 = dataclasses.replace(S.REFERENCE_RECIPE, fd_dtype="float32")
    w32 = A.RecipeFeeder(base, dc, ref32, traces, heldout, seeds).extras(0, stacked, None, idx, 0.5)["weights_b"]
    g = jax.grad(lambda p: masked_nll(base.graphdef, p, heldout["tokens_bt"], heldout["loss_mask_bt"]))(base.params)

    def per_ex(p, tk, m):
        return SL.sequence_nll(tfm.token_logprobs(base.graphdef, p, tk), m[:, :-1])

    a = S.recipe_scores(ref32, per_ex, base.params, g, tokens[1], mask[1])
    want = S.recipe_weights(ref32, a, 0.5, mask[1, :, :-1].sum(-1) > 0)
    np.testing.assert_allclose(w32[1], want, rtol=1e-3, atol=1e-5)
    assert np.ptp(np.delete(w32[1], 4)) > 1e-3  # not trivially all ones
    shuffled = A.RecipeFeeder(base, dc, dataclasses.replace(S.REFERENCE_RECIPE, shuffle=True), traces, heldout, seeds)
    ws = shuffled.extras(0, stacked, None, idx, 0.5)["weights_b"]
    for s in range(seeds):
        np.testing.assert_allclose(np.sort(ws[s]), np.sort(w[s]), rtol=1e-6)
    assert ws[:, 4].tolist() == [0.0, 0.0]
    # values once: a later step (other params) gathers the same weights
    later = jax.tree.map(lambda x: x + 1.0, stacked)
    np.testing.assert_array_equal(ref.extras(7, later, None, idx[:, ::-1], 0.5)["weights_b"], w[:, ::-1])


def test_protocol_ablation_end_to_end(ci_run):
    """`distgame protocol` with the ablation on: results.json and the last-line JSON carry the
    `ablation` object with the Done-when keys, RESULTS.md its section; every row is paired
    against the passive student of the same seeds."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "experiments.cli", *a, "--no-progress"],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )

    r = run(
        "protocol",
        "--config",
        "ci",
        f"run_dir={ci_run}",
        "--json",
        "protocol.defenses=[{name: standard}]",
        "protocol.distill.attacks=[]",
        "protocol.distill.betas=[2.0]",
        "protocol.distill.attacker.ablation_defenses=[standard]",
        "protocol.distill.attacker.tuned_betas=[0.0, 2.0]",
        "protocol.distill.attacker.ablation=[passive_token, design, tuned, reference, reference_shuffled]",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    ab = summary["ablation"]["standard"]
    for key in (
        "tuned_minus_passive",
        "tuned_minus_passive_se",
        "reference_minus_passive",
        "reference_minus_passive_se",
        "ess_fraction",
    ):
        assert key in ab, key
    assert 0 < ab["ess_fraction"] <= 1 and len(ab["tuned_betas_chosen"]) == 2
    results = json.loads(pathlib.Path(summary["results"]).read_text())
    rows = results["ablation"]["standard"]["rows"]
    assert rows["passive_token"]["minus_passive"] == 0.0
    students = results["rows"][0]["ablation_students"]
    for name in ("design", "reference"):
        want = 100 * np.mean(np.subtract(students[name]["accuracy"], students["passive_token"]["accuracy"]))
        assert rows[name]["minus_passive"] == pytest.approx(want)
    assert all(0 < rows[n]["ess_fraction"] <= 1 for n in ("reference", "reference_shuffled"))
    assert (
        students["design"]["accuracy"] == results["rows"][0]["students"]["adaptive(beta=2)"]["values"]
    )  # reused, not retrained
    md = (ci_run / "RESULTS.md").read_text()
    assert "## Attacker ablation" in md and "| reference |" in md
