"""The attacker's recipes in the protocol, and the ablation that says where an adaptive gain comes from.

* `AttackerConfig` (`protocol.distill.attacker`): how the `adaptive(beta=…)` students turn
  example values into weights (which value, when it is computed, exp or one-sided filter,
  clamp), the tuned-β grid and the attacker's validation split, and which defense settings
  get the ablation students.
* `recipe_of(kind, dc)`: the `game.students.Recipe` a student kind trains with (the one
  place the protocol resolves a recipe; the loss itself is `game.students.recipe_loss`).
* `RecipeFeeder`: what a recipe adds to each training batch: dataset-level weights
  (values once at the student base, or every N steps) and the uniforms of the
  shuffled-weights control.
* `validation_split`, `choose_beta`: the tuned adaptive student picks β per seed on its own
  validation split (part of its held-out set, never used for g, never the test set).
* `ablation_specs`, `ablation_students`: the ablation rows and their students. The rows'
  names, `results.json["ablation"]` and the RESULTS.md section are in
  experiments/ablation_report.py (`ablation_summary` and `ablation_markdown` are also
  reachable here: experiments/protocol.py calls them as `attacker.<name>`).

Every ablation student of a seed shares that seed's traces and data order with the passive
student, so "minus passive" is a paired per-seed difference (mean ± SE over seeds, points).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.ablation_report import ABLATION_ROWS
from experiments.ablation_report import ablation_markdown as ablation_markdown  # used as attacker.<name>
from experiments.ablation_report import ablation_summary as ablation_summary  # used as attacker.<name>
from experiments.fields import documented as _help
from game import student_losses as sl
from game import students as stu
from models import lora
from models import transformer as tfm


@dataclasses.dataclass(frozen=True)
class AttackerConfig:
    """The adaptive attacker's recipe, its tuned β and the ablation (experiments/attacker.py)."""

    value: str = _help(
        "adaptive students' example value: 'jvp' (exact <∇ℓ_i, g> in float32, the design) or 'fd' (central difference in fd_dtype)",
        "jvp",
    )
    sign: int = _help("1: weights exp(+β v), v > 0 = useful (design); -1: exp(-β v), the sign of the paper's code", 1)
    fd_eps: float = _help("value='fd': the step ε along g", 0.01)
    fd_dtype: str = _help(
        "value='fd': precision of θ ± εg and of the two losses: bfloat16 | float16 | float32", "bfloat16"
    )
    value_refresh: int = _help(
        "when the values are computed: 1 = every step, for that step's batch, at the current student (design; weights "
        "normalised over the batch); 0 = once, at the student base, for every trace (weights normalised over all traces, "
        "g from the whole held-out set); N > 1 = for every trace at the current student every N steps",
        1,
    )
    weighting: str = _help(
        "'exp' (w ∝ exp(β v), mean 1, capped at max_weight) or 'filter' (one-sided: w = min(1, exp(β v)), only down-weights)",
        "exp",
    )
    clamp: float = _help("clip the (standardised) values to ±clamp before exp; 0 = off", 0.0)
    tuned_betas: tuple[float, ...] = _help(
        "β grid of the tuned adaptive student (ablation row 'tuned'); must contain 0 (passive)", (0.0, 0.1, 0.3, 1.0)
    )
    validation_fraction: float = _help(
        "share of the attacker's held-out prompts kept as its validation split (to choose the tuned β; never used for g) "
        "while the 'tuned' ablation row runs",
        0.25,
    )
    ablation_defenses: tuple[str, ...] = _help(
        "defense settings that get the ablation students: labels ('standard', 'poe γ=0.5'), keys ('poe_g0.5') or names "
        "('ads' = every ADS setting); empty = no ablation",
        (),
    )
    ablation: tuple[str, ...] = _help(f"ablation students to run: any of {', '.join(ABLATION_ROWS)}", ABLATION_ROWS)
    filter_beta: float = _help(
        "β of the one-sided filter row (values standardised when protocol.distill.standardize_values)", 1.0
    )
    reference_beta: float = _help("β of the reference-recipe rows (the paper's GSM8K/MATH value)", stu.REFERENCE_BETA)
    design_beta: float = _help("β of the design rows when protocol.distill.betas is empty (else its first entry)", 1.0)

    def validate(self, where: str = "protocol.distill.attacker") -> None:
        """Raises ValueError naming the key."""
        if self.value_refresh < 0:
            raise ValueError(f"{where}.value_refresh={self.value_refresh} must be >= 0 (0 = once at the student base)")
        self.base_recipe(True, 5.0, "token").validate(where)
        if self.validation_fraction <= 0 or self.validation_fraction >= 1:
            raise ValueError(f"{where}.validation_fraction={self.validation_fraction} must be in (0, 1)")
        for name in self.ablation:
            if name not in ABLATION_ROWS:
                raise ValueError(f"{where}.ablation: unknown row {name!r}; choose from {', '.join(ABLATION_ROWS)}")
        if "tuned" in self.ablation and self.ablation_defenses:
            if 0.0 not in self.tuned_betas:
                raise ValueError(f"{where}.tuned_betas={list(self.tuned_betas)} must contain 0 (the passive student)")
        if self.ablation_defenses and "passive_token" not in self.ablation:
            raise ValueError(f"{where}.ablation must contain 'passive_token' (every row is paired against it)")

    def base_recipe(self, standardize: bool, max_weight: float, averaging: str) -> stu.Recipe:
        return stu.Recipe(
            weighting=self.weighting,
            value=self.value,
            sign=self.sign,
            fd_eps=self.fd_eps,
            fd_dtype=self.fd_dtype,
            refresh_every=self.value_refresh,
            standardize=standardize,
            clamp=self.clamp,
            max_weight=max_weight,
            averaging=averaging,
        )

    @property
    def tunes(self) -> bool:
        """Whether the attacker keeps a validation split (the tuned row runs somewhere)."""
        return bool(self.ablation_defenses) and "tuned" in self.ablation


# Kinds trained as plain passive students (weights 1) with the configured averaging.
PASSIVE_KINDS = ("passive", "correct_only")


def adaptive_recipe(dc) -> stu.Recipe:
    """The `adaptive(beta=…)` students' recipe: DistillConfig's standardise/cap/averaging + the attacker's settings."""
    return dc.attacker.base_recipe(dc.standardize_values, dc.max_weight, dc.averaging)


def recipe_of(kind: Any, dc) -> stu.Recipe | None:
    """The recipe a student kind trains with; None for kinds with their own loss (soft_topk, poe_inversion)."""
    if isinstance(kind, stu.Recipe):
        return kind
    if kind in PASSIVE_KINDS:
        return dataclasses.replace(stu.PASSIVE_RECIPE, averaging=dc.averaging)
    if kind == "adaptive":
        return adaptive_recipe(dc)
    return None


def canonical_kind(recipe: stu.Recipe, dc) -> Any:
    """'passive' / 'adaptive' when the recipe is exactly theirs (their cached students are reused)."""
    for name in ("passive", "adaptive"):
        if recipe == recipe_of(name, dc):
            return name
    return recipe


def kind_label(kind: Any) -> str:
    """File-name part for a kind: its name, or a short hash of a recipe."""
    if isinstance(kind, str):
        return kind
    return "recipe" + hashlib.sha1(repr(kind).encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------
# Per-batch extras of a recipe (dataset-level weights, shuffle uniforms)
# ---------------------------------------------------------------------------


def params_of_fn(dc):
    """`params_of(tp, base)`: the student's full params from its trained tree, the params themselves
    (finetune='full') or LoRA adapters merged into the frozen base (finetune='lora')."""
    if dc.finetune == "lora":
        return lambda tp, base: lora.merge(base, tp, dc.lora)
    return lambda tp, base: tp


@functools.lru_cache(maxsize=16)
def _dataset_weights_fn(graphdef, dc, recipe: stu.Recipe):
    """Jitted, vmapped over seeds: weights of every trace at the current student (tp over `base`)."""
    params_of = params_of_fn(dc)

    def one_seed(tp, base, tokens_nt, mask_nt, h_tokens, h_mask, beta, u_n):
        def sum_loss(p, rows):
            m = rows["loss_mask_bt"][:, :-1]
            logp = tfm.token_logprobs(graphdef, params_of(p, base), rows["tokens_bt"])
            return -jnp.sum(jnp.where(m > 0, logp, 0.0) * m), jnp.sum(m)

        def per_example(p, rows):
            return sl.sequence_nll(
                tfm.token_logprobs(graphdef, params_of(p, base), rows["tokens_bt"]), rows["loss_mask_bt"][:, :-1]
            )

        g = stu.dataset_gradient(sum_loss, tp, {"tokens_bt": h_tokens, "loss_mask_bt": h_mask}, dc.heldout_batch)
        data = {"tokens_bt": tokens_nt, "loss_mask_bt": mask_nt}
        mask_n = jnp.sum(mask_nt[:, :-1], axis=-1) > 0
        return stu.dataset_weights(recipe, beta, per_example, tp, g, data, mask_n, dc.batch_size, u_n)

    return jax.jit(jax.vmap(one_seed, in_axes=(0, None, 0, 0, None, None, None, 0)))


class RecipeFeeder:
    """What a student kind's recipe adds to each training batch of `distil`.

    Dataset-level recipes (values once at the base, or every N steps): `weights_b`, the
    trace weights [seeds, n] computed at the refresh steps and gathered by the batch's
    indices. Per-batch recipes with the shuffle control: `shuffle_u_b`, uniforms from their
    own generator (the data order is untouched)."""

    def __init__(self, base, dc, kind, traces: dict, heldout: dict, seeds: int):
        self.recipe = recipe_of(kind, dc)
        self.base, self.dc, self.seeds = base, dc, seeds
        self.traces, self.heldout = traces, heldout
        self.rng = np.random.default_rng([seeds, 29])
        self.weights_sn = None

    def due(self, step: int) -> bool:
        r = self.recipe
        if r is None or not r.dataset_level:
            return False
        return step == 0 or (r.refresh_every > 1 and step % r.refresh_every == 0)

    def extras(self, step: int, trained, frozen, idx_sb: np.ndarray, beta: float) -> dict:
        r = self.recipe
        if r is None or not r.weighted:
            return {}
        if not r.dataset_level:
            return {"shuffle_u_b": self.rng.random(idx_sb.shape, np.float32)} if r.shuffle else {}
        if self.due(step):
            fn = _dataset_weights_fn(self.base.graphdef, self.dc, r)
            n = self.traces["tokens_bt"].shape[1]
            u = self.rng.random((self.seeds, n), np.float32)
            self.weights_sn = fn(
                trained,
                frozen,
                jnp.asarray(self.traces["tokens_bt"]),
                jnp.asarray(self.traces["loss_mask_bt"]),
                jnp.asarray(self.heldout["tokens_bt"]),
                jnp.asarray(self.heldout["loss_mask_bt"]),
                jnp.float32(beta),
                jnp.asarray(u),
            )
        return {"weights_b": np.take_along_axis(np.asarray(self.weights_sn), idx_sb, axis=1)}


# ---------------------------------------------------------------------------
# The tuned adaptive student
# ---------------------------------------------------------------------------


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) indices of the attacker's n held-out prompts: disjoint, fixed by `seed`."""
    perm = np.random.default_rng([seed, 41]).permutation(n)
    n_val = min(max(1, int(round(fraction * n))), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def choose_beta(validation_acc_bs: np.ndarray, betas) -> np.ndarray:
    """Index of the chosen β per seed: the best validation accuracy; ties go to the smallest |β|
    (the passive end). Sees validation scores only, so the test set cannot leak into the choice."""
    acc = np.asarray(validation_acc_bs, float)
    order = np.argsort(np.abs(np.asarray(betas, float)), kind="stable")
    best = order[np.argmax(acc[order], axis=0)]  # argmax takes the first maximum in |β| order
    return best


# ---------------------------------------------------------------------------
# Ablation rows
# ---------------------------------------------------------------------------


def runs_ablation(d, ac: AttackerConfig) -> bool:
    return any(x in (d.label, d.key, d.name) for x in ac.ablation_defenses)


def ablation_specs(dc) -> dict[str, tuple[Any, float]]:
    """name -> (kind, β) of every ablation row but 'tuned'."""
    ac = dc.attacker
    design = adaptive_recipe(dc)
    beta_d = dc.betas[0] if dc.betas else ac.design_beta
    ref = stu.REFERENCE_RECIPE
    specs = {
        "passive_token": (dataclasses.replace(stu.PASSIVE_RECIPE, averaging="token"), 0.0),
        "passive_sequence": (dataclasses.replace(stu.PASSIVE_RECIPE, averaging="sequence"), 0.0),
        "design": (design, beta_d),
        "design_shuffled": (dataclasses.replace(design, shuffle=True), beta_d),
        "design_once": (dataclasses.replace(design, refresh_every=0), beta_d),
        "filter": (dataclasses.replace(design, weighting="filter"), ac.filter_beta),
        "reference": (ref, ac.reference_beta),
        "reference_shuffled": (dataclasses.replace(ref, shuffle=True), ac.reference_beta),
        "reference_design_sign": (dataclasses.replace(ref, sign=1), ac.reference_beta),
        "reference_token": (dataclasses.replace(ref, averaging="token"), ac.reference_beta),
    }
    return {k: (canonical_kind(r, dc), b) for k, (r, b) in specs.items() if k in ac.ablation}


def ablation_students(protocol, d, models, traces, heldout) -> dict:
    """Train (or load) the ablation students of defense setting `d`: name -> record with
    per-seed `accuracy`, `ess_fraction` and, for 'tuned', the chosen `beta` per seed."""
    dc = protocol.pc.distill
    ac = dc.attacker
    out = {}
    for name, (kind, beta) in ablation_specs(dc).items():
        out[name] = dict(protocol.student_record(d, kind, beta, models, traces, heldout), beta=beta)
    if "tuned" in ac.ablation:
        betas = list(ac.tuned_betas)
        # β = 0 of the configured recipe gives every example weight exactly 1: it is the passive student.
        recs = [
            protocol.student_record(d, "passive" if b == 0 else "adaptive", float(b), models, traces, heldout)
            for b in betas
        ]
        val = np.array([r["validation_accuracy"] for r in recs])  # [n_betas, seeds]
        pick = choose_beta(val, betas)
        seeds = np.arange(val.shape[1])
        test = np.array([r["accuracy"] for r in recs])
        ess = np.array([r.get("ess_fraction", [1.0] * len(seeds)) for r in recs])
        out["tuned"] = {
            "accuracy": test[pick, seeds].tolist(),
            "ess_fraction": ess[pick, seeds].tolist(),
            "beta": [float(betas[i]) for i in pick],
            "validation_accuracy": val[pick, seeds].tolist(),
            "grid": {f"{b:g}": {"validation": val[i].tolist(), "test": test[i].tolist()} for i, b in enumerate(betas)},
        }
    return out
