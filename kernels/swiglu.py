"""SwiGLU's gating, ``silu(gate) * up``, elementwise over flat contiguous tensors.

Forward: y = gate * sigmoid(gate) * up, computed in fp32 and rounded once to the output
dtype. Backward recomputes sigmoid from the saved gate (nothing else is saved besides gate
and up), with s = sigmoid(gate) and g the incoming gradient:

    dgate = g * up * s * (1 + gate * (1 - s))
    dup   = g * gate * s

sigmoid is 1 / (1 + exp(-x)), built from tl.exp so it runs in the interpreter too; for
x below about -88 exp(-x) overflows to inf and s is exactly 0, as it should round.

Floor: forward reads two tensors and writes one (3 * n * itemsize bytes), backward reads
three and writes two (5 * n * itemsize).
"""
import torch
import triton
import triton.language as tl

from ._common import cast, cdiv

#: Elements per program: 1024 values over 4 warps, 8 per thread (two 16-byte bf16 loads).
_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr,   # (n,) inputs
    y_ptr,              # (n,) output
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate * _sigmoid(gate) * up
    tl.store(y_ptr + offs, cast(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    g_ptr,                # (n,) gradient of y
    gate_ptr, up_ptr,     # (n,) saved inputs
    dgate_ptr, dup_ptr,   # (n,) gradients, in the inputs' dtypes
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(gate)
    silu = gate * s
    dgate = g * up * (s + silu * (1.0 - s))
    tl.store(dgate_ptr + offs, cast(dgate, dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, cast(g * silu, dup_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """gate, up contiguous, same shape -> silu(gate) * up of ``out_dtype``, same shape."""
    y = torch.empty(gate.shape, device=gate.device, dtype=out_dtype)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(cdiv(n, _BLOCK),)](gate, up, y, n, BLOCK=_BLOCK,
                                                      num_warps=_NUM_WARPS)
    return y


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """grad, gate, up contiguous, same shape -> (dgate in gate's dtype, dup in up's)."""
    dgate = torch.empty_like(gate)
    dup = torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(cdiv(n, _BLOCK),)](grad, gate, up, dgate, dup, n,
                                                      BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return dgate, dup
