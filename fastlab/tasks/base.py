"""What the trainer needs from a task: its config, model, batches, loss and evaluation.

A task owns everything that is specific to an experiment; the trainer computes nothing of
its own. Its contract:

- ``Config``: a dataclass deriving from :class:`TaskConfig`; its fields are the
  ``task.<field>`` options (``--help`` lists those of the selected ``task.name``), checked
  in ``__post_init__`` with errors that name the option.
- ``batch(step, batch_size, device, seed)``: the global batch of ``step`` as a dict of
  tensors whose first dimension is the batch. ``step`` is a 0-dim int64 tensor on
  ``device``; the batch must be a pure function of (seed, step) computed on the device
  without host syncs (the trainer captures it in a CUDA graph with the rest of the step
  and advances ``step`` there), so a resumed run sees exactly the data it would have seen.
  :func:`counter_uniform` gives such random numbers. Ranks and micro-batches take slices.
- ``loss(model, batch)``: a :class:`LossOutput`: the loss summed over the units it is
  normalised by, their count, and named sub-losses. Sums, not means, so that gradient
  accumulation and ranks weight every unit alike.
- ``evaluate(model, n_samples, device)``: a dict of metrics; ``metric`` names the one early
  stopping and ``best.pt`` use (higher is better).
- Curriculum: ``curriculum(metrics)`` may change the difficulty after an evaluation;
  batch shapes must stay fixed. State that changes must live in device tensors the batch
  reads (updated in place) or the change must be reported, so the trainer recaptures.
- ``state_dict`` / ``load_state_dict``: whatever a checkpoint needs to resume the task.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn


#: the seed of validation-loss batches (see :meth:`Task.validation_loss`)
VALIDATION_SEED = 0x7A11DA7E


class ConfigError(ValueError):
    """A configuration the run cannot use, found at parse time or when the run sets up;
    ``python -m fastlab.train`` prints it as one ``error:`` line and exits with status 2."""


def check_option(cond: bool, message: str) -> None:
    """Reject a bad option value with a ConfigError naming it (configs' ``__post_init__``)."""
    if not cond:
        raise ConfigError(message)


@dataclass
class TaskConfig:
    """Base of every task's config: ``task.name`` selects the task (a registered name or
    ``package.module:Class``)."""

    #: the task: a registered name (addition, ...) or package.module:Class
    name: str = "addition"


#: a sub-loss: a sum normalised by the loss's own count, or a (sum, count) pair of its own
SubLoss = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LossOutput:
    """``total``: fp32 0-dim sum of the loss; ``count``: the number of units (tokens,
    examples) it is normalised by; ``parts``: named sub-losses, logged as ``name`` (e.g.
    ``reconstruction/0``), each the sum over ``count`` units or a (sum, count) pair."""

    total: torch.Tensor
    count: torch.Tensor
    parts: Dict[str, SubLoss] = field(default_factory=dict)


class Task:
    """Base class of a task (see the module docstring for the contract)."""

    name: str = "task"
    Config = TaskConfig
    #: the metric evaluation reports and early stopping and ``best.pt`` use
    metric: str = "accuracy"
    #: tokens (or units) per sample, for tokens/s and MFU; None when not meaningful
    seq_len: Optional[int] = None

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    def build_model(self, model_cfg) -> nn.Module:
        raise NotImplementedError

    def batch(self, step: torch.Tensor, batch_size: int, device: torch.device,
              seed: int = 0) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, n_samples: int, device: torch.device
                 ) -> Dict[str, float]:
        raise NotImplementedError

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, n_samples: int, device: torch.device
                        ) -> Dict[str, float]:
        """The loss (and each sub-loss) over ``n_samples`` samples of batches drawn with
        :data:`VALIDATION_SEED`, a seed no default run trains with: ``{"val_loss": ...}``.
        A task with a held-out split of its own may override it."""
        was_training = model.training
        model.eval()
        total = count = 0.0
        per_batch = min(n_samples, 1024)
        for i in range(-(-n_samples // per_batch)):  # host syncs: outside training
            batch = self.batch(torch.tensor(i, device=device), per_batch, device,
                               seed=VALIDATION_SEED)
            out = self.loss(model, batch)
            total += float(out.total)
            count += float(out.count)
        model.train(was_training)
        return {"val_loss": total / max(count, 1.0)}

    # --- generative tasks: what ``python -m fastlab.sample`` needs ---------------------
    def encode_text(self, text: str) -> torch.Tensor:
        """A prompt written as text -> its token ids (1-D int64)."""
        raise ConfigError(f"task {self.name!r} has no text form for its prompts")

    def decode_text(self, ids: torch.Tensor) -> str:
        """Token ids (1-D) -> text."""
        raise ConfigError(f"task {self.name!r} has no text form for its tokens")

    def example_prompts(self, n: int, device: torch.device):
        """``n`` held-out prompts (n, S) and the expected completion of each as text."""
        raise ConfigError(f"task {self.name!r} has no prompts to sample from")

    # --- curriculum hook: a task may change its difficulty from its metrics ---------------
    def curriculum(self, metrics: Dict[str, float]) -> Optional[str]:
        """Called after every evaluation; returns a description of the change when the task
        made itself harder (or easier), else None."""
        return None

    @property
    def curriculum_done(self) -> bool:
        """False while the task is below its final difficulty: the trainer then neither
        stops early on the target metric nor keeps a "best" checkpoint."""
        return True

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint must hold to resume the task exactly (the curriculum level)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


# --- counter-based random numbers --------------------------------------------------------
# A hash of (seed, stream, step, index) instead of a generator's state: any element of any
# step's batch is computed directly on the device, there is no finite pool to repeat, and
# the step may be a device tensor advanced inside a CUDA graph. int64 arithmetic on values
# below 2**32 with multipliers below 2**31 never overflows, so CPU and CUDA agree bit for bit.
_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer finaliser (xorshift-multiply, two rounds) on values < 2**32: int64
    tensors or Python ints."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def counter_bits(seed: int, stream: int, step: torch.Tensor, index: torch.Tensor
                 ) -> torch.Tensor:
    """Uniform 32-bit values (int64) for each ``index`` (int64 tensor, values < 2**32) of
    ``step`` (int64 tensor broadcast against it) in random stream ``stream``."""
    key = _mix32((seed * 0x9E3779B1 + stream * 0x85EBCA77) & _M32)
    x = _mix32((step.to(torch.int64) & _M32) ^ key)
    return _mix32(x ^ (index & _M32))


def counter_uniform(seed: int, stream: int, step: torch.Tensor, shape: Tuple[int, ...],
                    high: int, device: torch.device) -> torch.Tensor:
    """int64 tensor of ``shape`` with values uniform in [0, ``high``), a pure function of
    (seed, stream, step); ``high`` <= 2**16 keeps the modulo bias below 2**-16."""
    if not 1 <= high <= 1 << 16:
        raise ValueError(f"high must be in [1, 65536], got {high}")
    numel = 1
    for n in shape:
        numel *= n
    index = torch.arange(numel, device=device, dtype=torch.int64).view(shape)
    return counter_bits(seed, stream, step, index) % high
