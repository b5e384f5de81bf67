"""RMSNorm with Hugging Face LlamaRMSNorm's numerics: ``weight * (x * rsqrt(mean(x^2) + eps))``.

Numerics (both paths): x is upcast to fp32 (float64 stays float64), normalised, rounded back
to x's dtype, then multiplied by the weight; the result has the promotion of x's and the
weight's dtypes, as LlamaRMSNorm's ``self.weight * hidden_states.to(input_dtype)`` does (a
bf16 x and an fp32 weight give fp32, under autocast too: autocast leaves elementwise ops
alone). The kernel computes the product in fp32 and rounds it once, which is the same value.

Memory: the forward saves x (its dtype) and the reciprocal RMS of each row (fp32, one value
a row) for the backward; LlamaRMSNorm's autograd keeps the fp32 upcast, the normalised
fp32 and rounded tensors besides. The backward computes dx in one kernel and the weight
gradient as per-program fp32 partial sums reduced afterwards (:mod:`fastlab.kernels.rms_norm`).

Dispatch: CUDA tensors of float32, bfloat16 or float16 run the Triton kernels, everything
else (CPU, float64) :func:`rms_norm_ref` and the kernel's backward formulas written in
PyTorch (fp32, float64 for float64 x).
"""
import math
from typing import Tuple

import torch
from torch import Tensor

from fastlab.ops._dispatch import define_op, use_triton

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def validate(x, weight, eps) -> None:
    """Every argument check of :func:`rms_norm`, for the kernel and the reference path."""
    if not isinstance(x, Tensor):
        raise TypeError(f"rms_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"rms_norm: weight must be a torch.Tensor, got {type(weight).__name__}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"rms_norm: x and weight must be floating point, got {x.dtype} and "
                         f"{weight.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must have a non-empty last dimension (the normalised "
                         f"one), got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1]},) to match x's last "
                         f"dimension, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight ({weight.device}) must be on x's device "
                         f"({x.device})")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"rms_norm: eps must be a non-negative float, got {eps!r}")


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Plain-PyTorch LlamaRMSNorm.forward: the oracle of the tests and the CPU path."""
    validate(x, weight, eps)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(compute)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _kernel_ok(x: Tensor, weight: Tensor) -> bool:
    return x.dtype in _KERNEL_DTYPES and weight.dtype in _KERNEL_DTYPES and use_triton(x, weight)


def _rows(x: Tensor) -> Tensor:
    """x as (N, D) with unit column stride (a copy only when a view cannot be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _forward_impl(x: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(y, rstd): y of x's shape, rstd (N,) fp32 (float64 for float64 x) per row."""
    if _kernel_ok(x, weight):
        from fastlab.kernels.rms_norm import rms_norm_forward

        y, rstd = rms_norm_forward(_rows(x), weight.contiguous(), eps,
                                   torch.promote_types(x.dtype, weight.dtype))
        return y.view(x.shape), rstd
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.reshape(-1, x.shape[-1]).to(compute)
    rstd = torch.rsqrt(h.pow(2).mean(-1) + eps)
    return rms_norm_ref(x, weight, eps).contiguous(), rstd


def _backward_impl(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                   eps: float) -> Tuple[Tensor, Tensor]:
    """(dx, dweight) in x's and weight's dtypes."""
    if _kernel_ok(x, weight):
        from fastlab.kernels.rms_norm import rms_norm_backward

        g = grad.reshape(-1, x.shape[-1]).contiguous()
        dx, dw = rms_norm_backward(g, _rows(x), weight.contiguous(), rstd)
        return dx.view(x.shape), dw
    # the same formulas as the kernel's backward, in fp32 (float64 for float64 x)
    compute = rstd.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(compute)
    g = grad.reshape(x2.shape).to(compute)
    n = x2 * rstd[:, None]
    dn = g * weight.to(compute)
    dx = rstd[:, None] * (dn - n * (dn * n).mean(-1, keepdim=True))
    dw = (g * n.to(x.dtype).to(compute)).sum(0)
    return dx.to(x.dtype).view(x.shape), dw.to(weight.dtype)


def _fwd_fake(x, weight, eps):
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty((math.prod(x.shape[:-1]),), dtype=compute))


def _bwd_fake(grad, x, weight, rstd, eps):
    return torch.empty_like(x), torch.empty_like(weight)


_rms_norm_bwd = define_op("fastlab::rms_norm_bwd", fake=_bwd_fake)(_backward_impl)


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.eps = eps
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    if grad_y is None:
        return None, None, None
    dx, dw = _rms_norm_bwd(grad_y, x, weight, rstd, ctx.eps)
    return dx, dw, None


_rms_norm_fwd = define_op("fastlab::rms_norm_fwd", fake=_fwd_fake, backward=_backward,
                          setup_context=_setup_context)(_forward_impl)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """LlamaRMSNorm's forward on ``x`` (..., D) with ``weight`` (D,): see the module
    docstring for numerics, memory and dispatch."""
    validate(x, weight, eps)
    eps = float(eps)
    return _rms_norm_fwd(x, weight, eps)[0]
