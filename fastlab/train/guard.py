"""Loss-spike guard: skip bad updates on the device, roll back when spikes repeat.

Per step, without a host sync: a loss that is non-finite, or above ``factor`` times the
median of the last ``window`` good losses and at least ``min_delta`` above it, marks the
step bad (the absolute margin keeps the ordinary noise of a nearly solved task, 1e-4 next
to a median of 2e-5, from counting as a spike); the trainer then multiplies
the loss it backpropagates by NaN, so the gradients are non-finite and the optimizer (or
the grad scaler) skips the update for every parameter. Only good losses enter the window.

At each log step (where the host syncs anyway) the trainer polls the count of bad steps;
``max_spikes`` or more since the last poll roll the model and optimizer back to the last
in-memory snapshot (taken every ``snapshot_every`` steps while no spike was seen) and
multiply the learning rate by ``lr_backoff``.

The optimizer also skips updates on its own: fastlab's AdamW when the gradient norm is
not finite, the fp16 grad scaler on overflow. The trainer hands the guard each step's skip
flag (on the device); those not caused by a spike are polled and reported apart from the
spikes and never trigger a rollback.

A checkpoint holds the counts not yet polled, so a resumed run reports what the
uninterrupted run would. The snapshot stays in memory only: after a resume, a rollback goes
to the last snapshot taken since the resume.
"""
import copy
from typing import Any, Dict, Optional

import torch


class SpikeGuard:
    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.history = torch.full((cfg.window,), float("nan"), device=device)
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.slot = 0
        self.seen = 0
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.snapshot: Optional[Dict[str, Any]] = None
        self.snapshot_step = -1

    def check(self, loss: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool tensor: whether this step's ``loss`` (detached) is a spike."""
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss)
        if self.seen >= self.cfg.window // 2:
            median = self.history.nanmedian()
            bad = bad | ((loss > self.cfg.factor * median)
                         & (loss > median + self.cfg.min_delta))
        self.history[self.slot] = torch.where(bad, self.history[self.slot], loss)
        self.slot = (self.slot + 1) % self.cfg.window
        self.seen += 1
        self.bad_steps += bad
        return bad

    def count_skipped(self, skipped: Optional[torch.Tensor],
                      bad: Optional[torch.Tensor]) -> None:
        """Count an optimizer skip (0-dim device flag) unless this step's spike caused it."""
        if skipped is None:
            return
        skipped = skipped.bool() if bad is None else skipped.bool() & ~bad
        self.skipped_steps += skipped

    def poll(self) -> int:
        """Bad steps since the last poll. Reads a device value: call at a log step only."""
        count = int(self.bad_steps)
        self.bad_steps.zero_()
        return count

    def poll_skipped(self) -> int:
        """Optimizer skips (not spikes) since the last poll; a log-step read like ``poll``."""
        count = int(self.skipped_steps)
        self.skipped_steps.zero_()
        return count

    def take_snapshot(self, step: int, state: Dict[str, Any]) -> None:
        self.snapshot = {k: copy.deepcopy(v) for k, v in state.items()}
        self.snapshot_step = step

    def state_dict(self) -> Dict[str, Any]:
        # copies: on a CPU device .cpu() would alias tensors that later steps update in place
        return {"history": self.history.to("cpu", copy=True), "slot": self.slot,
                "seen": self.seen, "bad_steps": self.bad_steps.to("cpu", copy=True),
                "skipped_steps": self.skipped_steps.to("cpu", copy=True),
                "lr_scale": self.lr_scale, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.history.copy_(state["history"])
        self.slot, self.seen = state["slot"], state["seen"]
        # checkpoints written before these counts were saved resume with none pending
        self.bad_steps.fill_(state.get("bad_steps", 0))
        self.skipped_steps.fill_(state.get("skipped_steps", 0))
        self.lr_scale, self.rollbacks = state["lr_scale"], state["rollbacks"]
