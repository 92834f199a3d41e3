"""The protocol's settings (`distgame protocol`): the defense grid, the attacker's distillation and the
protocol's sizes. A section of experiments/config.py's Config."""

from __future__ import annotations

import dataclasses

from experiments.attacker import AttackerConfig
from experiments.fields import ConfigError
from experiments.fields import documented as _help
from game import registry
from models.lora import LoraConfig

ATTACKS = ("soft_topk", "poe_inversion")


@dataclasses.dataclass(frozen=True)
class DefenseSetting:
    """One point of the defense grid. What each defense reads and accepts is declared in game/registry.py."""

    name: str = _help(f"defense: one of {', '.join(registry.names())} (game/registry.py)", "standard")
    strength: float = _help("PoE gamma in [0, 1) or ADS lambda >= 0 (ignored by 'standard')", 0.0)
    eta: float = _help("strategic variants: growth rate of the strength along the sequence", 0.0)
    max_strength: float = _help("strategic variants: cap gamma_max in (0, 1) or lambda_max", 0.9)
    eps: float = _help("ads_fd: finite-difference step along the proxy's held-out gradient", 1e-3)

    @property
    def label(self) -> str:
        return registry.get(self.name).label(self) if self.name in registry.names() else self.name

    @property
    def key(self) -> str:
        """File-system-safe identifier."""
        key = self.label.replace(" ", "_").replace("γ=", "g").replace("λ=", "l").replace("η=", "eta")
        return key.replace(",", "").replace("=", "")

    def validate(self, where: str) -> None:
        try:
            registry.check(self, where)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How the attacker distills its base model on the teacher's traces."""

    steps: int = _help("optimizer steps per student", 200)
    batch_size: int = _help("traces per step", 64)
    lr: float = _help("peak AdamW learning rate", 5e-3)
    warmup_steps: int = _help("linear warmup steps", 10)
    betas: tuple[float, ...] = _help(
        "adaptive tilts beta_s (one adaptive student each; 0 = passive is always run)", (1.0,)
    )
    standardize_values: bool = _help(
        "divide example values by their batch std before exp(beta v), so beta is unitless", True
    )
    max_weight: float = _help("cap on an adaptive example weight (weights have mean 1)", 5.0)
    averaging: str = _help(
        "loss averaging: 'token' (mean over all target tokens) or 'sequence' (mean of per-trace means)", "token"
    )
    heldout: str = _help(
        "the attacker's held-out set for g_S: 'teacher' (clean teacher traces), 'ground_truth' (reference solutions) or 'none'",
        "teacher",
    )
    heldout_batch: int = _help("held-out examples per adaptive step", 64)
    degeneracy_filter: bool = _help("drop traces with long repeats before training", True)
    attacks: tuple[str, ...] = _help(f"extra attacks: any of {', '.join(ATTACKS)}", ("soft_topk", "poe_inversion"))
    attack_defenses: tuple[str, ...] = _help(
        "defense names the extra attacks are run against (poe_inversion only against the invertible ones: poe)",
        ("poe",),
    )
    inversion_gamma_error: float = _help(
        "poe_inversion: the attacker's estimate of gamma is the true gamma plus this", 0.0
    )
    schedule: str = _help(
        "learning rate after warmup: 'constant' (then the first N steps of a longer run are exactly an N-step run, so one "
        "run gives the whole learning curve) or 'cosine' (decays to lr/10 at `steps`)",
        "constant",
    )
    curve: tuple[float, ...] = _help(
        "learning curve of the passive student under standard decoding: accuracy after these multiples of `steps` "
        "(one run to the largest; must include 1 and needs schedule='constant'); the plateau check is acc(2x) - acc(1x). "
        "[] = off",
        (0.25, 0.5, 1.0, 2.0),
    )
    ema: float = _help(
        "students are evaluated at the exponential moving average of their iterates with this decay (bias-corrected, "
        "horizon ~1/(1-ema) steps): at a constant lr the last iterate wanders by several points from seed to seed; "
        "0 = the last iterate",
        0.0,
    )
    correct_only: bool = _help(
        "learnability control: per defense, also the passive student trained on the same traces in the same order with "
        "the wrong ones masked out; a loss vs standard that survives is the correct texts' learnability",
        False,
    )
    finetune: str = _help(
        "what the student trains: 'full' (every weight) or 'lora' (low-rank adapters, protocol.distill.lora)", "full"
    )
    lora: LoraConfig = _help("LoRA adapters when finetune='lora' (models/lora.py)", factory=LoraConfig)
    attacker: AttackerConfig = _help(
        "the adaptive students' recipe, the tuned β and the attacker ablation (experiments/attacker.py)",
        factory=AttackerConfig,
    )


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """The empirical protocol: defended traces, distilled students, results table."""

    seeds: int = _help("independent seeds (trace sampling and data order), run as a vectorised batch", 3)
    temperature: float = _help("sampling temperature tau of the teacher API (traces and teacher accuracy)", 1.0)
    n_traces: int = _help("training prompts the attacker sends to the teacher, per seed", 2048)
    expose_k: int = _help("the teacher API returns the top-k log-probs of each emitted token (0 = text only)", 5)
    defenses: tuple[DefenseSetting, ...] = _help(
        "the defense grid", (DefenseSetting("standard"), DefenseSetting("poe", 0.5))
    )
    distill: DistillConfig = _help("the attacker", factory=DistillConfig)
    cost_batch: int = _help("prompts per timed decoding batch for the wall-clock cost ratio", 256)

    def validate(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"protocol.seeds={self.seeds} must be >= 1")
        if not self.defenses:
            raise ConfigError("protocol.defenses is empty; give at least one defense setting")
        for i, d in enumerate(self.defenses):
            d.validate(f"protocol.defenses[{i}]")
        labels = [d.label for d in self.defenses]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"protocol.defenses has duplicates: {labels}")
        dc = self.distill
        for name in dc.attack_defenses:
            if name not in registry.names():
                raise ConfigError(f"protocol.distill.attack_defenses: {registry.unknown(name)}")
        for a in dc.attacks:
            if a not in ATTACKS:
                raise ConfigError(f"protocol.distill.attacks: unknown attack {a!r}; choose from {', '.join(ATTACKS)}")
        if dc.averaging not in ("token", "sequence"):
            raise ConfigError(f"protocol.distill.averaging={dc.averaging!r} must be 'token' or 'sequence'")
        if dc.heldout not in ("teacher", "ground_truth", "none"):
            raise ConfigError(f"protocol.distill.heldout={dc.heldout!r} must be 'teacher', 'ground_truth' or 'none'")
        if dc.heldout == "none" and dc.betas:
            raise ConfigError(
                "protocol.distill.heldout='none' leaves adaptive students no held-out set; set protocol.distill.betas=[]"
            )
        if "soft_topk" in dc.attacks or "poe_inversion" in dc.attacks:
            if self.expose_k < 1:
                raise ConfigError("protocol.distill.attacks use exposed log-probs but protocol.expose_k=0")
        if dc.finetune not in ("full", "lora"):
            raise ConfigError(f"protocol.distill.finetune={dc.finetune!r} must be 'full' or 'lora'")
        try:
            dc.lora.validate(None, "protocol.distill.lora")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if dc.max_weight < 1:
            raise ConfigError(f"protocol.distill.max_weight={dc.max_weight} must be >= 1")
        if dc.schedule not in ("constant", "cosine"):
            raise ConfigError(f"protocol.distill.schedule={dc.schedule!r} must be 'constant' or 'cosine'")
        if dc.curve and (1.0 not in dc.curve or min(dc.curve) <= 0):
            raise ConfigError(
                f"protocol.distill.curve={list(dc.curve)} must be positive multiples of steps including 1"
            )
        if not 0.0 <= dc.ema < 1.0:
            raise ConfigError(f"protocol.distill.ema={dc.ema} must be in [0, 1) (0 = evaluate the last iterate)")
        if dc.curve and dc.schedule != "constant":
            raise ConfigError(
                "protocol.distill.curve needs protocol.distill.schedule='constant' (with 'cosine' the first N "
                "steps of a longer run are not an N-step run); set protocol.distill.curve=[] or the schedule"
            )
        try:
            dc.attacker.validate("protocol.distill.attacker")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if dc.attacker.ablation_defenses and dc.heldout == "none":
            raise ConfigError(
                "protocol.distill.attacker.ablation_defenses needs a held-out set; protocol.distill.heldout='none'"
            )
        for name in dc.attacker.ablation_defenses:
            if not any(name in (d.label, d.key, d.name) for d in self.defenses):
                raise ConfigError(
                    f"protocol.distill.attacker.ablation_defenses: {name!r} matches no defense setting; "
                    f"labels: {', '.join(d.label for d in self.defenses)}"
                )
        for name in ("steps", "batch_size", "heldout_batch"):
            if getattr(dc, name) < 1:
                raise ConfigError(f"protocol.distill.{name}={getattr(dc, name)} must be >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"protocol.temperature={self.temperature} must be > 0")
        if self.n_traces < 1 or self.cost_batch < 1:
            raise ConfigError("protocol.n_traces and protocol.cost_batch must be >= 1")
