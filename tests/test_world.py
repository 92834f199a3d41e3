"""Measures of the default world: teacher entropy, the learnability control's trace pool, the
learning curve's exactness, and the headline's choice of the informative setting."""

import dataclasses
import functools
import math

import jax
import numpy as np
import pytest

from experiments.config import DistillConfig
from experiments.distillation import distil
from experiments.protocol import headline, mask_traces, token_entropy_stats
from experiments.train import init_role_model
from models.transformer import ModelConfig


def test_token_entropy_stats_against_hand_computed_values():
    # Position 0: uniform over 4 tokens (entropy log 4, top 0.25). Position 1: probabilities (0.95, 0.05, 0, 0)
    # up to float precision. Position 2: masked out (would change both figures).
    p1 = np.array([0.95, 0.05, 1e-30, 1e-30])
    logits = np.stack([np.zeros(4), np.log(p1), np.array([50.0, 0, 0, 0])])[None]
    mask = np.array([[1.0, 1.0, 0.0]])
    stats = token_entropy_stats(logits, mask)
    h1 = -(0.95 * math.log(0.95) + 0.05 * math.log(0.05))
    assert stats["entropy_nats"] == pytest.approx((math.log(4) + h1) / 2, rel=1e-5)
    assert stats["share_top_below_0.9"] == pytest.approx(0.5)
    assert stats["positions"] == 2
    # Temperature is not applied: scaling the logits changes the entropy.
    assert token_entropy_stats(2 * logits, mask)["entropy_nats"] < stats["entropy_nats"]


def test_correct_only_student_ignores_the_wrong_traces():
    """The control's student is a function of the correct traces alone: rewriting every wrong trace leaves it
    bitwise unchanged, and it differs from the passive student, which learns from the wrong ones too."""
    model, traces, heldout = _tiny_world()
    right_sb = np.zeros(traces["tokens_bt"].shape[:2], bool)
    right_sb[:, ::2] = True
    dc = DistillConfig(steps=4, batch_size=4, warmup_steps=1, lr=1e-2, betas=(), attacks=())
    student = distil(model, mask_traces(traces, right_sb), heldout, dc, "passive", 0.0, 2, progress=False)
    rewritten = {**traces, "tokens_bt": np.where(right_sb[..., None], traces["tokens_bt"], 3)}
    again = distil(model, mask_traces(rewritten, right_sb), heldout, dc, "passive", 0.0, 2, progress=False)
    passive = distil(model, traces, heldout, dc, "passive", 0.0, 2, progress=False)
    for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(passive))
    )


def _tiny_world():
    from jax.sharding import Mesh

    from models.sharding import DEFAULT_RULES

    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    model = init_role_model(dataclasses.replace(_role(), model=cfg), 20, mesh, DEFAULT_RULES, 0)
    rng = np.random.default_rng(0)
    traces = {
        "tokens_bt": rng.integers(3, 20, (2, 16, 12)).astype(np.int32),
        "loss_mask_bt": np.ones((2, 16, 12), np.float32),
        "topk_ids_btk": np.zeros((2, 16, 12, 1), np.int32),
        "topk_logprob_btk": np.zeros((2, 16, 12, 1), np.float32),
    }
    heldout = {"tokens_bt": traces["tokens_bt"][0], "loss_mask_bt": traces["loss_mask_bt"][0]}
    return model, traces, heldout


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_learning_curve_prefix_is_exactly_a_shorter_run(ema):
    """With the constant schedule, the snapshot after N steps of a 2N-step run is the N-step student (also when
    students are evaluated at their iterate average, which is causal)."""
    import jax.numpy as jnp

    model, traces, heldout = _tiny_world()
    dc = DistillConfig(
        steps=6, batch_size=4, warmup_steps=2, lr=1e-2, schedule="constant", betas=(), attacks=(), ema=ema
    )
    short = distil(model, traces, heldout, dc, "passive", 0.0, 2, progress=False)
    snaps = distil(model, traces, heldout, dc, "passive", 0.0, 2, progress=False, snapshots=(3, 6, 12))
    for a, b in zip(jax.tree.leaves(short), jax.tree.leaves(snaps[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(snaps[1]), jax.tree.leaves(snaps[2]))]
    assert max(moved) > 0  # the longer run kept training
    cosine = distil(
        model, traces, heldout, dataclasses.replace(dc, schedule="cosine"), "passive", 0.0, 2, progress=False
    )
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(short), jax.tree.leaves(cosine)))


@pytest.mark.parametrize("kind,beta,ema", [("passive", 0, 0.9), ("soft_topk", 0, 0.9), ("adaptive", 1, 0)])
def test_fused_distillation_is_the_per_step_loop(kind, beta, ema, monkeypatch):
    """The compiled chunks (device-side batch gather, average and divergence check inside a scan) give bitwise
    the per-step loop's students, snapshots included, with chunks that end between snapshots."""
    import experiments.distillation as distillation

    monkeypatch.setattr(distillation, "FUSED_CHUNK", 4)  # chunk ends 4, 8 besides the snapshots 3, 6, 12
    model, traces, heldout = _tiny_world()
    dc = DistillConfig(steps=6, batch_size=4, warmup_steps=2, lr=1e-2, betas=(), attacks=(), ema=ema)
    run = functools.partial(distil, model, traces, heldout, dc, kind, beta, 2, progress=False, snapshots=(3, 6, 12))
    stats_fused, stats_steps = {}, {}
    fused, per_step = run(fused=True, stats=stats_fused), run(fused=False, stats=stats_steps)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(per_step)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert stats_fused == stats_steps
    assert not np.array_equal(np.asarray(jax.tree.leaves(fused[0])[0]), np.asarray(jax.tree.leaves(fused[2])[0]))


def _role():
    from experiments.config import RoleConfig

    return RoleConfig()


def _row(label, defense, teacher, passive, correct=None):
    students = {"passive": {"mean": np.mean(passive), "values": passive}}
    if correct is not None:
        students["correct_only"] = {"mean": np.mean(correct), "values": correct}
    return {
        "label": label,
        "defense": defense,
        "teacher_accuracy": {"mean": np.mean(teacher), "values": teacher},
        "students": students,
    }


def test_headline_picks_the_largest_student_loss_with_a_useful_teacher():
    from experiments.protocol import add_paired_deltas

    rows = [
        _row("standard", "standard", [0.90, 0.88, 0.89], [0.50, 0.52, 0.51], [0.49, 0.50, 0.51]),
        _row("poe γ=0.2", "poe", [0.88, 0.86, 0.87], [0.44, 0.45, 0.46], [0.45, 0.46, 0.46]),  # teacher -2
        _row("poe γ=0.5", "poe", [0.80, 0.78, 0.79], [0.30, 0.31, 0.32], [0.40, 0.40, 0.41]),  # teacher -10: not useful
    ]
    rows[0]["learning_curve"] = {"100": {"mean": 0.4}, "200": {"mean": 0.51}, "400": {"mean": 0.52}}
    add_paired_deltas(rows)
    h = headline({"rows": rows, "world": {"entropy_nats": 0.3}, "distill_steps": 200})
    assert h["informative"]["defense"] == "poe γ=0.2"
    assert h["informative"]["delta_teacher"] == pytest.approx(-2.0)
    assert h["informative"]["delta_passive"] == pytest.approx(-6.0)
    se = np.std([-6, -7, -5], ddof=1) / np.sqrt(3)
    assert h["informative"]["delta_passive_se"] == pytest.approx(se)
    assert h["informative"]["delta_passive_correct_only"] == pytest.approx(-4.333333, rel=1e-5)
    assert h["plateau_delta_points"] == pytest.approx(1.0)
    assert h["teacher_accuracy_standard"] == pytest.approx(89.0) and h["teacher_entropy_nats"] == 0.3


def test_trim_columns_keeps_every_used_column_and_rounds_up():
    from experiments.tasks.batches import trim_columns

    mask = np.zeros((2, 3, 40), np.float32)
    mask[1, 2, 4:17] = 1  # the last target token is tokens[:, :, 18]
    arrays = {
        "tokens_bt": np.arange(2 * 3 * 40).reshape(2, 3, 40),
        "loss_mask_bt": mask,
        "topk_ids_btk": np.zeros((2, 3, 40, 5)),
    }
    out = trim_columns(arrays)
    assert out["tokens_bt"].shape == (2, 3, 24) and out["topk_ids_btk"].shape == (2, 3, 24, 5)
    np.testing.assert_array_equal(out["tokens_bt"], arrays["tokens_bt"][..., :24])
    assert trim_columns({"tokens_bt": np.zeros((2, 10)), "loss_mask_bt": np.ones((2, 10))})["tokens_bt"].shape == (
        2,
        10,
    )


def test_a_trimmed_training_batch_has_the_full_width_loss_and_gradient():
    """The train step sees trimmed batches (Trainer.fit): the loss and its gradient over the kept columns are those
    of the padded rows (padding after the last target changes nothing under causal attention)."""
    import jax.numpy as jnp

    from experiments.tasks.batches import trim_columns
    from experiments.train import masked_nll

    model, traces, _ = _tiny_world()
    rng = np.random.default_rng(3)
    mask = np.zeros((4, 40), np.float32)
    for b, (lo, hi) in enumerate([(3, 9), (5, 14), (2, 6), (4, 11)]):
        mask[b, lo:hi] = 1
    tokens = rng.integers(3, 20, (4, 40)).astype(np.int32)
    tokens[:, 16:] = 0  # pad beyond the longest row's last target (tokens[:, 14])
    full = {"tokens_bt": tokens, "loss_mask_bt": mask}
    cut = trim_columns(full)
    assert cut["tokens_bt"].shape == (4, 16)

    value_and_grad = jax.jit(jax.value_and_grad(lambda p, t, m: masked_nll(model.graphdef, p, t, m)))

    def loss_and_grad(batch):
        return value_and_grad(model.params, jnp.asarray(batch["tokens_bt"]), jnp.asarray(batch["loss_mask_bt"]))

    (l_full, g_full), (l_cut, g_cut) = loss_and_grad(full), loss_and_grad(cut)
    np.testing.assert_allclose(float(l_cut), float(l_full), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_cut), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
