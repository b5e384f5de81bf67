"""How close a student's embeddings are to a teacher's: MSE, normalised MSE and cosine.

Layout. ``student`` and ``teacher`` are ``(..., D)``: every leading index is one embedding
row (a token, a sequence). ``mask`` is an optional bool ``(...)`` of the leading shape that
selects the rows a metric averages over (True = counted); distillation logs each metric
over all rows and over the rows that were not masked for the student, with the fraction of
counted rows (``mask_mean``) beside them.

Numerics. Sums accumulate in float32 for bf16/fp16 inputs (float64 for float64). Masks
weight rows by 0/1 instead of indexing them, so nothing reads a count from the device and
a metric can be captured in a CUDA graph; a mask that selects no row gives NaN (0 / 0), not
a silent 0. The functions are differentiable in ``student`` (usable as losses);
:func:`distill_metrics` detaches, it is for logging.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

#: keeps the cosine of a zero row finite (0) instead of 0 / 0
COSINE_EPS = 1e-8


def _rows(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor]
          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked (rows, D) views of both inputs in the accumulation dtype, and the (rows,)
    0/1 weight of each row."""
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have an embedding dimension (..., D), got a 0-dim "
                             f"tensor")
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    acc = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    dim = student.shape[-1]
    s = student.reshape(-1, dim).to(acc)
    t = teacher.reshape(-1, dim).to(acc)
    if mask is None:
        return s, t, s.new_ones(s.shape[0])
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != student.shape[:-1]:
        raise ValueError(f"mask must have the rows' shape {tuple(student.shape[:-1])} "
                         f"(student.shape[:-1]), got {tuple(mask.shape)}")
    return s, t, mask.reshape(-1).to(acc)


def mse(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor] = None
        ) -> torch.Tensor:
    """Mean squared error over every element of the counted rows (0-dim)."""
    s, t, w = _rows(student, teacher, mask)
    return (w * (s - t).square().sum(-1)).sum() / (w.sum() * s.shape[1])


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE divided by the teacher's variance: ``sum ||s - t||^2 / sum ||t - mean(t)||^2``
    over the counted rows (0-dim).

    This is the fraction of the teacher's variance the student leaves unexplained (1 - R^2):
    0 is a perfect match, 1 is no better than predicting the teacher's mean row, whatever
    the scale of the embeddings. ``mean(t)`` is the mean counted row.
    """
    s, t, w = _rows(student, teacher, mask)
    mean_row = (w[:, None] * t).sum(0) / w.sum()
    spread = (w * (t - mean_row).square().sum(-1)).sum()
    return (w * (s - t).square().sum(-1)).sum() / spread


def cosine(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor] = None
           ) -> torch.Tensor:
    """Mean over the counted rows of the cosine similarity of each student row with its
    teacher row (0-dim); a zero row has cosine 0."""
    s, t, w = _rows(student, teacher, mask)
    per_row = F.cosine_similarity(s, t, dim=-1, eps=COSINE_EPS)
    return (w * per_row).sum() / w.sum()


def mask_mean(mask: torch.Tensor) -> torch.Tensor:
    """The fraction of rows a bool ``mask`` counts (float32, 0-dim)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    return mask.float().mean()


@torch.no_grad()
def distill_metrics(student: torch.Tensor, teacher: torch.Tensor,
                    mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Every metric of this module for logging (detached 0-dim tensors).

    Returns ``mse``, ``nmse`` and ``cosine`` over all rows and, with a ``mask``, also
    ``mse/mask``, ``nmse/mask``, ``cosine/mask`` over the rows it counts and ``mask_mean``.
    """
    out = {"mse": mse(student, teacher), "nmse": normalized_mse(student, teacher),
           "cosine": cosine(student, teacher)}
    if mask is not None:
        out["mse/mask"] = mse(student, teacher, mask)
        out["nmse/mask"] = normalized_mse(student, teacher, mask)
        out["cosine/mask"] = cosine(student, teacher, mask)
        out["mask_mean"] = mask_mean(mask)
    return out
