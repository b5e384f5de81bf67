"""Typed trainer configuration: one small dataclass per component, validated on creation.

Sources, later overriding earlier: the defaults below, a TOML (or YAML, when PyYAML is
installed) file, then ``section.key=value`` arguments. Unknown keys are errors that name
the closest known key.

The ``task`` section belongs to the task: ``task.name`` selects it (a registered name or
``package.module:Class``) and its ``Config`` dataclass declares the other ``task.*`` keys.
"""
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type

from fastlab.models.thinker import parse_plan
from fastlab.tasks import TaskConfig, resolve
from fastlab.tasks.base import ConfigError
from fastlab.tasks.base import check_option as _check


ARCHS = ("gpt", "thinker")
#: model.preset -> the model.* values it sets (explicit model.* options still win)
PRESETS: Dict[str, Dict[str, Any]] = {
    "gpt2": {"n_layer": 12, "n_head": 12, "d_model": 768},            # 124M
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "d_model": 1024},    # 350M
    "gpt2-large": {"n_layer": 36, "n_head": 20, "d_model": 1280},     # 774M
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "d_model": 1600},        # 1.56B
    "gpt2-cpu": {"n_layer": 4, "n_head": 4, "d_model": 128},          # GPT-2's layout, CPU-sized
}
GPT_LOSSES = ("fused", "logits")
GPT_BIASES = ("all", "mlp", "none")
GPT_RECOMPUTE = ("none", "pointwise")


def _finite(value: float, key: str) -> None:
    _check(math.isfinite(value), f"{key} must be a finite number, got {value}")


@dataclass
class ModelConfig:
    #: a named size that sets n_layer, n_head and d_model (gpt2, gpt2-medium, gpt2-large,
    #: gpt2-xl, gpt2-cpu; empty: none); model.* options given beside it override it
    preset: str = ""
    #: gpt (a causal decoder over prompt and answer) or thinker (a latent memory that
    #: reads the input by cross-attention over n_step steps and decodes the output from it)
    arch: str = "gpt"
    #: transformer layers, >= 1
    n_layer: int = 2
    #: attention heads, >= 1; must divide model.d_model
    n_head: int = 4
    #: width of the residual stream
    d_model: int = 128
    #: width of the MLPs; 0 means 4 x model.d_model
    d_hid: int = 0
    #: dropout probability in [0, 1)
    dropout: float = 0.0
    #: gpt: where biases are: all (every linear layer and LayerNorm, GPT-2's), mlp (the
    #: MLP's and the LayerNorms', none in attention: the small tasks learn faster so) or none
    bias: str = "mlp"
    #: gpt: the output head shares the token embedding's weight: true or false
    tie_embeddings: bool = True
    #: gpt: fused (head and cross-entropy in one op, the logits never exist) or logits
    loss: str = "fused"
    #: gpt: normal (N(0, 0.02) everywhere) or gpt2 (the projections into the residual
    #: stream scaled by 1 / sqrt(2 x model.n_layer))
    init: str = "normal"
    #: gpt: none (the backward reads every activation it needs from memory) or pointwise
    #: (each block keeps its matmul and attention outputs and recomputes its LayerNorms,
    #: GELU, residual sums and bf16 weight copies in the backward: less memory, more time)
    recompute: str = "none"
    #: thinker only: latent memory vectors, >= 1
    n_latent: int = 8
    #: thinker only: memory update steps, >= 1
    n_step: int = 2
    #: thinker only: the per-step plan, a preset name
    plan: str = "read_write"

    def __post_init__(self):
        _check(self.arch in ARCHS, f"model.arch must be one of {ARCHS}, got {self.arch!r}")
        _check(not self.preset or self.preset in PRESETS,
               f"model.preset must be one of {sorted(PRESETS)} or empty, got {self.preset!r}")
        _check(self.bias in GPT_BIASES,
               f"model.bias must be one of {GPT_BIASES}, got {self.bias!r}")
        _check(self.init in ("normal", "gpt2"),
               f"model.init must be normal or gpt2, got {self.init!r}")
        _check(self.recompute in GPT_RECOMPUTE,
               f"model.recompute must be one of {GPT_RECOMPUTE}, got {self.recompute!r}")
        _check(self.loss in GPT_LOSSES,
               f"model.loss must be one of {GPT_LOSSES}, got {self.loss!r}")
        _check(self.n_layer >= 1, f"model.n_layer must be >= 1, got {self.n_layer}")
        _check(self.n_head >= 1, f"model.n_head must be >= 1, got {self.n_head}")
        _check(self.d_model >= 1 and self.d_model % self.n_head == 0,
               f"model.d_model ({self.d_model}) must be a positive multiple of model.n_head "
               f"({self.n_head})")
        _check(self.d_hid >= 0, f"model.d_hid must be >= 0 (0: 4 x d_model), got {self.d_hid}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(self.n_latent >= 1, f"model.n_latent must be >= 1, got {self.n_latent}")
        _check(self.n_step >= 1, f"model.n_step must be >= 1, got {self.n_step}")
        parse_plan(self.plan, option="model.plan")


SCHEDULES = ("linear", "cosine", "inverse_sqrt", "constant")


@dataclass
class OptimConfig:
    #: peak learning rate, finite and > 0
    lr: float = 2e-3
    #: decoupled weight decay on tensors of 2 or more dimensions, >= 0
    weight_decay: float = 0.1
    #: Adam's first-moment decay in [0, 1)
    beta1: float = 0.9
    #: Adam's second-moment decay in [0, 1)
    beta2: float = 0.98
    #: Adam's epsilon, > 0
    eps: float = 1e-8
    #: clip the global gradient norm to this, fused into the update; 0 disables clipping
    max_grad_norm: float = 1.0
    #: linear, cosine, inverse_sqrt or constant (after the warm-up)
    schedule: str = "linear"
    #: steps of linear warm-up from 0 to optim.lr, >= 0
    warmup_steps: int = 100
    #: the schedule's final lr as a fraction of optim.lr, in [0, 1]
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        for key in ("lr", "weight_decay", "beta1", "beta2", "eps", "max_grad_norm",
                    "min_lr_ratio"):
            _finite(getattr(self, key), f"optim.{key}")
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
               f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        _check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm must be >= 0 (0 disables clipping)")
        _check(self.schedule in SCHEDULES,
               f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass
class TrainConfig:
    #: optimizer steps of the whole run, >= 1
    steps: int = 2000
    #: global batch (all ranks and micro-batches together), >= 1
    batch_size: int = 128
    #: micro-batches per step, >= 1; must divide the batch per rank
    grad_accum: int = 1
    #: seed of the weights and of every batch (batches are a function of seed and step)
    seed: int = 0
    #: auto (cuda when available), cpu, cuda or cuda:N
    device: str = "auto"
    #: auto (bf16 on CUDA, else fp32), fp32, bf16 or fp16 (CUDA only)
    precision: str = "auto"
    #: torch.compile the forward: auto (on CUDA), on, off, or max-autotune (Inductor
    #: benchmarks matmul kernels and fuses their epilogues: minutes more compilation)
    compile: str = "auto"
    #: the whole step (batch, forward, backward, clipping, spike check, update) replayed
    #: from one CUDA graph: auto (on for single-process CUDA runs), on/true, off/false
    cuda_graphs: str = "auto"
    #: ddp or fsdp, under torchrun
    dist: str = "ddp"
    #: CPU threads of this process; 0 picks: 1 for a CUDA run (the host only launches),
    #: else the cores this process may use, at most 4 (a sweep gives each run its share)
    threads: int = 0
    #: start from the weights of this checkpoint file or run directory (its best.pt, else
    #: its newest checkpoint); ignored when the run resumes from its own checkpoint
    init_from: str = ""

    def __post_init__(self):
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(0 <= self.seed < 2 ** 32, f"train.seed must be in [0, 2**32), got {self.seed}")
        _check(bool(_DEVICE.match(self.device)),
               f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"),
               f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        _check(self.compile in ("auto", "on", "off", "max-autotune"),
               f"train.compile must be auto, on, off or max-autotune, got {self.compile!r}")
        _check(self.dist in ("ddp", "fsdp"), f"train.dist must be ddp or fsdp, got {self.dist!r}")
        graphs = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}
        self.cuda_graphs = graphs.get(str(self.cuda_graphs).lower(), str(self.cuda_graphs).lower())
        _check(self.cuda_graphs in ("auto", "on", "off"),
               f"train.cuda_graphs must be auto, on/true or off/false, got {self.cuda_graphs!r}")
        _check(self.threads >= 0, f"train.threads must be >= 0 (0: automatic), got {self.threads}")
        _check(not self.init_from or os.path.exists(self.init_from),
               f"train.init_from: no such file or run directory {self.init_from!r}")


@dataclass
class EvalConfig:
    #: evaluate every this many steps (and at the end), >= 1
    every: int = 250
    #: held-out samples per evaluation, >= 1
    samples: int = 1000
    #: stop once the task's metric reaches this value (none: never)
    target: Optional[float] = None

    def __post_init__(self):
        _check(self.every >= 1, f"eval.every must be >= 1, got {self.every}")
        _check(self.samples >= 1, f"eval.samples must be >= 1, got {self.samples}")
        if self.target is not None:
            _finite(self.target, "eval.target")


@dataclass
class CheckpointConfig:
    #: write a checkpoint every this many steps (and on SIGTERM/SIGINT), >= 1
    every: int = 500
    #: step checkpoints kept, >= 1 (best.pt is kept apart)
    keep: int = 2
    #: continue the run in log.name from its newest good checkpoint; false refuses a
    #: directory that holds a run (see log.overwrite)
    resume: bool = True

    def __post_init__(self):
        _check(self.every >= 1, f"checkpoint.every must be >= 1, got {self.every}")
        _check(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class GuardConfig:
    #: skip loss spikes and roll back when they repeat: true or false
    enabled: bool = True
    #: steps in the running median a spike is measured against, >= 4
    window: int = 50
    #: a spike is a loss above this many times the median, > 1
    factor: float = 4.0
    #: and at least this much above it (loss units), >= 0
    min_delta: float = 0.1
    #: spikes within one log window that trigger a rollback, >= 1
    max_spikes: int = 3
    #: the lr is multiplied by this at each rollback, in (0, 1]
    lr_backoff: float = 0.5
    #: steps between rollback snapshots while no spike is seen, >= 1
    snapshot_every: int = 100

    def __post_init__(self):
        for key in ("factor", "min_delta", "lr_backoff"):
            _finite(getattr(self, key), f"guard.{key}")
        _check(self.window >= 4, f"guard.window must be >= 4, got {self.window}")
        _check(self.factor > 1, f"guard.factor must be > 1, got {self.factor}")
        _check(self.min_delta >= 0, f"guard.min_delta must be >= 0, got {self.min_delta}")
        _check(self.max_spikes >= 1, f"guard.max_spikes must be >= 1, got {self.max_spikes}")
        _check(0 < self.lr_backoff <= 1, "guard.lr_backoff must be in (0, 1]")
        _check(self.snapshot_every >= 1,
               f"guard.snapshot_every must be >= 1, got {self.snapshot_every}")


@dataclass
class LogConfig:
    #: the folder run directories are made in
    out_dir: str = "runs"
    #: the run directory's name (default: task and start time)
    name: str = ""
    #: log training metrics every this many steps, >= 1 (a host sync each)
    every: int = 25
    #: show the progress line: true or false
    progress: bool = True
    #: trace steps 8-12 with torch.profiler into RUN/profile: true or false (eager steps,
    #: or the captured step's replays with train.cuda_graphs=on); while profiling, each
    #: step ends with a GPU sync, so the trace holds those steps' kernels and no others'
    #: still queued
    profile: bool = False
    #: sample GPU utilisation, memory and power through NVML: true or false
    nvml: bool = True
    #: a run already in log.name is moved aside to NAME.old-K and a new one starts
    overwrite: bool = False

    def __post_init__(self):
        _check(self.every >= 1, f"log.every must be >= 1, got {self.every}")
        _check(bool(self.out_dir), "log.out_dir must not be empty")
        _check("/" not in self.name and self.name not in (".", ".."),
               f"log.name must be a plain folder name, got {self.name!r}")


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
        raise ConfigError(f"{key} expects {tp.__name__}, got {type(text).__name__} {text!r}")
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
        raise ConfigError(f"{key} expects {tp.__name__}, got {text!r}") from None


def _unknown(key: str, task_cls=None) -> ConfigError:
    close = difflib.get_close_matches(key, known_keys(task_cls), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else "; see --help for every key"
    where = f" (task {task_cls.name!r})" if task_cls is not None and key.startswith("task.") else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


def _read_file(path: str) -> Dict[str, Any]:
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML; use TOML instead") from None
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
            raise ConfigError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    return values


def task_class(values: Dict[str, Any]) -> Type:
    name = values.get("task.name", TaskConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"task.name expects str, got {type(name).__name__} {name!r}")
    return resolve(name)


def build_config(file: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults, then ``file``, then ``key=value`` overrides; every value type-checked."""
    values = _gather(file, overrides)
    preset = values.get("model.preset")
    if isinstance(preset, str) and preset in PRESETS:
        for key, value in PRESETS[preset].items():
            values.setdefault(f"model.{key}", value)
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


def field_docs(cls) -> Dict[str, str]:
    """The ``#:`` comment above each field of the dataclass ``cls`` (and of its bases),
    joined into one line: the description ``--help`` shows."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (a class built at run time)
            continue
        pending: List[str] = []
        for line in source.splitlines():
            text = line.strip()
            if text.startswith("#:"):
                pending.append(text[2:].strip())
                continue
            m = _FIELD.match(line)
            if m and pending:
                docs[m.group(1)] = " ".join(pending)
            pending = []
    return docs


_FIELD = re.compile(r"^\s{4}(\w+)\s*:")


def help_text(argv: Optional[List[str]] = None) -> str:
    """Every option with its type, default and a one-line description with its allowed
    values; the task section is that of the task named by ``task.name=...`` in ``argv``
    (the default task otherwise)."""
    names = [a.split("=", 1)[1] for a in argv or [] if a.startswith("task.name=")]
    task_cls = resolve(names[-1] if names else TaskConfig.name)
    lines = ["usage: python -m fastlab.train [CONFIG.toml|.yaml] [section.key=value ...]", "",
             f"options: key, type, default, what it does; task.* are those of task "
             f"{task_cls.name!r} (task.name=X --help lists X's)"]
    sections = _sections(task_cls)
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        defaults = dataclasses.asdict(cls())
        docs = field_docs(cls)
        if section == "task" and names:
            defaults["name"] = names[-1]
        lines.append("")
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            name = getattr(tp, "__name__", str(tp).replace("typing.", ""))
            key = f"{section}.{f.name}"
            lines.append(f"  {key:<24} {name:<6} {defaults[f.name]!r:<12} "
                         f"{docs.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def save_config(cfg: Config, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    os.replace(tmp, path)
