"""Learning-rate schedules as multipliers of the base lr, usable with ``LambdaLR``.

All start with a linear warm-up from 0 over ``warmup_steps`` (the BERT recipe), then:
``linear`` decays to ``min_ratio`` at ``total_steps``, ``cosine`` follows a half cosine to
``min_ratio``, ``inverse_sqrt`` decays as sqrt(warmup / step), ``constant`` stays at 1.

The multiplier takes the step as a Python int (returns a float) or as a 0-dim tensor
(returns a float64 tensor on its device, computed there without a host sync), so a trainer
can keep its step counter and its lr on the device, inside a captured CUDA graph. Both go
through the same float64 arithmetic.
"""
import math
from typing import Callable, Union

import torch

SCHEDULES = ("linear", "cosine", "inverse_sqrt", "constant")

Step = Union[int, torch.Tensor]


def lr_multiplier(name: str, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.0) -> Callable[[Step], Union[float, torch.Tensor]]:
    """``f(step) -> multiplier`` for the named schedule (``step`` counts from 0)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, "
                         f"{warmup_steps}")
    decay_steps = max(1, total_steps - warmup_steps)

    def after_warmup(step: torch.Tensor) -> torch.Tensor:
        if name == "constant":
            return torch.ones_like(step)
        if name == "inverse_sqrt":
            return (max(warmup_steps, 1) / (step + 1)).sqrt().clamp(min=min_ratio)
        progress = ((step - warmup_steps) / decay_steps).clamp(max=1.0)
        if name == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + torch.cos(math.pi * progress))

    def multiplier(step: Step):
        t = torch.as_tensor(step).to(torch.float64)
        warm = (t + 1) / warmup_steps if warmup_steps else torch.ones_like(t)
        value = torch.where(t < warmup_steps, warm, after_warmup(t))
        return value if isinstance(step, torch.Tensor) else float(value)

    return multiplier
