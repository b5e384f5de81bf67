"""Learning-rate schedules as multipliers of the base lr, usable with ``LambdaLR``.

All start with a linear warm-up from 0 over ``warmup_steps`` (the BERT recipe), then:
``linear`` decays to ``min_ratio`` at ``total_steps``, ``cosine`` follows a half cosine to
``min_ratio``, ``inverse_sqrt`` decays as sqrt(warmup / step), ``constant`` stays at 1.
"""
import math
from typing import Callable

SCHEDULES = ("linear", "cosine", "inverse_sqrt", "constant")


def lr_multiplier(name: str, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.0) -> Callable[[int], float]:
    """``f(step) -> multiplier`` for the named schedule (``step`` counts from 0)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, "
                         f"{warmup_steps}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        if name == "inverse_sqrt":
            return max(min_ratio, math.sqrt(max(warmup_steps, 1) / (step + 1)))
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
