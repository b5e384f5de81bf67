"""Soft CCA: two views pulled together while each is softly decorrelated (Chang et al.,
"Scalable and Effective Deep CCA via Soft Decorrelation", CVPR 2018).

Exact deep CCA whitens each view every step (an inverse or SVD); Soft CCA replaces that
constraint by a loss, the Stochastic Decorrelation Loss (SDL), optimised jointly with the
distance between the views. One mini-batch's covariance is too noisy to decorrelate
against, so SDL keeps a running covariance that forgets old batches by a factor ``alpha``:

    C_batch = Z^T Z / (m - 1)              Z: the batch's features (m, D), standardised
    A_t     = alpha * A_{t-1} + C_batch    running sum, A_0 = 0
    n_t     = alpha * n_{t-1} + 1          its weight, n_0 = 0
    SDL_t   = sum_{i != j} |A_t / n_t|_ij  the off-diagonal L1 norm

Gradients flow through this step's ``C_batch`` only; ``A_{t-1}`` is a constant of past
batches. Standardising each feature over the batch (batch normalisation without affine
parameters) makes ``C_batch`` a correlation matrix, so SDL cannot be lowered by shrinking
the features, and the distance term cannot be lowered by collapsing both views to zero.
The Soft CCA loss is

    distance + lam * (SDL(x) + SDL(y)),   distance = mean over rows of ||z_x - z_y||^2

(the paper's squared Frobenius distance divided by the batch size, so ``lam`` does not
depend on it). Features are ``(..., D)``, leading dims flattened to rows; the running
statistics accumulate in float32.
"""
from typing import NamedTuple, Tuple

import torch
from torch import nn


def _standardized(z: torch.Tensor, standardize: bool, eps: float) -> torch.Tensor:
    """(rows, D) in at least float32, centred over the rows and, when asked, scaled to unit
    (unbiased) variance, ``eps`` guarding a constant feature."""
    rows = z.reshape(-1, z.shape[-1])
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    rows = rows - rows.mean(0)
    if standardize:
        rows = rows * torch.rsqrt(rows.square().sum(0) / (rows.shape[0] - 1) + eps)
    return rows


def _check_features(name: str, z: torch.Tensor, dim: int) -> None:
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{getattr(z, 'dtype', type(z).__name__)}")
    if z.dim() < 1 or z.shape[-1] != dim:
        raise ValueError(f"{name} must be (..., {dim}), got shape {tuple(z.shape)}")
    if z.numel() // dim < 2:
        raise ValueError(f"{name} needs at least 2 rows for a covariance, got shape "
                         f"{tuple(z.shape)}")


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _sdl(rows: torch.Tensor, running_cov: torch.Tensor, running_weight: torch.Tensor,
         alpha: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch_cov = rows.T @ rows / (rows.shape[0] - 1)
    cov_sum = alpha * running_cov.to(batch_cov.dtype) + batch_cov
    weight = alpha * running_weight.to(batch_cov.dtype) + 1.0
    off_diagonal = ~torch.eye(rows.shape[1], dtype=torch.bool, device=rows.device)
    loss = (cov_sum / weight).abs().mul(off_diagonal).sum()
    return loss, cov_sum.detach(), weight.detach()


def sdl_loss(z: torch.Tensor, running_cov: torch.Tensor, running_weight: torch.Tensor,
             alpha: float, *, standardize: bool = True, eps: float = 1e-5
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Stochastic Decorrelation Loss of one step (see the module docstring).

    ``z`` ``(..., D)``: the features; ``running_cov`` ``(D, D)`` and ``running_weight``
    (0-dim): ``A_{t-1}`` and ``n_{t-1}`` (zeros before the first step). Returns
    ``(loss, A_t, n_t)``, the new state detached. Functional: the caller keeps the state;
    :class:`SoftCCALoss` keeps it in buffers.
    """
    dim = running_cov.shape[-1]
    _check_features("z", z, dim)
    if running_cov.shape != (dim, dim) or running_weight.dim() != 0:
        raise ValueError(f"running_cov must be (D, D) and running_weight 0-dim, got "
                         f"{tuple(running_cov.shape)} and {tuple(running_weight.shape)}")
    _check_alpha(alpha)
    return _sdl(_standardized(z, standardize, eps), running_cov, running_weight, alpha)


class SoftCCAOutput(NamedTuple):
    """``loss`` = ``distance`` + lam * ``decorrelation``, where ``decorrelation`` is
    SDL(x) + SDL(y)."""

    loss: torch.Tensor
    distance: torch.Tensor
    decorrelation: torch.Tensor


class SoftCCALoss(nn.Module):
    """The Soft CCA loss of two views ``(..., dim)``, SDL's running state in buffers
    (``cov_x``, ``cov_y``: A_t of each view; ``cov_weight``: n_t), so the state_dict carries
    it and a resumed run continues it.

    In training mode every call advances the running covariances; in eval mode they are read
    (the batch still enters the loss) but not changed, as batch norm does. Buffers are
    updated in place, so the loss can run inside a captured step.

    Args:
        dim: the features' dimension.
        alpha: forgetting factor of the running covariances in [0, 1]: 0 uses the batch
            only, 1 averages every batch seen with equal weight.
        lam: weight of the decorrelation terms against the distance.
        standardize: standardise each feature over the batch first; False only centres,
            for features that a batch norm has normalised already.
        eps: added to each feature's variance before standardising.
    """

    def __init__(self, dim: int, alpha: float = 0.9, lam: float = 1.0, *,
                 standardize: bool = True, eps: float = 1e-5):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        _check_alpha(alpha)
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.dim, self.alpha, self.lam = dim, alpha, lam
        self.standardize, self.eps = standardize, eps
        self.register_buffer("cov_x", torch.zeros(dim, dim))
        self.register_buffer("cov_y", torch.zeros(dim, dim))
        self.register_buffer("cov_weight", torch.zeros(()))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SoftCCAOutput:
        _check_features("x", x, self.dim)
        _check_features("y", y, self.dim)
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        zx = _standardized(x, self.standardize, self.eps)
        zy = _standardized(y, self.standardize, self.eps)
        sdl_x, cov_x, weight = _sdl(zx, self.cov_x, self.cov_weight, self.alpha)
        sdl_y, cov_y, _ = _sdl(zy, self.cov_y, self.cov_weight, self.alpha)
        if self.training:
            with torch.no_grad():
                self.cov_x.copy_(cov_x)
                self.cov_y.copy_(cov_y)
                self.cov_weight.copy_(weight)
        distance = (zx - zy).square().sum(-1).mean()
        decorrelation = sdl_x + sdl_y
        return SoftCCAOutput(distance + self.lam * decorrelation, distance, decorrelation)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, alpha={self.alpha}, lam={self.lam}, "
                f"standardize={self.standardize}, eps={self.eps}")
