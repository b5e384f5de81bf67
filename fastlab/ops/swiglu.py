"""SwiGLU's gating, ``silu(gate) * up``: what Hugging Face LlamaMLP computes between its
projections, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.

Numerics: the result has the promotion of gate's and up's dtypes (bf16 projections under
autocast give bf16, as ``F.silu(gate) * up`` does there: autocast leaves elementwise ops
alone). The kernel computes in fp32 and rounds once; LlamaMLP rounds silu(gate) to the
input dtype before the product, so the two differ by up to one rounding of that dtype.

Memory: the forward saves gate and up only; the backward recomputes sigmoid(gate) and writes
dgate and dup (LlamaMLP's autograd also keeps silu(gate), a third tensor of that size).

Dispatch: CUDA tensors of float32, bfloat16 or float16 run the Triton kernels
(:mod:`fastlab.kernels.swiglu`), everything else (CPU, float64) :func:`swiglu_ref` and the
kernel's backward formulas written in PyTorch.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlab.ops._dispatch import define_op, use_triton

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def validate(gate, up) -> None:
    """Every argument check of :func:`swiglu`, for the kernel and the reference path."""
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, Tensor):
            raise TypeError(f"swiglu: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"swiglu: {name} must be floating point, got {t.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must have the same shape, got "
                         f"{tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate ({gate.device}) and up ({up.device}) must be on one "
                         f"device")


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    """Plain-PyTorch ``F.silu(gate) * up``: the oracle of the tests and the CPU path."""
    validate(gate, up)
    return F.silu(gate) * up


def _kernel_ok(gate: Tensor, up: Tensor) -> bool:
    return gate.dtype in _KERNEL_DTYPES and up.dtype in _KERNEL_DTYPES and use_triton(gate, up)


def _forward_impl(gate: Tensor, up: Tensor) -> Tensor:
    if _kernel_ok(gate, up):
        from fastlab.kernels.swiglu import swiglu_forward

        return swiglu_forward(gate.contiguous(), up.contiguous(),
                              torch.promote_types(gate.dtype, up.dtype))
    return swiglu_ref(gate, up).contiguous()


def _backward_impl(grad: Tensor, gate: Tensor, up: Tensor) -> Tuple[Tensor, Tensor]:
    """(dgate, dup) in gate's and up's dtypes, contiguous."""
    if _kernel_ok(gate, up):
        from fastlab.kernels.swiglu import swiglu_backward

        return swiglu_backward(grad.contiguous(), gate.contiguous(), up.contiguous())
    # the kernel's formulas, in fp32 (float64 for float64 inputs)
    compute = torch.promote_types(torch.promote_types(gate.dtype, up.dtype), torch.float32)
    g, a, u = grad.to(compute), gate.to(compute), up.to(compute)
    s = torch.sigmoid(a)
    silu = a * s
    return (g * u * (s + silu * (1 - s))).to(gate.dtype), (g * silu).to(up.dtype)


def _fwd_fake(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


def _bwd_fake(grad, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


_swiglu_bwd = define_op("fastlab::swiglu_bwd", fake=_bwd_fake)(_backward_impl)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd(grad, gate, up)


_swiglu_fwd = define_op("fastlab::swiglu_fwd", fake=_fwd_fake, backward=_backward,
                        setup_context=_setup_context)(_forward_impl)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` for tensors of one shape: see the module docstring."""
    validate(gate, up)
    return _swiglu_fwd(gate, up)
