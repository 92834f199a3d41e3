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

from experiments.distributed import DistributedConfig
from experiments.equilibrium_config import EquilibriumConfig
from experiments.fields import ConfigError
from experiments.fields import documented as _help
from experiments.protocol_config import ATTACKS as ATTACKS  # re-exported: the protocol's settings live there
from experiments.protocol_config import DefenseSetting as DefenseSetting
from experiments.protocol_config import DistillConfig as DistillConfig
from experiments.protocol_config import ProtocolConfig
from experiments.tasks.reasoning import STYLES
from experiments.tasks.task_config import TaskConfig
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
