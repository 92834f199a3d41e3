"""The game wired to the trained models: the student's forward function, the game of a defense for
one student tilt, and the horizon (the protocol's distillation optimizer) its student is unrolled over.
Shared by the equilibrium (both methods) and the calibration."""

from __future__ import annotations

import dataclasses

import jax
import optax

from experiments.config import Config
from game import registry
from game import solver as sv
from game.poe_game import make_defense_game
from models import transformer as tfm


def on_one_cpu_device(tree):
    """A game computation's inputs committed to one device when the devices are several CPU devices of one
    process (`distributed.cpu_devices_per_core`). The game's pools and batches are not sharded, so on a
    data-parallel mesh every device would run the whole horizon student (a reduced equilibrium's J curves took
    1.6x the wall time and twice the CPU time on two CPU devices as on one; committed to one device, 1.1-1.3x).
    One CPU device still uses every core through XLA's thread pool. Elsewhere the tree is returned as it is."""
    devices = jax.devices()
    if len(devices) == 1 or jax.process_count() > 1 or devices[0].platform != "cpu":
        return tree
    return jax.device_put(tree, devices[0])


def student_forward(graphdef):
    """The student's network as the game sees it: (theta, tokens_bt) -> logits_btv."""
    return lambda theta, tokens_bt: tfm.forward(graphdef, theta, tokens_bt)[0]


def make_game(student, beta: float, dc, tau: float, estimator: str = "score", defense: str = registry.POE) -> sv.Game:
    """The game of `defense` for one student tilt β_s (0 = passive), on the student's network."""
    return make_defense_game(
        student_forward(student.graphdef),
        defense,
        beta,
        tau=tau,
        estimator=estimator,
        max_weight=dc.max_weight,
        standardize=dc.standardize_values,
    )


def horizon_optimizer(dc, steps: int) -> optax.GradientTransformation:
    """The protocol's distillation optimizer (experiments.distillation.distill_optimizer: AdamW,
    warmup + cosine, here over `steps`) with eps_root > 0, so forward mode through it stays finite."""
    warmup = min(dc.warmup_steps, steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, dc.lr, warmup, steps, dc.lr * 0.1)
    return optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.0, eps_root=sv.UNROLL_ADAM_EPS_ROOT)


def solver_setup(cfg: Config) -> tuple[sv.SolverConfig, sv.Optimizers]:
    """The equilibrium's solver config and optimizers: with unroll_from='base' the horizon
    is the protocol's (steps, optimizer) unless equilibrium.horizon overrides the steps."""
    ec, dc = cfg.equilibrium, cfg.protocol.distill
    scfg = ec.solver
    if scfg.unroll_from == "base":
        steps = horizon_steps(cfg)
        scfg = dataclasses.replace(scfg, unroll_steps=steps, unroll_lr=dc.lr)
        return scfg, sv.make_optimizers(scfg, unroll=horizon_optimizer(dc, steps))
    return scfg, sv.make_optimizers(scfg)


def horizon_steps(cfg: Config) -> int:
    """T: the student steps of the game's horizon (equilibrium.horizon, 0 = protocol.distill.steps)."""
    return cfg.equilibrium.horizon or cfg.protocol.distill.steps
