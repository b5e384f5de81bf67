"""Ragged pooling modules: characters into words, words into sentences, and back."""
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from fastlab.ops.segment_pool import REDUCTIONS, hierarchical_pool, segment_broadcast


class HierarchicalPool(nn.Module):
    """Pools ragged rows through several levels of units, and broadcasts them back.

    ``forward(x, level_offsets)`` returns every pooled level (see
    :func:`fastlab.ops.hierarchical_pool`); ``unpool(y, offsets, base=...)`` repeats each
    unit's vector over its rows (see :func:`fastlab.ops.segment_broadcast`), the decoder side.

    Args:
        reduce: one of "sum", "mean", "max", "min", "first", "last" for every level, or
            one per level.
        causal: unpool each unit from the previous unit's vector (shift by one), so a
            decoder never sees the unit it reconstructs.
        validate: also check offsets' values on CUDA (one host sync per call); CPU always
            checks.
    """

    def __init__(self, reduce: Union[str, Sequence[str]] = "mean", *, causal: bool = False,
                 validate: bool = False):
        super().__init__()
        names = [reduce] if isinstance(reduce, str) else list(reduce)
        bad = [name for name in names if name not in REDUCTIONS]
        if not names or bad:
            raise ValueError(f"reduce must be one of {REDUCTIONS} (or a non-empty sequence of "
                             f"them), got {reduce!r}")
        self.reduce = reduce if isinstance(reduce, str) else tuple(names)
        self.causal = causal
        self.validate = validate

    def forward(self, x: torch.Tensor, level_offsets: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return hierarchical_pool(x, level_offsets, self.reduce, validate=self.validate)

    def unpool(self, y: torch.Tensor, offsets: torch.Tensor, total: Optional[int] = None,
               base: Optional[torch.Tensor] = None) -> torch.Tensor:
        return segment_broadcast(y, offsets, total, int(self.causal), base,
                                 validate=self.validate)

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}, causal={self.causal}, validate={self.validate}"
