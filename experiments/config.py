"""Typed configs: YAML files plus `key=value` overrides, validated into frozen dataclasses.

Every field is documented once, in its `metadata["help"]`, where it is defined;
`distgame config --config NAME` prints the resolved config with those docs.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import types
import typing
from typing import Any

import yaml

from experiments.attacker import AttackerConfig
from experiments.distributed import DistributedConfig
from experiments.equilibrium_config import EquilibriumConfig
from experiments.fields import ConfigError
from experiments.fields import documented as _help
from experiments.tasks.reasoning import STYLES
from experiments.tasks.task_config import TaskConfig
from game import registry
from models.lora import LoraConfig
from models.sharding import DEFAULT_RULES, MESH_AXES, MeshConfig
from models.transformer import ModelConfig

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"
ROLES = ("teacher", "proxy", "student")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How one role's model is trained from scratch."""

    steps: int = _help("optimizer steps", 1000)
    batch_size: int = _help("global batch size in sequences; must be divisible by mesh data*fsdp", 64)
    lr: float = _help("peak AdamW learning rate", 3e-3)
    warmup_steps: int = _help("linear warmup steps before the cosine decay", 50)
    end_lr_fraction: float = _help("final learning rate as a fraction of lr", 0.05)
    weight_decay: float = _help("AdamW decoupled weight decay", 0.01)
    grad_clip: float = _help("global gradient-norm clip (0 = off)", 1.0)
    data: str = _help(
        "what the model trains on: 'solutions' (prompt + step-by-step solution), "
        "'easy' (solutions of problems with 1..easy_max_steps steps), or 'prompts' (problem text only)",
        "solutions",
    )
    style: str = _help(
        "reasoning task only: the mix of solution texts the role learns: 'mixed' (every variant), 'schoolbook' "
        "(spells out every multiplication: the default proxy's habit), 'careful' (checks every line), 'terse' (fuses "
        "add/subtract chains) or 'canonical' (one text); see experiments/tasks/reasoning.py",
        "mixed",
    )
    n_examples: int = _help("size of the role's training set (0 = task.n_train)", 0)
    log_every: int = _help("steps between loss records in metrics.jsonl (the last step is always logged)", 25)
    eval_every: int = _help("steps between test-accuracy evaluations (0 = only at the end)", 0)
    eval_size: int = _help("test problems used for the periodic evaluation", 128)
    checkpoint_every: int = _help("steps between orbax checkpoints (the last step is always saved)", 500)
    keep_checkpoints: int = _help("checkpoints kept (oldest deleted first)", 2)
    preemption_check_every: int = _help(
        "steps between checks for SIGTERM (preemption: checkpoint and stop); with several processes each "
        "check is a one-flag all-gather (about 2 ms on CPU/gloo), so raise it when steps are very short",
        1,
    )
    seed: int = _help("initialisation and data-order seed", 0)

    def validate(self, where: str) -> None:
        for name in ("steps", "batch_size", "keep_checkpoints", "eval_size", "log_every", "preemption_check_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "n_examples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 0")
        if not self.lr > 0:
            raise ConfigError(f"{where}.lr={self.lr} must be > 0")
        if self.data not in ("solutions", "easy", "prompts"):
            raise ConfigError(f"{where}.data={self.data!r} must be one of 'solutions', 'easy', 'prompts'")
        if self.style not in STYLES:
            raise ConfigError(f"{where}.style={self.style!r} must be one of {', '.join(map(repr, STYLES))}")


@dataclasses.dataclass(frozen=True)
class RoleConfig:
    """A model role: its architecture and how it is trained."""

    model: ModelConfig = _help("architecture", factory=ModelConfig)
    train: TrainConfig = _help("training schedule", factory=TrainConfig)
    hf_dir: str = _help(
        "load this role from a Hugging Face checkpoint directory (local or gs://; config.json, *.safetensors, "
        "tokenizer.json; Llama-3 or Qwen2/2.5) instead of training it: the architecture then comes from config.json "
        "and only model.compute_dtype, model.param_dtype and model.vocab_rows (if > 0) apply; '' = train from scratch",
        "",
    )
    hf_cache: bool = _help(
        "save the converted HF model once as an orbax checkpoint under run_dir/ROLE/hf_converted and reuse it", True
    )


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Decoding used for evaluation and trace generation."""

    max_new_tokens: int = _help("tokens generated after the prompt", 48)
    top_p: float = _help(
        "nucleus sampling mass of the teacher API (1.0 = off), applied after the defense and protocol.temperature", 1.0
    )
    batch_size: int = _help("prompts decoded together", 256)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"sample.max_new_tokens={self.max_new_tokens} must be >= 1")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sample.top_p={self.top_p} must be in (0, 1]")
        if self.batch_size < 1:
            raise ConfigError(f"sample.batch_size={self.batch_size} must be >= 1")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Sizes for `distgame bench`."""

    role: str = _help("which role's model to benchmark", "teacher")
    batch_size: int = _help("sequences per train step and per decode batch", 64)
    prompt_len: int = _help("prompt tokens before decoding", 32)
    gen_len: int = _help("generated tokens per sequence", 32)
    iters: int = _help("timed repetitions per round (after one warm-up)", 5)
    rounds: int = _help(
        "rounds of timings, ours and PyTorch's alternating (--compare-hf); medians over rounds are reported", 2
    )
    distill_steps: int = _help(
        "distillation steps per timed call of the protocol's distil (all protocol.seeds at once)", 10
    )


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


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What `distgame run` (the main job, `make run`) does after training."""

    protocol_seeds: int = _help(
        "seeds of the protocol inside the main job (protocol.seeds is for distgame protocol)", 1
    )
    equilibrium: bool = _help("also run the equilibrium sweep", True)


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole experiment. `distgame config --config NAME` prints it with these docs."""

    name: str = _help("config name (set from the file name)", "default")
    run_dir: str = _help("where checkpoints, logs and results go", "runs/default")
    seed: int = _help("task-generation seed", 0)
    task: TaskConfig = _help(
        "the task: built-in arithmetic problems or a text dataset through TFDS", factory=TaskConfig
    )
    easy_max_steps: int = _help("most steps of the 'easy' problems a role with train.data=easy sees (from 1)", 2)
    mesh: MeshConfig = _help("device mesh (over the devices of all processes)", factory=MeshConfig)
    distributed: DistributedConfig = _help(
        "multi-process / multi-host settings (experiments/distributed.py; env DISTGAME_* overrides)",
        factory=DistributedConfig,
    )
    rules: dict = _help(
        "logical axis -> mesh axis (or null = replicated); the one rule table for all parameters",
        factory=lambda: dict(DEFAULT_RULES),
    )
    teacher: RoleConfig = _help("the model provider's model", factory=RoleConfig)
    proxy: RoleConfig = _help("the teacher's weaker proxy student (used by defenses)", factory=RoleConfig)
    student: RoleConfig = _help("the attacker's base model, before distillation", factory=RoleConfig)
    sample: SampleConfig = _help("decoding", factory=SampleConfig)
    bench: BenchConfig = _help("benchmark sizes", factory=BenchConfig)
    protocol: ProtocolConfig = _help("the empirical protocol (distgame protocol)", factory=ProtocolConfig)
    equilibrium: EquilibriumConfig = _help(
        "the PoE game's equilibrium sweep (distgame equilibrium)", factory=EquilibriumConfig
    )
    run: RunConfig = _help("the main job (distgame run)", factory=RunConfig)

    def role(self, name: str) -> RoleConfig:
        if name not in ROLES:
            raise ConfigError(f"unknown role {name!r}; choose one of {', '.join(ROLES)}")
        return getattr(self, name)

    def validate(self) -> None:
        try:
            self.task.validate()
            self.mesh.shape(abs(self.mesh.data * self.mesh.fsdp * self.mesh.tensor))  # sign / -1 checks only
            self.distributed.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for logical, target in self.rules.items():
            if target is not None and target not in MESH_AXES:
                raise ConfigError(f"rules.{logical}={target!r} must be one of {', '.join(MESH_AXES)} or null")
        for role in ROLES:
            rc = self.role(role)
            try:
                rc.model.validate(f"{role}.model")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            rc.train.validate(f"{role}.train")
        if self.easy_max_steps < 1:
            raise ConfigError(f"easy_max_steps={self.easy_max_steps} must be >= 1")
        for role in ROLES if self.task.is_text else ():
            if self.role(role).train.data == "easy":
                raise ConfigError(
                    f"{role}.train.data='easy' needs a built-in task; task.name={self.task.name!r} has no step counts"
                )
        for role in ROLES if self.task.name != "reasoning" else ():
            if self.role(role).train.style != "mixed":
                raise ConfigError(
                    f"{role}.train.style={self.role(role).train.style!r} needs task.name='reasoning' "
                    f"(task.name={self.task.name!r} has one text per problem)"
                )
        self.sample.validate()
        self.protocol.validate()
        self.equilibrium.validate()
        if self.run.protocol_seeds < 1:
            raise ConfigError(f"run.protocol_seeds={self.run.protocol_seeds} must be >= 1")
        if self.bench.role not in ROLES:
            raise ConfigError(f"bench.role={self.bench.role!r} must be one of {', '.join(ROLES)}")
        for name in ("batch_size", "prompt_len", "gen_len", "iters", "rounds", "distill_steps"):
            if getattr(self.bench, name) < 1:
                raise ConfigError(f"bench.{name}={getattr(self.bench, name)} must be >= 1")


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, options[0], where)
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}={value!r} must be of type {tp.__name__}, got {type(value).__name__}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is tuple or origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(value if inner is Any else (_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)))
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {'.'.join(filter(None, [where, close[0]]))!r}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def config_path(name: str) -> pathlib.Path:
    path = pathlib.Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown config {name!r}; built-in configs: {known}")
    return path


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = config_path(name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if data is None:  # an empty (or comments-only) file would silently run every default
        raise ConfigError(f"config file {str(path)!r} is empty: give it at least one setting, or use --config default")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must contain a mapping")
    data.setdefault("name", path.stem)
    data.setdefault("run_dir", f"runs/{path.stem}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.strip(), value)
    cfg = from_dict(Config, data)
    cfg.validate()
    return cfg


def describe(obj: Any, indent: int = 0) -> str:
    """The resolved config as YAML-like text, each field followed by its documentation."""
    lines = []
    pad = "  " * indent
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        doc = f.metadata.get("help", "")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:  # {doc}")
            lines.append(describe(value, indent + 1))
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            lines.append(f"{pad}{f.name}:  # {doc}")
            lines += [
                f"{pad}  - {yaml.safe_dump(dataclasses.asdict(v), default_flow_style=True).strip()}" for v in value
            ]
        else:
            lines.append(
                f"{pad}{f.name}: {yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}  # {doc}"
            )
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
