"""``CrossEntropyLoss``: torch's module over :func:`fastlab.ops.cross_entropy`."""
from typing import Optional

import torch
from torch import nn
from torch.nn import _reduction

from fastlab.ops.cross_entropy import cross_entropy, validate


class CrossEntropyLoss(nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` with the classes on the last dimension
    of the input, exact for confident targets (see :func:`fastlab.ops.cross_entropy`).

    Takes torch's constructor arguments; per-class ``weight`` is not supported. Extra
    keywords: ``z_loss``, ``return_z_loss``, ``inplace_backward``, ``check_targets``.
    """

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None,
                 ignore_index: int = -100, reduce=None, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 return_z_loss: bool = False, inplace_backward: bool = False,
                 check_targets: Optional[bool] = None):
        super().__init__()
        if weight is not None:
            raise ValueError("weight (per-class rescaling) is not supported by "
                             "fastlab.nn.CrossEntropyLoss; pass weight=None")
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        probe = torch.empty(0, 1)
        validate(probe, probe.long().reshape(0), ignore_index, label_smoothing, reduction,
                 z_loss)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.z_loss = float(z_loss)
        self.return_z_loss = return_z_loss
        self.inplace_backward = inplace_backward
        self.check_targets = check_targets

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return cross_entropy(input, target, ignore_index=self.ignore_index,
                             label_smoothing=self.label_smoothing, reduction=self.reduction,
                             z_loss=self.z_loss, inplace_backward=self.inplace_backward,
                             return_z_loss=self.return_z_loss,
                             check_targets=self.check_targets)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}")
