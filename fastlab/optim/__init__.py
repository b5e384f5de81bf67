"""Drop-in optimizers and learning-rate schedules."""
from fastlab.optim.adamw import AdamW
from fastlab.optim.schedules import SCHEDULES, lr_multiplier

__all__ = ["AdamW", "SCHEDULES", "lr_multiplier"]
