"""Typed trainer configuration: one small dataclass per component, validated on creation.

Sources, later overriding earlier: the defaults below, a TOML (or YAML, when PyYAML is
installed) file, then ``section.key=value`` arguments. Unknown keys are errors that name
the closest known key.

The ``task`` section belongs to the task: ``task.name`` selects it (a registered name or
``package.module:Class``) and its ``Config`` dataclass declares the other ``task.*`` keys.
"""
import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type

from fastlab.tasks import TaskConfig, resolve
from fastlab.tasks.base import check_option as _check


ARCHS = ("gpt", "thinker")


@dataclass
class ModelConfig:
    #: gpt: a causal decoder over prompt and answer; thinker: a latent memory that reads
    #: the input by cross-attention over n_step steps and decodes the output from it
    arch: str = "gpt"
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    #: width of the MLPs (0: 4 x d_model)
    d_hid: int = 0
    dropout: float = 0.0
    #: thinker: latent memory vectors, steps, and the per-step plan (a preset name)
    n_latent: int = 8
    n_step: int = 2
    plan: str = "read_write"

    def __post_init__(self):
        _check(self.arch in ARCHS, f"model.arch must be one of {ARCHS}, got {self.arch!r}")
        _check(self.n_layer >= 1, f"model.n_layer must be >= 1, got {self.n_layer}")
        _check(self.n_head >= 1, f"model.n_head must be >= 1, got {self.n_head}")
        _check(self.d_model % self.n_head == 0,
               f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        _check(self.d_hid >= 0, f"model.d_hid must be >= 0 (0: 4 x d_model), got {self.d_hid}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(self.n_latent >= 1, f"model.n_latent must be >= 1, got {self.n_latent}")
        _check(self.n_step >= 1, f"model.n_step must be >= 1, got {self.n_step}")


SCHEDULES = ("linear", "cosine", "inverse_sqrt", "constant")


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    schedule: str = "linear"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
               f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm must be >= 0 (0 disables clipping)")
        _check(self.schedule in SCHEDULES,
               f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"
    #: the whole step (batch, forward, backward, clipping, spike check, update) replayed
    #: from one CUDA graph: auto (on for single-process CUDA runs), on/true, off/false
    cuda_graphs: str = "auto"
    dist: str = "ddp"

    def __post_init__(self):
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"),
               f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        _check(self.compile in ("auto", "on", "off"),
               f"train.compile must be auto, on or off, got {self.compile!r}")
        _check(self.dist in ("ddp", "fsdp"), f"train.dist must be ddp or fsdp, got {self.dist!r}")
        graphs = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}
        self.cuda_graphs = graphs.get(str(self.cuda_graphs).lower(), str(self.cuda_graphs).lower())
        _check(self.cuda_graphs in ("auto", "on", "off"),
               f"train.cuda_graphs must be auto, on/true or off/false, got {self.cuda_graphs!r}")


@dataclass
class EvalConfig:
    every: int = 250
    samples: int = 1000
    target: Optional[float] = None

    def __post_init__(self):
        _check(self.every >= 1, f"eval.every must be >= 1, got {self.every}")
        _check(self.samples >= 1, f"eval.samples must be >= 1, got {self.samples}")


@dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 2
    resume: bool = True

    def __post_init__(self):
        _check(self.every >= 1, f"checkpoint.every must be >= 1, got {self.every}")
        _check(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class GuardConfig:
    enabled: bool = True
    window: int = 50
    factor: float = 4.0
    #: a spike must also exceed the median by this much (loss units)
    min_delta: float = 0.1
    max_spikes: int = 3
    lr_backoff: float = 0.5
    snapshot_every: int = 100

    def __post_init__(self):
        _check(self.window >= 4, f"guard.window must be >= 4, got {self.window}")
        _check(self.factor > 1, f"guard.factor must be > 1, got {self.factor}")
        _check(self.min_delta >= 0, f"guard.min_delta must be >= 0, got {self.min_delta}")
        _check(0 < self.lr_backoff <= 1, "guard.lr_backoff must be in (0, 1]")


@dataclass
class LogConfig:
    out_dir: str = "runs"
    name: str = ""
    every: int = 25
    progress: bool = True
    profile: bool = False
    nvml: bool = True


def _default_task() -> TaskConfig:
    return resolve(TaskConfig.name).Config()


@dataclass
class Config:
    task: TaskConfig = field(default_factory=_default_task)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)


def _sections(task_cls=None) -> Dict[str, type]:
    """Section name -> dataclass; ``task`` is the selected task's own config class."""
    sections = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
    sections["task"] = (task_cls or resolve(TaskConfig.name)).Config
    return sections


def known_keys(task_cls=None) -> List[str]:
    return [f"{s}.{f.name}" for s, cls in _sections(task_cls).items()
            for f in dataclasses.fields(cls)]


def _parse(text: Any, tp, key: str):
    """Turn ``text`` into a value of the field type ``tp``: a command-line string is parsed,
    a typed value from a file must already have that type (an int also serves a float)."""
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        if text is None or (isinstance(text, str) and text.lower() in ("none", "null", "")):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if not isinstance(text, str):
        # exact types: bool is a subclass of int, but `steps = true` is no step count
        if type(text) is tp or (tp is float and type(text) is int):
            return tp(text)
        raise ValueError(f"{key} expects {tp.__name__}, got {type(text).__name__} {text!r}")
    try:
        if tp is bool:
            if str(text).lower() in ("1", "true", "yes", "on"):
                return True
            if str(text).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(str(text))
        if tp is float:
            return float(str(text))
        return str(text)
    except ValueError:
        raise ValueError(f"{key} expects {tp.__name__}, got {text!r}") from None


def _unknown(key: str, task_cls=None) -> ValueError:
    close = difflib.get_close_matches(key, known_keys(task_cls), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else "; see --help for every key"
    where = f" (task {task_cls.name!r})" if task_cls is not None and key.startswith("task.") else ""
    return ValueError(f"unknown config key {key!r}{where}{hint}")


def _read_file(path: str) -> Dict[str, Any]:
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML; use TOML instead") from None
        with open(path) as f:
            return yaml.safe_load(f) or {}
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


def _flatten(data: Dict[str, Any]) -> Dict[str, Any]:
    flat = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise _unknown(section)
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def _gather(file: Optional[str], overrides: Optional[List[str]]) -> Dict[str, Any]:
    values: Dict[str, Any] = _flatten(_read_file(file)) if file else {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    return values


def task_class(values: Dict[str, Any]) -> Type:
    name = values.get("task.name", TaskConfig.name)
    if not isinstance(name, str):
        raise ValueError(f"task.name expects str, got {type(name).__name__} {name!r}")
    return resolve(name)


def build_config(file: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults, then ``file``, then ``key=value`` overrides; every value type-checked."""
    values = _gather(file, overrides)
    task_cls = task_class(values)
    sections = _sections(task_cls)
    chosen: Dict[str, Dict[str, Any]] = {s: {} for s in sections}
    for key, value in values.items():
        section, _, name = key.partition(".")
        if section not in sections:
            raise _unknown(key, task_cls)
        hints = typing.get_type_hints(sections[section])
        if name not in hints:
            raise _unknown(key, task_cls)
        chosen[section][name] = _parse(value, hints[name], key)
    return Config(**{s: cls(**chosen[s]) for s, cls in sections.items()})


def help_text(argv: Optional[List[str]] = None) -> str:
    """Every option with its type and default; the task section is that of the task named
    by ``task.name=...`` in ``argv`` (the default task otherwise)."""
    names = [a.split("=", 1)[1] for a in argv or [] if a.startswith("task.name=")]
    task_cls = resolve(names[-1] if names else TaskConfig.name)
    lines = ["usage: python -m fastlab.train [CONFIG.toml|.yaml] [section.key=value ...]", "",
             f"options (default); task.* are those of task {task_cls.name!r} "
             "(task.name=X --help lists X's):"]
    sections = _sections(task_cls)
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        defaults = dataclasses.asdict(cls())
        if section == "task" and names:
            defaults["name"] = names[-1]
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            name = getattr(tp, "__name__", str(tp).replace("typing.", ""))
            key = f"{section}.{f.name}"
            lines.append(f"  {key:<26} {name:<16} {defaults[f.name]!r}")
    return "\n".join(lines)


def save_config(cfg: Config, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    os.replace(tmp, path)
