"""Canonical correlations between two sets of embeddings, once or over a window of steps.

Algorithm. Rows ``x`` ``(N, Dx)`` and ``y`` ``(N, Dy)`` (a student's projected embeddings
and a teacher's, say) are converted to float64 and centred (two passes: the mean first,
then the centred cross-products, so a large common offset costs no digits). With the
covariances Cxx, Cyy and the cross-covariance Cxy, each view is whitened by the inverse
square root of its covariance from ``eigh``, and the canonical correlations are the
singular values of ``Cxx^-1/2 Cxy Cyy^-1/2``, in decreasing order, ``min(Dx, Dy)`` of them.

Regularisation. Eigen-directions with a variance below ``eps`` times the largest are
dropped from the whitening (their inverse square root is set to 0, a pseudo-inverse)
instead of being blown up to unit variance: collinear or constant features then add no
spurious correlation of 1, and the dropped directions report a correlation of 0. With
fewer rows than dimensions CCA is degenerate (every correlation is 1); the window of
:class:`WindowedCCA` is meant to hold many more rows than dimensions (5x to 10x the CCA
dimension in steps, each of a batch of rows).

NaN or inf in the rows give NaN correlations. Host syncs: ``eigh`` and ``svdvals`` on CUDA
check convergence on the host; compute these metrics at log steps, not inside a captured
training step.
"""
from typing import Any, Dict, Optional, Tuple

import torch

#: eigenvalues below this fraction of the largest are treated as 0 when whitening: float64
#: covariances are exact to ~1e-16 of their largest eigenvalue, so 1e-10 keeps every real
#: direction and drops only those that are zero up to rounding
DEFAULT_EPS = 1e-10


def _check_views(x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, dims), got shape {tuple(t.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and "
                         f"{y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError(f"x and y need at least 2 rows, got {x.shape[0]}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != (x.shape[0],):
            raise ValueError(f"mask must have shape ({x.shape[0]},) (one per row), got "
                             f"{tuple(mask.shape)}")


def _check_k(k: Optional[int], dim_x: int, dim_y: int) -> None:
    if k is not None and not 1 <= k <= min(dim_x, dim_y):
        raise ValueError(f"k must be None or in [1, min(Dx, Dy) = {min(dim_x, dim_y)}], "
                         f"got {k}")


def _covariances(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 (Cxx, Cyy, Cxy) of the rows weighted 0/1 by ``weight``, two-pass centred.
    Normalised by the weight's sum: the scale cancels in the correlations."""
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    w = weight.to(torch.float64)
    total = w.sum()
    xc = x - (w @ x) / total
    yc = y - (w @ y) / total
    xw = xc * w[:, None]
    return (xw.T @ xc) / total, ((yc * w[:, None]).T @ yc) / total, (xw.T @ yc) / total


def _inverse_sqrt(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """Pseudo-inverse square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh(cov)
    keep = values > eps * values[-1]  # eigh sorts ascending: values[-1] is the largest
    scale = torch.where(keep, values.clamp_min(torch.finfo(values.dtype).tiny).rsqrt(),
                        torch.zeros_like(values))
    return (vectors * scale) @ vectors.T


def cca_from_covariances(cxx: torch.Tensor, cyy: torch.Tensor, cxy: torch.Tensor,
                         k: Optional[int] = None, *, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Canonical correlations (float64, decreasing) from covariances, the top ``k`` or all
    ``min(Dx, Dy)``; see the module docstring."""
    _check_k(k, cxx.shape[0], cyy.shape[0])
    # eigh fails on NaN/inf; decompose zeros instead and report NaN, decided on the device
    finite = torch.isfinite(cxx).all() & torch.isfinite(cyy).all() & torch.isfinite(cxy).all()
    cxx, cyy, cxy = (torch.where(finite, c, torch.zeros_like(c)) for c in (cxx, cyy, cxy))
    whitened = _inverse_sqrt(cxx, eps) @ cxy @ _inverse_sqrt(cyy, eps)
    # rounding can push a perfect correlation a few ulps past 1
    correlations = torch.linalg.svdvals(whitened).clamp(max=1.0)
    correlations = torch.where(finite, correlations, torch.full_like(correlations, torch.nan))
    return correlations if k is None else correlations[:k]


def cca(x: torch.Tensor, y: torch.Tensor, k: Optional[int] = None, *,
        mask: Optional[torch.Tensor] = None, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Canonical correlations of the rows of ``x`` ``(N, Dx)`` and ``y`` ``(N, Dy)``.

    Returns a float64 vector in decreasing order: all ``min(Dx, Dy)`` correlations, or the
    top ``k``; its mean is the usual summary ("mean CCA"). ``mask`` ``(N,)`` bool counts
    only the rows it selects. ``eps``: relative eigenvalue floor of the whitening.
    """
    _check_views(x, y, mask)
    _check_k(k, x.shape[1], y.shape[1])
    weight = x.new_ones(x.shape[0]) if mask is None else mask
    return cca_from_covariances(*_covariances(x, y, weight), k, eps=eps)


class WindowedCCA:
    """CCA over the rows of the last ``window`` steps, forgetting the steps that leave it.

    ``update(x, y, mask=None)`` adds one step's rows (``(..., dim)`` and ``(..., dim_y)``,
    leading dims flattened; the same number of rows every step, as training batches have);
    ``compute()`` returns the canonical correlations (see :func:`cca`) of all rows of the
    steps in the window, ``k`` of them or all. Before ``window`` steps have been seen the
    window holds those seen so far.

    Storage. The window's rows are kept in a ring buffer of ``window`` slots (in ``dtype``)
    and the covariances are computed from them afresh, in float64 and two-pass centred, by
    every ``compute()``. Running sums that add each new step and subtract the one leaving
    would make ``compute()`` cheaper, but uncentred float64 sums lose digits to cancellation
    when the embeddings share a large offset, and their rounding drifts over a long run;
    they would also need each leaving step's rows (or its ``D x D`` statistics, more memory
    than the rows once D exceeds the batch) to subtract it. Here ``update`` is a copy, the
    result is exactly the CCA of the window's rows, and ``compute`` costs
    ``O(window * rows * D^2)`` flops: call it at log steps.

    ``state_dict()`` / ``load_state_dict()`` carry the window through a checkpoint.
    """

    def __init__(self, dim: int, window: int, k: Optional[int] = None, *,
                 dim_y: Optional[int] = None, eps: float = DEFAULT_EPS,
                 dtype: torch.dtype = torch.float32):
        dim_y = dim if dim_y is None else dim_y
        for name, value in (("dim", dim), ("dim_y", dim_y), ("window", window)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        _check_k(k, dim, dim_y)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.dim, self.dim_y, self.window, self.k, self.eps = dim, dim_y, window, k, eps
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        """Forget every step."""
        self._x: Optional[torch.Tensor] = None  # (window, rows, dim)
        self._y: Optional[torch.Tensor] = None  # (window, rows, dim_y)
        self._weight: Optional[torch.Tensor] = None  # (window, rows): 0/1, masked rows 0
        self._next = 0  # the slot the next step overwrites
        self._filled = 0  # slots holding a step, at most window

    @property
    def steps(self) -> int:
        """The number of steps in the window now."""
        return self._filled

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None
               ) -> None:
        """Add one step's rows; ``mask`` (x.shape[:-1], bool) counts only those it selects."""
        for name, t, dim in (("x", x, self.dim), ("y", y, self.dim_y)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() < 1 or t.shape[-1] != dim:
                raise ValueError(f"{name} must be (..., {dim}), got shape {tuple(t.shape)}")
        if x.shape[:-1] != y.shape[:-1]:
            raise ValueError(f"x and y must have the same rows, got shapes {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or mask.shape != x.shape[:-1]):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:-1])} "
                             f"(x.shape[:-1]), got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        rows = x.reshape(-1, self.dim)
        if self._x is None:
            self._x = rows.new_zeros((self.window,) + tuple(rows.shape), dtype=self.dtype)
            self._y = rows.new_zeros((self.window, rows.shape[0], self.dim_y), dtype=self.dtype)
            self._weight = rows.new_zeros((self.window, rows.shape[0]), dtype=self.dtype)
        if rows.shape[0] != self._x.shape[1]:
            raise ValueError(f"every step must have the same number of rows: the window holds "
                             f"{self._x.shape[1]} per step, got {rows.shape[0]}")
        self._x[self._next].copy_(rows)
        self._y[self._next].copy_(y.reshape(-1, self.dim_y))
        if mask is None:
            self._weight[self._next].fill_(1.0)
        else:
            self._weight[self._next].copy_(mask.reshape(-1))
        self._next = (self._next + 1) % self.window
        self._filled = min(self._filled + 1, self.window)

    @torch.no_grad()
    def compute(self) -> torch.Tensor:
        """Canonical correlations of the window's rows (float64, decreasing)."""
        if self._filled == 0:
            raise ValueError("WindowedCCA.compute() needs at least one update() first")
        # slots [0, filled) hold the window: the ring fills them in order before wrapping
        x = self._x[:self._filled].reshape(-1, self.dim)
        y = self._y[:self._filled].reshape(-1, self.dim_y)
        weight = self._weight[:self._filled].reshape(-1)
        return cca_from_covariances(*_covariances(x, y, weight), self.k, eps=self.eps)

    def state_dict(self) -> Dict[str, Any]:
        return {"x": self._x, "y": self._y, "weight": self._weight, "next": self._next,
                "filled": self._filled}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        x, y = state["x"], state["y"]
        if x is not None and (x.shape[0] != self.window or x.shape[2] != self.dim
                              or y.shape[2] != self.dim_y):
            raise ValueError(f"state holds a window of shape {tuple(x.shape)} / "
                             f"{tuple(y.shape)}, this metric has window={self.window}, "
                             f"dim={self.dim}, dim_y={self.dim_y}")
        self._x, self._y, self._weight = x, y, state["weight"]
        self._next, self._filled = int(state["next"]), int(state["filled"])
