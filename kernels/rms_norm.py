"""RMSNorm over the last dimension, Hugging Face LlamaRMSNorm's numerics.

Forward, one program per row of ``x`` (N, D):

1. Load the row, upcast to fp32, r = 1 / sqrt(mean(x^2) + eps) (kept: N fp32 values).
2. n = x * r, rounded to x's dtype (as LlamaRMSNorm casts back before the weight), then
   y = weight * n in fp32, rounded once to the output dtype (x's and weight's promotion).

Backward, a persistent grid: each program strides over rows and keeps its own fp32 partial
sum of the weight gradient in registers, written once at the end (P x D values, reduced by
the launcher in fp32: deterministic, no atomics). Per row, with g the incoming gradient and
dn = g * weight: dx = r * (dn - n * mean(dn * n)) with n = x * r, and the weight gradient
adds g * round(n).

Floor: forward reads x and writes y (2 * N * D * itemsize bytes); backward reads x and g
and writes dx (3 * N * D * itemsize) plus P x D fp32 partials. Only x and r are saved.
The whole row sits in one block (``next_power_of_2(D)`` lanes, masked), which holds for
hidden sizes up to 64K.
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, cast, cdiv, next_power_of_2

#: Rows per backward program on the GPU, at least: enough to amortise writing the P x D
#: partial sums, few enough to keep every SM busy at training sizes (N >= 8K rows).
_MIN_ROWS_PER_PROGRAM = 8
#: Programs of the backward grid in the interpreter: a few, so the partial sums and their
#: reduction are exercised at tiny sizes.
_INTERPRETER_PROGRAMS = 3


def _num_warps(block: int) -> int:
    """One warp per 256 lanes (8 fp32 values a thread), between 1 and 16."""
    return max(1, min(16, block // 256))


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,       # (N, D) input, row stride stride_x
    w_ptr,       # (D,) weight
    y_ptr,       # (N, D) output, contiguous
    rstd_ptr,    # (N,) fp32, 1 / sqrt(mean(x^2) + eps)
    stride_x, D, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    # 1. the row in fp32 and its reciprocal RMS
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(rstd_ptr + row, rstd)
    # 2. normalised, rounded to x's dtype, then scaled by the weight
    n = cast(x * rstd, x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, cast(n * w, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    g_ptr,       # (N, D) gradient of y, contiguous
    x_ptr,       # (N, D) input, row stride stride_x
    w_ptr,       # (D,) weight
    rstd_ptr,    # (N,) fp32
    dx_ptr,      # (N, D) gradient of x, contiguous
    dw_ptr,      # (P, D) fp32 partial sums of the weight gradient, one row per program
    stride_x, N, D,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    first = pid.to(tl.int64)  # row offsets in int64: N * D may pass 2**31
    for r in range(pid, N, programs):
        row = first + (r - pid)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        dn = g * w
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / D))
        tl.store(dx_ptr + row * D + cols, cast(dx, dx_ptr.dtype.element_ty), mask=mask)
        dw += g * cast(n, x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_ptr + pid * D + cols, dw, mask=mask)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """x (N, D) with unit column stride -> (y (N, D) of ``out_dtype``, rstd (N,) fp32)."""
    N, D = x.shape
    y = torch.empty((N, D), device=x.device, dtype=out_dtype)
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    if N == 0:
        return y, rstd
    block = next_power_of_2(D)
    _rms_norm_fwd_kernel[(N,)](x, weight, y, rstd, x.stride(0), D, float(eps), BLOCK=block,
                               num_warps=_num_warps(block))
    return y, rstd


def _backward_programs(x: torch.Tensor) -> int:
    if INTERPRETING or not x.is_cuda:
        return _INTERPRETER_PROGRAMS
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(4 * sms, cdiv(x.shape[0], _MIN_ROWS_PER_PROGRAM)))


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor):
    """grad (N, D) contiguous, x (N, D) with unit column stride -> (dx in x's dtype,
    dweight in weight's dtype, summed over rows in fp32)."""
    N, D = x.shape
    dx = torch.empty((N, D), device=x.device, dtype=x.dtype)
    if N == 0:
        return dx, torch.zeros_like(weight)
    programs = min(N, _backward_programs(x))
    partial = torch.empty((programs, D), device=x.device, dtype=torch.float32)
    block = next_power_of_2(D)
    _rms_norm_bwd_kernel[(programs,)](grad, x, weight, rstd, dx, partial, x.stride(0), N, D,
                                      BLOCK=block, num_warps=_num_warps(block))
    return dx, partial.sum(0).to(weight.dtype)
