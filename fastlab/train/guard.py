"""Loss-spike guard: flag bad steps on the device, roll back when spikes repeat.

Per step, without a host sync (and so inside a captured CUDA graph): a loss that is
non-finite, or above ``factor`` times the median of the last ``window`` good losses and at
least ``min_delta`` above it, marks the step bad (the absolute margin keeps the ordinary
noise of a nearly solved task, 1e-4 next to a median of 2e-5, from counting as a spike).
:meth:`SpikeGuard.check` returns that flag as a device tensor; the stepper hands it to the
optimizer, which then leaves every parameter and state as it was. Only good losses enter
the window; the window, its position and the counts are all device tensors.

At each log step (where the host syncs anyway) the trainer polls the count of bad steps;
``max_spikes`` or more since the last poll roll the model and optimizer back, in place,
to the last snapshot (taken every ``snapshot_every`` steps while no spike was seen, and
right after a resume) and multiply the learning rate by ``lr_backoff`` (a device scalar
the step reads). Restoring in place keeps every tensor's address, so a captured step goes
on without being captured again.

The optimizer also skips updates on its own: on non-finite gradients, or on fp16 overflow.
Those skips not caused by a spike are polled and reported apart from the spikes and never
trigger a rollback. A checkpoint holds the counts not yet polled, so a resumed run
reports what the uninterrupted run would.
"""
from typing import Any, Dict, List, Optional

import torch

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch built without distributed
    _DTensor = None


class SpikeGuard:
    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.history = torch.full((cfg.window,), float("nan"), device=device)
        #: steps checked so far (the window's write position is this modulo its size)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.lr_scale = torch.ones((), dtype=torch.float32, device=device)
        self.rollbacks = 0
        self.snapshot: Optional[List[torch.Tensor]] = None
        self.snapshot_step = -1

    def check(self, loss: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool device tensor: whether this step's ``loss`` (a mean) is bad."""
        loss = loss.detach().float()
        median = self.history.nanmedian()
        warm = self.seen >= self.cfg.window // 2
        spike = warm & (loss > self.cfg.factor * median) & (loss > median + self.cfg.min_delta)
        bad = ~torch.isfinite(loss) | spike
        slot = (self.seen % self.cfg.window).view(1)
        kept = torch.where(bad, self.history.index_select(0, slot), loss)
        self.history.index_copy_(0, slot, kept)
        self.seen += 1
        self.bad_steps += bad
        return bad

    def count_skipped(self, skipped: torch.Tensor, bad: Optional[torch.Tensor]) -> None:
        """Count an optimizer skip (0-dim device flag) unless this step's spike caused it."""
        skipped = skipped.bool() if bad is None else skipped.bool() & ~bad
        self.skipped_steps += skipped

    def poll(self) -> Dict[str, int]:
        """Spikes and optimizer skips since the last poll. One host read: a log step's."""
        spikes, skipped = torch.stack([self.bad_steps, self.skipped_steps]).tolist()
        self.bad_steps.zero_()
        self.skipped_steps.zero_()
        return {"spikes": spikes, "skipped": skipped}

    def forget(self) -> None:
        """Empty the window (in place: a captured step keeps reading it). After a change of
        difficulty or a rollback the old losses are no measure: a harder level's first
        losses would all count as spikes, and the run would freeze rolling back."""
        self.history.fill_(float("nan"))
        self.seen.zero_()

    # --- snapshot and rollback ---------------------------------------------------------
    def take_snapshot(self, step: int, tensors: List[torch.Tensor]) -> None:
        """Copy ``tensors`` (parameters and optimizer state) into the snapshot, reusing
        its buffers when their shapes match."""
        if self.snapshot is None or [t.shape for t in self.snapshot] != [
                t.shape for t in tensors]:
            self.snapshot = [torch.empty_like(t) for t in tensors]
        _copy_all(self.snapshot, tensors)
        self.snapshot_step = step

    def roll_back(self, tensors: List[torch.Tensor]) -> None:
        """Write the snapshot back into ``tensors`` in place; lower the learning rate."""
        if [t.shape for t in tensors] != [t.shape for t in self.snapshot]:
            raise RuntimeError("the parameters or optimizer state changed shape since the "
                               "guard's snapshot; cannot roll back")
        _copy_all(tensors, self.snapshot)
        self.lr_scale.mul_(self.cfg.lr_backoff)
        self.rollbacks += 1
        self.forget()

    def state_dict(self) -> Dict[str, Any]:
        # copies: on a CPU device .cpu() would alias tensors that later steps update in place
        copy = lambda t: t.to("cpu", copy=True)  # noqa: E731
        return {"history": copy(self.history), "seen": copy(self.seen),
                "bad_steps": copy(self.bad_steps), "skipped_steps": copy(self.skipped_steps),
                "lr_scale": float(self.lr_scale), "rollbacks": self.rollbacks}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.history.copy_(state["history"])
        self.seen.fill_(int(state["seen"]))
        self.bad_steps.fill_(int(state["bad_steps"]))
        self.skipped_steps.fill_(int(state["skipped_steps"]))
        self.lr_scale.fill_(state["lr_scale"])
        self.rollbacks = state["rollbacks"]


@torch.no_grad()
def _copy_all(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all i, as multi-tensor copies grouped by device and
    dtype (a few launches for a model's tensors, not one each). Sharded (DTensor) pairs,
    which have no multi-tensor copy, copy their local shards: a snapshot is made by
    ``empty_like`` of the tensor it saves, so the two are sharded alike."""
    groups: Dict[tuple, tuple] = {}
    for d, s in zip(dst, src):
        d, s = _local(d), _local(s)
        pair = groups.setdefault((d.device, d.dtype, s.dtype), ([], []))
        pair[0].append(d)
        pair[1].append(s)
    for d, s in groups.values():
        torch._foreach_copy_(d, s)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of its storage); any other tensor itself."""
    return t.to_local() if _DTensor is not None and isinstance(t, _DTensor) else t
