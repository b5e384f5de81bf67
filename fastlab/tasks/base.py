"""What the trainer needs from a task: batches, a model, an evaluation."""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn


class Task:
    """A built-in task. The global batch of a step is a pure function of (seed, step), so a
    resumed run sees exactly the data it would have seen; ranks take disjoint slices."""

    name: str = "task"
    #: the metric evaluation reports and early stopping and the "best" checkpoint use
    metric: str = "accuracy"

    def build_model(self, model_cfg) -> nn.Module:
        raise NotImplementedError

    def batch(self, step: int, batch_size: int, device: torch.device, seed: int = 0
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, n_samples: int, device: torch.device) -> Dict[str, float]:
        raise NotImplementedError

    # --- curriculum hook: a task may change its difficulty from its metrics ---------------
    def curriculum(self, metrics: Dict[str, float]) -> Optional[str]:
        """Called by the trainer after every evaluation with its metrics; returns a
        description of the change when the task made itself harder (or easier), else None.
        Batch shapes must stay fixed across levels (compiled and graph-captured steps)."""
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


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator whose state depends only on (seed, step)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + step)
    return g
