"""Cross-entropy over the last dimension of the logits, with torch's argument names."""
import torch
import torch.nn.functional as F


def cross_entropy_ref(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                      label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Plain-PyTorch cross-entropy computed in float32, loss returned in float32."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(logits, target.reshape(-1), ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    return cross_entropy_ref(logits, target, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, reduction=reduction)
