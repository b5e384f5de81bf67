"""Cross-entropy over the last dimension of the logits, with torch's argument names.

``logits`` is (..., V) with the classes on the last dimension (torch puts them on dim 1),
``target`` holds class indices of shape ``logits.shape[:-1]``. The loss is float32 for
fp32/bf16/fp16 logits (float64 for float64 logits); the gradient has the logits' dtype.
That is also what torch.autocast makes of F.cross_entropy (it runs it in float32): under
autocast the op needs no cast of its own, its bf16/fp16 logits give a float32 loss.

Numerics (DESIGN.md): the target's term is log1p(sum_{j != y} exp(z_j - z_y)) and its
gradient -t / (1 + t), so a target that dominates by a margin of 20 to 80 still gets a
loss and gradient within 1e-5 relative of exact math, where F.cross_entropy returns 0.

Design: the forward computes the loss and the gradient together (one kernel, no N x V
temporary besides the gradient), already multiplied by 1/n_valid for a mean. The backward
multiplies it by the incoming gradient in place, and skips every row whose incoming factor
is exactly 1 (as after ``loss.backward()``), so that backward costs a launch, not a pass
over the logits; it can run once per forward. With ``inplace_backward=True`` the gradient
is written over the logits, for callers that no longer need them.

float16 logits are the exception: their gradient waits for the backward. Written in the
forward, before the incoming gradient is known, p_j / n_valid falls below fp16's range
(6e-8) for most classes of a large vocabulary and batch, and a GradScaler's loss scale,
applied afterwards, multiplies zeros: the fp16 recipe (autocast fp16 + GradScaler) would
train on a gradient that is mostly 0. So for fp16 the forward computes the loss only and the
backward writes the gradient already multiplied by its incoming factor, rounding it to fp16
once (one more read of the logits). bf16 has fp32's exponent range and keeps the one-pass
design.

Ops (:func:`fastlab.ops._dispatch.define_op`): ``fastlab::cross_entropy_forward`` (the
loss, and the gradient into a buffer or over the logits), ``fastlab::cross_entropy_backward``
(float16's deferred gradient) and ``fastlab::scale_grad``, each a ``torch.library.triton_op``
whose kernels Inductor sees. They write the gradient in place and ``register_autograd``
accepts functional ops only, so autograd is an ``autograd.Function`` around them;
torch.compile traces it with no graph break. Where torch.compile traces into a triton_op's
body, the target check below is skipped there (a traced body cannot read values on the
host).

Targets outside [0, V) that are not ``ignore_index`` raise a ValueError naming ``target``
when ``check_targets`` is true, which costs a host sync on CUDA. The default checks CPU
tensors only; on CUDA such a row gets a NaN loss and a NaN gradient (never a memory fault),
so the mean loss is NaN rather than silently wrong.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastlab.ops._dispatch import define_op, use_triton

_REDUCTIONS = ("none", "mean", "sum")
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------- reference

def _row_terms(z: Tensor, target: Tensor, ignore_index: int):
    """Per-row terms of the loss from float64 logits ``z`` (N, V), differentiable.

    The shift is the row max, except that a row whose target holds the max is shifted by
    the target's own logit: then nll = log1p(s) with s = sum_{j != y} exp(z_j - z_y).
    """
    V = z.shape[-1]
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    y = torch.where(valid & in_range, target, 0).long()[:, None]
    is_y = torch.zeros_like(z, dtype=torch.bool).scatter_(1, y, True)
    z_y = z.gather(1, y)
    m = z.detach().amax(dim=1, keepdim=True)
    dominant = m == z_y.detach()
    shift = torch.where(dominant, z_y, m)
    e = torch.exp(z - shift).masked_fill(is_y, 0.0)
    s = e.sum(dim=1, keepdim=True)
    e_y = torch.exp(z_y - shift)
    nll = torch.where(dominant, torch.log1p(s), (shift - z_y) + torch.log(s + e_y))
    return dict(valid=valid, bad=valid & ~in_range, y=y, z_y=z_y, e=e, s=s, e_y=e_y,
                nll=nll[:, 0])


def _row_losses(z: Tensor, terms: dict, label_smoothing: float, z_loss: float):
    """(loss, z-loss term) of each row: 0 for ignored rows, NaN for bad targets."""
    loss = terms["nll"]
    if label_smoothing > 0.0:
        loss = loss - label_smoothing * (z - terms["z_y"]).sum(dim=1) / z.shape[-1]
    lse = terms["z_y"][:, 0] + terms["nll"]
    zterm = z_loss * lse * lse
    loss = loss + zterm
    nan = torch.full_like(loss, float("nan"))
    loss = torch.where(terms["bad"], nan, torch.where(terms["valid"], loss, 0.0))
    zterm = torch.where(terms["bad"], nan, torch.where(terms["valid"], zterm, 0.0))
    return loss, zterm


def _valid_count(target: Tensor, ignore_index: int) -> Tensor:
    """Number of non-ignored targets, at least 1 (an all-ignored mean is 0, not NaN)."""
    return (target != ignore_index).sum().clamp(min=1)


def _reduce(rows: Tensor, target: Tensor, ignore_index: int, reduction: str, lead_shape,
            n_valid: Optional[Tensor] = None):
    """Per-row values to the reduction's result; ``n_valid`` (a mean's divisor) is counted
    from ``target`` unless the caller already has it."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (_valid_count(target, ignore_index) if n_valid is None else n_valid)


def cross_entropy_ref(logits: Tensor, target: Tensor, *, ignore_index: int = -100,
                      label_smoothing: float = 0.0, reduction: str = "mean",
                      z_loss: float = 0.0, return_z_loss: bool = False):
    """Plain-PyTorch cross-entropy in float64 following the numerics contract; the loss is
    float32 (float64 for float64 logits) and differentiable through autograd."""
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    V = logits.shape[-1]
    z = logits.double().reshape(-1, V)
    t = target.reshape(-1)
    terms = _row_terms(z, t, ignore_index)
    rows, zrows = _row_losses(z, terms, label_smoothing, z_loss)
    lead = logits.shape[:-1]
    loss = _reduce(rows, t, ignore_index, reduction, lead).to(out_dtype)
    if not return_z_loss:
        return loss
    return loss, _reduce(zrows, t, ignore_index, reduction, lead).to(out_dtype).detach()


def _reference_rows(logits2d: Tensor, target1d: Tensor, ignore_index: int,
                    label_smoothing: float, z_loss: float, with_grad: bool):
    """(loss rows, z rows, float64 gradient or None) with the gradient written out:
    p_j - q_j (+ z-loss term), the target's entry as -s / (s + e_y)."""
    z = logits2d.detach().double()
    terms = _row_terms(z, target1d, ignore_index)
    rows, zrows = _row_losses(z, terms, label_smoothing, z_loss)
    if not with_grad:
        return rows, zrows, None
    V = z.shape[-1]
    inv = 1.0 / (terms["s"] + terms["e_y"])
    lse = terms["z_y"] + terms["nll"][:, None]
    coef = inv * (1.0 + 2.0 * z_loss * lse)
    grad = terms["e"] * coef - label_smoothing / V
    target_grad = (-terms["s"] * inv + (label_smoothing - label_smoothing / V)
                   + 2.0 * z_loss * lse * terms["e_y"] * inv)
    grad.scatter_(1, terms["y"], target_grad)
    grad = torch.where(terms["valid"][:, None], grad, 0.0)
    return rows, zrows, grad.masked_fill(terms["bad"][:, None], float("nan"))


# ------------------------------------------------------------------------------ custom ops

def _as_rows(logits: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
    V = logits.shape[-1]
    return logits.reshape(-1, V), target.reshape(-1)


def check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """ValueError naming ``target`` when a class index is outside [0, num_classes) and is
    not ``ignore_index``. Reads the tensor on the host (a sync for CUDA tensors)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        example = int(target[bad].flatten()[0])
        raise ValueError(f"target holds class index {example}, outside [0, {num_classes}) "
                         f"and not ignore_index={ignore_index}")


def _kernel_ok(*tensors: Tensor) -> bool:
    """Kernel for CUDA tensors (or when forced), except float64, which the kernel would
    round to float32: those run the float64 reference."""
    return tensors[0].dtype != torch.float64 and use_triton(*tensors)


def _grad_scale(target: Tensor, ignore_index: int,
                reduction: str) -> Tuple[Tensor, Optional[Tensor]]:
    """(factor, n_valid): the factor the forward applies to every row's gradient, 1/n_valid
    for a mean, and n_valid itself (None unless a mean) for :func:`_reduce`."""
    if reduction == "mean":
        n_valid = _valid_count(target, ignore_index)
        return 1.0 / n_valid.to(torch.float32), n_valid
    return torch.ones((), device=target.device, dtype=torch.float32), None


def _forward_impl(logits: Tensor, target: Tensor, grad: Optional[Tensor], ignore_index: int,
                  label_smoothing: float, z_loss: float, reduction: str,
                  check_targets: bool) -> Tuple[Tensor, Tensor]:
    """Loss and reported z-loss; writes the pre-scaled gradient into ``grad`` if given
    (``grad`` may be ``logits`` itself)."""
    V = logits.shape[-1]
    if check_targets and not torch.compiler.is_compiling():
        # a host read: traced bodies (fake tensors) cannot make it
        check_target_range(target, V, ignore_index)
    x, t = _as_rows(logits, target)
    grad2d = None if grad is None else grad.view(-1, V)
    lead = logits.shape[:-1]
    if _kernel_ok(logits, target):
        from fastlab.kernels import cross_entropy as K

        # three launches: the mean's divisor, the rows, their reduction
        scale, n_valid = K.count_valid(t, ignore_index, reduction == "mean")
        rows, zrows = K.cross_entropy_forward(x, t, grad2d, scale, ignore_index,
                                              label_smoothing, z_loss)
        if reduction == "none":
            return rows.reshape(lead), zrows.reshape(lead)
        return K.reduce_rows(rows, zrows, n_valid, reduction == "mean")
    scale, n_valid = _grad_scale(t, ignore_index, reduction)
    rows, zrows, g = _reference_rows(x, t, ignore_index, label_smoothing, z_loss,
                                     grad2d is not None)
    if grad2d is not None:
        grad2d.copy_(g * scale.double())
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    # the z rows carry a bad target's NaN too, whatever z_loss is
    loss = _reduce(rows, t, ignore_index, reduction, lead, n_valid).to(out_dtype)
    zl = _reduce(zrows, t, ignore_index, reduction, lead, n_valid).to(out_dtype)
    return loss, zl


def _fake_outputs(logits: Tensor, target: Tensor, grad: Optional[Tensor], ignore_index: int,
                  label_smoothing: float, z_loss: float, reduction: str,
                  check_targets: bool) -> Tuple[Tensor, Tensor]:
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    shape = logits.shape[:-1] if reduction == "none" else ()
    return logits.new_empty(shape, dtype=out_dtype), logits.new_empty(shape, dtype=out_dtype)


#: Loss and z-loss of the rows; with ``grad`` (a fresh buffer, or ``logits`` itself for
#: ``inplace_backward``) also their gradient, pre-scaled for the reduction.
_forward = define_op("fastlab::cross_entropy_forward", fake=_fake_outputs,
                     mutates_args=("grad",), triton=True)(_forward_impl)


def _backward_impl(logits: Tensor, target: Tensor, grad: Tensor, factor: Tensor,
                   ignore_index: int, label_smoothing: float, z_loss: float,
                   reduction: str) -> None:
    """Writes into ``grad`` (may be ``logits``) the gradient of the loss times ``factor``,
    the incoming gradient (one value, or one per row for ``reduction="none"``): the
    deferred backward of float16 logits."""
    V = logits.shape[-1]
    x, t = _as_rows(logits, target)
    grad2d = grad.view(-1, V)
    rows = factor.reshape(-1).to(torch.float32) if reduction == "none" else None
    if _kernel_ok(logits, target):
        from fastlab.kernels import cross_entropy as K

        if rows is None:
            mean_factor, _ = K.count_valid(t, ignore_index, reduction == "mean")
            rows = mean_factor * factor.to(torch.float32)
        K.cross_entropy_forward(x, t, grad2d, rows, ignore_index, label_smoothing, z_loss)
        return
    if rows is None:
        rows = _grad_scale(t, ignore_index, reduction)[0] * factor.to(torch.float32)
    _, _, g = _reference_rows(x, t, ignore_index, label_smoothing, z_loss, True)
    grad2d.copy_(g * (rows.double()[:, None] if rows.dim() else rows.double()))


def _no_outputs(*args) -> None:
    return None


_backward = define_op("fastlab::cross_entropy_backward", fake=_no_outputs,
                      mutates_args=("grad",), triton=True)(_backward_impl)


def _scale_grad_impl(grad: Tensor, factor: Tensor) -> None:
    """Multiply ``grad`` (..., K) by ``factor``: one value, or one per row (...)."""
    if grad.numel() == 0:
        return
    rows = grad.reshape(-1, grad.shape[-1]) if grad.dim() else grad.reshape(1, 1)
    per_row = factor.reshape(-1) if factor.dim() else factor
    if _kernel_ok(grad, factor):
        from fastlab.kernels.cross_entropy import scale_rows_

        scale_rows_(rows, per_row.to(torch.float32))
    else:
        # out of place then copied back: an in-place bf16 *= fp32 would be refused
        rows.copy_(rows * (per_row[:, None] if per_row.dim() else per_row))


_scale_grad = define_op("fastlab::scale_grad", fake=_no_outputs, mutates_args=("grad",),
                        triton=True)(_scale_grad_impl)


def scale_grad_(grad: Tensor, factor: Tensor) -> None:
    """In-place ``grad *= factor`` that leaves rows with factor exactly 1 untouched."""
    _scale_grad(grad, factor)


# The ops write the gradient into a buffer (or over the logits), and register_autograd
# takes functional ops only: autograd is this Function around them.
class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss, reduction,
                check_targets, inplace_backward):
        args = (ignore_index, label_smoothing, z_loss, reduction, check_targets)
        ctx.deferred = logits.dtype == torch.float16
        if ctx.deferred:
            loss, zl = _forward(logits, target, None, *args)
            ctx.inplace = inplace_backward
            ctx.options = (ignore_index, label_smoothing, z_loss, reduction)
            ctx.save_for_backward(logits, target)
        elif inplace_backward:
            loss, zl = _forward(logits, target, logits, *args)
            ctx.save_for_backward(logits)
        else:
            # contiguous whatever the logits' layout, so it always views as (N, V)
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            loss, zl = _forward(logits, target, grad, *args)
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(zl)
        # the z-loss output never has a gradient: without this, autograd builds a zero
        # tensor for it on every backward (a fill launch, 30-90 us of host time measured)
        ctx.set_materialize_grads(False)
        return loss, zl

    @staticmethod
    def backward(ctx, grad_loss, grad_zl):
        if grad_loss is None:
            return (None,) * 8
        if ctx.deferred:
            logits, target = ctx.saved_tensors
            if ctx.inplace:
                grad = logits
            else:
                grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            _backward(logits, target, grad, grad_loss, *ctx.options)
        else:
            (grad,) = ctx.saved_tensors
            scale_grad_(grad, grad_loss)
        return grad, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------ public API

def validate(logits: Tensor, target: Tensor, ignore_index, label_smoothing, reduction,
             z_loss, logits_name: str = "logits") -> None:
    """Clear errors for bad arguments, the same whichever path then runs (kernel or
    reference); metadata only (no device sync). Target values are checked by the op itself,
    on request (``check_targets``)."""
    if not isinstance(logits, Tensor) or logits.dtype not in _LOGIT_DTYPES:
        got = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
        raise TypeError(f"{logits_name} must be a float32, bfloat16, float16 or float64 "
                        f"tensor, got {got}")
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32):
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"target must hold class indices as int64 or int32, got {got} "
                        "(class probabilities are not supported)")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{logits_name} must have shape (..., V) with V >= 1, got "
                         f"{tuple(logits.shape)}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(logits.shape[:-1])} ({logits_name}'s "
                         f"shape without its last dimension), got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but {logits_name} is on "
                         f"{logits.device}; both must be on the same device")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0.0 <= float(z_loss) < float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0,
                  inplace_backward: bool = False, return_z_loss: bool = False,
                  check_targets: Optional[bool] = None):
    """Cross-entropy of ``logits`` (..., V) against class indices ``target`` (...).

    Same semantics as ``F.cross_entropy`` with the classes on the last dimension: the mean
    is over non-ignored targets, and an all-ignored batch gives 0 (not NaN) with zero
    gradients. ``z_loss > 0`` adds ``z_loss * logsumexp(logits)**2`` per row (same
    reduction); ``return_z_loss=True`` also returns that term, detached, for logging.
    ``inplace_backward=True`` writes the gradient over ``logits`` during the forward.
    ``check_targets`` (default: only for CPU tensors) validates the class indices on the
    host, which syncs on CUDA.
    """
    validate(logits, target, ignore_index, label_smoothing, reduction, z_loss)
    check = target.device.type == "cpu" if check_targets is None else bool(check_targets)
    args = (int(ignore_index), float(label_smoothing), float(z_loss), reduction, check)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, zl = _CrossEntropy.apply(logits, target, *args, bool(inplace_backward))
    else:
        loss, zl = _forward(logits, target, None, *args)
    return (loss, zl) if return_z_loss else loss
