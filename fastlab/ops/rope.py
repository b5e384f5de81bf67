"""Rotary position embedding of queries and keys: Hugging Face's ``apply_rotary_pos_emb``.

``apply_rotary(q, k, cos, sin)`` returns ``(q * cos + rotate_half(q) * sin,
k * cos + rotate_half(k) * sin)`` with ``rotate_half(x) = cat(-x2, x1)`` over the two halves
of the head dimension D (which must be even). Layout (B, H, S, D) for q and k
(``unsqueeze_dim=1``, as Hugging Face's attention calls it) or (B, S, H, D)
(``unsqueeze_dim=2``); q and k may have different head counts (GQA). cos and sin are
(B, S, D), or (1, S, D) or (S, D) shared by the batch, broadcast over the heads.

Numerics: each output has the promotion of its input's and cos's dtypes, as Hugging Face's
elementwise products give (bf16 q from autocast's projections and fp32 cos give fp32: that
is what the model's attention then receives). The kernel computes in fp32 and rounds once;
Hugging Face rounds each product and the sum, so in bf16 the two differ by up to a few
roundings of bf16.

Memory and backward: the rotation is linear in q and k, so the backward (its transpose, the
rotation by -sin) needs only cos and sin; q and k are not saved. Gradients with respect to
cos and sin are not computed (Hugging Face derives them from position ids, without
gradient): passing cos or sin that require grad is refused.

Dispatch: CUDA tensors of float32, bfloat16 or float16 run one Triton launch for q and k
together (:mod:`fastlab.kernels.rope`, reading the transposed views in place); everything
else (CPU, float64) runs :func:`apply_rotary_ref` and its written-out transpose.
"""
from typing import Tuple

import torch
from torch import Tensor

from fastlab.ops._dispatch import define_op, use_triton

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def validate(q, k, cos, sin, unsqueeze_dim=1) -> None:
    """Every argument check of :func:`apply_rotary`, for the kernel and the reference path."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"apply_rotary: {name} must be a torch.Tensor, got "
                            f"{type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"apply_rotary: {name} must be floating point, got {t.dtype}")
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"apply_rotary: unsqueeze_dim must be 1 (q, k as (B, H, S, D)) or 2 "
                         f"((B, S, H, D)), got {unsqueeze_dim!r}")
    layout = "(B, H, S, D)" if unsqueeze_dim == 1 else "(B, S, H, D)"
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"apply_rotary: {name} must be 4-D {layout}, got shape "
                             f"{tuple(t.shape)}")
    seq_axis = 2 if unsqueeze_dim == 1 else 1
    B, S, D = q.shape[0], q.shape[seq_axis], q.shape[-1]
    if (k.shape[0], k.shape[seq_axis], k.shape[-1]) != (B, S, D):
        raise ValueError(f"apply_rotary: k must match q's batch, sequence and head dim "
                         f"{layout}, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if D % 2:
        raise ValueError(f"apply_rotary: the head dim (q's last dimension) must be even, got "
                         f"{D}: the rotation pairs its two halves")
    if k.dtype != q.dtype:
        raise ValueError(f"apply_rotary: q and k must share a dtype, got {q.dtype} and "
                         f"{k.dtype}")
    if cos.shape != sin.shape or cos.dtype != sin.dtype:
        raise ValueError(f"apply_rotary: cos and sin must have one shape and dtype, got "
                         f"{tuple(cos.shape)} {cos.dtype} and {tuple(sin.shape)} {sin.dtype}")
    ok = (cos.dim() == 2 and cos.shape == (S, D)) or (
        cos.dim() == 3 and cos.shape[1:] == (S, D) and cos.shape[0] in (1, B))
    if not ok:
        raise ValueError(f"apply_rotary: cos and sin must have shape ({B}, {S}, {D}), "
                         f"(1, {S}, {D}) or ({S}, {D}) for q of shape {tuple(q.shape)}, got "
                         f"{tuple(cos.shape)}")
    for t in (k, cos, sin):
        if t.device != q.device:
            raise ValueError(f"apply_rotary: q, k, cos and sin must be on one device, got "
                             f"{q.device} and {t.device}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rotary: cos and sin must not require grad: gradients with "
                         "respect to them are not computed")


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_ref(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                     unsqueeze_dim: int = 1) -> Tuple[Tensor, Tensor]:
    """Plain-PyTorch ``apply_rotary_pos_emb``: the oracle of the tests and the CPU path."""
    validate(q, k, cos, sin, unsqueeze_dim)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _unrotate_half(x: Tensor) -> Tensor:
    """Transpose of :func:`_rotate_half`: (x1, x2) -> (x2, -x1)."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def _kernel_ok(q: Tensor, cos: Tensor) -> bool:
    return q.dtype in _KERNEL_DTYPES and cos.dtype in _KERNEL_DTYPES and use_triton(q, cos)


def _expanded(cos: Tensor, batch: int) -> Tensor:
    """cos as (B, S, D), batch stride 0 when shared."""
    return (cos[None] if cos.dim() == 2 else cos).expand(batch, -1, -1)


def _forward_impl(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
    """q, k (B, H, S, D) -> rotated q, k with q's and k's strides."""
    q_out = torch.empty_like(q, dtype=torch.promote_types(q.dtype, cos.dtype))
    k_out = torch.empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype))
    if _kernel_ok(q, cos):
        from fastlab.kernels.rope import rope

        B = q.shape[0]
        rope(q, k, _expanded(cos, B), _expanded(sin, B), q_out, k_out, transpose=False)
        return q_out, k_out
    q_ref, k_ref = apply_rotary_ref(q, k, cos, sin)
    return q_out.copy_(q_ref), k_out.copy_(k_ref)


def _backward_impl(grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor,
                   q_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The transpose of the rotation applied to the incoming gradients, in q's dtype."""
    dq = torch.empty_like(grad_q, dtype=q_dtype)
    dk = torch.empty_like(grad_k, dtype=q_dtype)
    if _kernel_ok(grad_q, cos):
        from fastlab.kernels.rope import rope

        B = grad_q.shape[0]
        rope(grad_q, grad_k, _expanded(cos, B), _expanded(sin, B), dq, dk, transpose=True)
        return dq, dk
    compute = torch.promote_types(torch.promote_types(grad_q.dtype, cos.dtype), torch.float32)
    c = _expanded(cos, grad_q.shape[0]).unsqueeze(1).to(compute)
    s = _expanded(sin, grad_q.shape[0]).unsqueeze(1).to(compute)
    for g, out in ((grad_q, dq), (grad_k, dk)):
        g = g.to(compute)
        out.copy_(g * c + _unrotate_half(g * s))
    return dq, dk


def _fwd_fake(q, k, cos, sin):
    return (torch.empty_like(q, dtype=torch.promote_types(q.dtype, cos.dtype)),
            torch.empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype)))


def _bwd_fake(grad_q, grad_k, cos, sin, q_dtype):
    return torch.empty_like(grad_q, dtype=q_dtype), torch.empty_like(grad_k, dtype=q_dtype)


_rope_bwd = define_op("fastlab::rope_bwd", fake=_bwd_fake)(_backward_impl)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.q_dtype = q.dtype
    ctx.shapes = (q.shape, k.shape)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    if grad_q is None and grad_k is None:
        return None, None, None, None
    # an output nobody used: its gradient is zero (q or k alone feeding the loss)
    shape_q, shape_k = ctx.shapes
    grad_q = grad_q if grad_q is not None else cos.new_zeros(shape_q, dtype=grad_k.dtype)
    grad_k = grad_k if grad_k is not None else cos.new_zeros(shape_k, dtype=grad_q.dtype)
    dq, dk = _rope_bwd(grad_q, grad_k, cos, sin, ctx.q_dtype)
    return dq, dk, None, None


_rope_fwd = define_op("fastlab::rope_fwd", fake=_fwd_fake, backward=_backward,
                      setup_context=_setup_context)(_forward_impl)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                 unsqueeze_dim: int = 1) -> Tuple[Tensor, Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``: see the module
    docstring for layouts, numerics and memory."""
    validate(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim == 2:  # (B, S, H, D): the same kernel through transposed views
        q_out, k_out = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return _rope_fwd(q, k, cos, sin)
