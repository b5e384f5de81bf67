"""Drop-in optimizers and learning-rate schedules."""
from fastlab.optim.schedules import SCHEDULES, lr_multiplier

__all__ = ["SCHEDULES", "lr_multiplier"]
