"""Linear layer + cross-entropy without the full logits: ``hidden @ weight.T (+ bias)``.

The tokens are cut into chunks. For each chunk the logits (chunk x V, in the compute dtype:
hidden's, or the autocast dtype) are computed, the cross-entropy kernel turns them in place
into their gradient (already multiplied by 1/n_valid for a mean), and that gradient feeds
the three products that need it: grad_hidden (chunk rows, fp32 accumulation over V inside
the matmul), grad_weight and grad_bias (accumulated across chunks in float32 and cast once
at the end: the first chunk's product is written, not added to zeros). The backward only
multiplies these by the incoming scalar, skipped when it is exactly 1.

``reduction="none"`` cannot fold a per-row incoming gradient into grad_weight ahead of
time: its forward computes the losses only and its backward recomputes each chunk's logits
with the incoming gradient of every row (one more matmul). float16 logits (fp16 inputs, or
autocast to fp16) take that deferred path for every reduction: their logits' gradient, held
in fp16, must be multiplied by the incoming gradient (a GradScaler's loss scale) before it
is rounded, or most of it falls below fp16's range (see :mod:`fastlab.ops.cross_entropy`).

Memory beyond the inputs: the chunk's logits, grad_hidden, and the float32 weight gradient
(V x H x 4 bytes). The cast at the end writes the weight's dtype into the returned tensor
directly, after the last chunk's logits are freed, so it does not raise the peak (fp32
gradient + one chunk's logits). Numerics and options are those of
:func:`fastlab.ops.cross_entropy`.

Autocast. Under ``torch.autocast`` for the inputs' device the op does what torch does for
a linear layer followed by cross-entropy: the matmul operands (hidden, weight, bias) are
cast to the autocast dtype and the logits come out in it, the loss is computed from them
with fp32 accumulation and returned in float32. Each gradient comes back in its own
input's dtype (fp32 parameters get fp32 gradients): grad_hidden and grad_weight are
accumulated in fp32 and rounded once to that dtype, never to the autocast dtype first.
There, hidden, weight and bias may have different float dtypes, as F.linear accepts under
autocast; outside it they must match. The op's body runs with autocast off, so the dtypes
chosen here are the ones its matmuls see. The casts copy hidden and weight once per call
(as autocast's F.linear does), which adds N x H and V x H values of the autocast dtype to
the memory above.

Low-memory mode (``low_memory=True``). The fp32 weight gradient is the largest buffer of
the default path: at N=16384, H=4096, V=128256 bf16 it is 2.10 GB of a 3.29 GB peak. In
low-memory mode the weight gradient is accumulated directly in the returned tensor, in the
weight's dtype: each chunk's product summed in fp32 inside its matmul and added to the
running sum with one rounding to that dtype per chunk, as cuBLAS does with beta = 1 (fp32
weights under autocast accumulate in fp32, as in the default; a half-precision weight
under autocast to the other half type accumulates in the compute dtype and is converted
at the end). The chunks are small, their logits within
``_LOW_MEMORY_LOGITS_BYTES``. Peak memory beyond the inputs, with s_* the itemsizes of the
weight, hidden and compute dtypes and c the chunk's rows::

    V*H*s_w        weight gradient (the accumulator is the returned tensor)
  + N*H*s_h        hidden gradient
  + c*V*s_c        one chunk's logits, overwritten by their gradient
  + 8*N            loss and z-loss rows (+ V*(4 + s_b) with a bias: its fp32 sum)

At N=16384, H=4096, V=128256 bf16, c = 768 (the budget's 192 MiB of logits): 1,050,673,152
+ 134,217,728 + 197,001,216 + 131,072 bytes = 1.382 GB (1.287 GiB), against the default's
2,101,346,304 + 134,217,728 + 1,050,673,152 (4096-row chunks) + 131,072 = 3.286 GB.
Under autocast, add the casts (N*H + V*H values of the compute dtype) to either.
The mode is slower than the default: its three products per chunk have only c rows to
share (the weight gradient's K loop is c long), and cuBLAS runs such short products below
the rate of the default's 4096-row ones (benches/results/h200-2026-12-02d/NOTES.md).

Error: the hidden gradient and the loss are the default's (each chunk's hidden gradient is
one matmul over the whole vocabulary); the weight gradient carries one rounding per chunk
instead of one in all, so its error grows with the number of chunks, about sqrt(chunks)
ulps of the weight's dtype on entries that do not cancel (tests/test_fused_linear_cross_
entropy.py measures it against the fp32 path and float64). The reference path computes in
float64 whatever the mode: the mode changes only how the kernel path accumulates.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastlab.ops._dispatch import define_op
from fastlab.ops.cross_entropy import (_grad_scale, _kernel_ok, _reduce, _reference_rows,
                                       check_target_range, cross_entropy_ref, scale_grad_,
                                       validate)

#: Budget for one chunk's logits: 1 GiB holds 4096 rows of a 128K bf16 vocabulary. Each
#: chunk's weight-gradient matmul reads and writes the fp32 accumulator (V x H x 4 bytes)
#: once, so fewer, larger chunks cut that traffic (numbers in
#: benches/results/2026-12-02_cross_entropy_launch_notes.md).
_CHUNK_LOGITS_BYTES = 1 << 30
#: Fewest rows per chunk, so a small vocabulary still gets matmuls worth launching.
_MIN_CHUNK = 256
#: Budget for one chunk's logits in low-memory mode: 192 MiB is 768 rows of a 128K bf16
#: vocabulary, which keeps the mode's peak (module docstring) at 1.38 GB at N=16384 H=4096.
_LOW_MEMORY_LOGITS_BYTES = 192 << 20
#: Low-memory chunks are a multiple of this many rows when they can be (a matmul tile).
_LOW_MEMORY_ROW_MULTIPLE = 128
#: Fewest rows per low-memory chunk, whatever the vocabulary.
_LOW_MEMORY_MIN_CHUNK = 16
#: Dtypes autocast casts to its own (float64 stays float64 under autocast, as in torch).
_AUTOCAST_CAST = (torch.float32, torch.bfloat16, torch.float16)


def _autocast_casts(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether autocast is on for hidden's device and casts every input (none is float64)."""
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    return (torch.is_autocast_enabled(hidden.device.type)
            and all(t.dtype in _AUTOCAST_CAST for t in inputs))


def compute_dtype(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> torch.dtype:
    """Dtype of the matmul operands and the logits: the autocast dtype of hidden's device
    when autocast casts the inputs, else hidden's dtype."""
    if _autocast_casts(hidden, weight, bias):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def chunk_rows(n_tokens: int, vocab: int, itemsize: int, low_memory: bool = False) -> int:
    """Rows per chunk, at most the token count. Default: a power of two within the logits
    budget. Low-memory: as many rows as ``_LOW_MEMORY_LOGITS_BYTES`` holds, a multiple of
    ``_LOW_MEMORY_ROW_MULTIPLE`` when that is at least one multiple."""
    row_bytes = max(1, vocab * itemsize)
    if low_memory:
        rows = max(_LOW_MEMORY_MIN_CHUNK, _LOW_MEMORY_LOGITS_BYTES // row_bytes)
        if rows >= _LOW_MEMORY_ROW_MULTIPLE:
            rows -= rows % _LOW_MEMORY_ROW_MULTIPLE
    else:
        rows = max(_MIN_CHUNK, _CHUNK_LOGITS_BYTES // row_bytes)
        rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, n_tokens))


def peak_extra_bytes(n_tokens: int, hidden_size: int, vocab: int, *, dtype: torch.dtype,
                     low_memory: bool = False, chunk_size: Optional[int] = None) -> int:
    """Memory the kernel path allocates beyond its inputs for one forward + backward with
    gradients (the returned ones included), inputs of ``dtype``, no bias, no autocast: the
    formula of the module docstring. The default's fp32 accumulator of a half-precision
    weight is cast after the last chunk's logits are freed: the larger of the two counts."""
    s = torch.empty((), dtype=dtype).element_size()
    chunk = min(chunk_size or chunk_rows(n_tokens, vocab, s, low_memory), n_tokens)
    fixed = n_tokens * hidden_size * s + 8 * n_tokens
    if low_memory or dtype == torch.float32:
        return fixed + vocab * hidden_size * s + chunk * vocab * s
    return fixed + vocab * hidden_size * 4 + max(chunk * vocab * s, vocab * hidden_size * s)


def fused_linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, target: Tensor,
                                   bias: Optional[Tensor] = None, **options):
    """Plain-PyTorch oracle: the full logits in float64, then :func:`cross_entropy_ref`."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return cross_entropy_ref(logits, target, **options)


def _mm_into_impl(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """out = a @ b, or out += a @ b with ``accumulate``: summed in fp32 and rounded once to
    out's dtype, which is a's or fp32 (cuBLAS's ``out_dtype`` for half-precision operands;
    upcast first where there is no such kernel, the CPU)."""
    if out.dtype == a.dtype:
        out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    elif not a.is_cuda:
        product = a.float() @ b.float()
        out.add_(product) if accumulate else out.copy_(product)
    elif accumulate:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=out)


# An opaque op: Inductor's decompositions of mm/addmm with out= (and out_dtype) fail on the
# traced body of the fused op (a triton_op), and writing into `out` is the point.
_mm_into = define_op("fastlab::mm_into", fake=lambda out, a, b, accumulate: None,
                     mutates_args=("out",))(_mm_into_impl)


def _product(a: Tensor, b: Tensor, acc: Optional[Tensor]) -> Tensor:
    """a @ b in fp32 (accumulated in fp32 whatever the operands' dtype), added into ``acc``
    (fp32) unless it is None."""
    if a.dtype != torch.float32 and not a.is_cuda:
        a, b = a.float(), b.float()
    if acc is None:
        return a @ b if a.dtype == torch.float32 else torch.mm(a, b, out_dtype=torch.float32)
    _mm_into(acc, a, b, True)
    return acc


def _half_product(a: Tensor, b: Tensor, acc: Optional[Tensor]) -> Tensor:
    """a @ b in a's (half-precision) dtype, added into ``acc`` (same dtype) unless it is
    None: summed in fp32 and rounded once to that dtype per call, as cuBLAS does (with
    beta = 1 for the addition); the CPU does the same in fp32."""
    if a.is_cuda:
        if acc is None:
            return torch.mm(a, b)
        _mm_into(acc, a, b, True)
        return acc
    total = _product(a, b, None if acc is None else acc.float())
    return total.to(a.dtype) if acc is None else acc.copy_(total)


def _product_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b accumulated in fp32 and rounded once to out's dtype, which is a's or,
    under autocast, another one (fp32 for fp32 hidden)."""
    if out.dtype == a.dtype or (out.dtype == torch.float32 and a.is_cuda):
        _mm_into(out, a, b, False)
    else:
        out.copy_(_product(a, b, None))


def _chunked(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
             scale: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
             with_grad: bool, chunk: int, grad_dtypes, low_memory: bool):
    """Kernel path over token chunks: (loss rows, z rows, grads or Nones). ``hidden``,
    ``weight`` and ``bias`` are in the compute dtype, the gradients in ``grad_dtypes``
    (hidden's, weight's, bias's). ``scale`` is the gradient factor, one value or one per
    row. ``low_memory``: the weight gradient accumulates in the compute dtype (in fp32 for
    an fp32 weight) instead of in fp32 (module docstring)."""
    from fastlab.kernels.cross_entropy import cross_entropy_forward

    N, H = hidden.shape
    V = weight.shape[0]
    hidden_dtype, weight_dtype, bias_dtype = grad_dtypes
    loss = torch.empty(N, device=hidden.device, dtype=torch.float32)
    zloss = torch.empty_like(loss)
    grad_hidden = grad_bias = acc = None
    # the accumulator in the matmuls' own dtype (low-memory mode, half-precision operands)
    half_acc = low_memory and weight_dtype != torch.float32 and hidden.dtype != torch.float32
    if with_grad:
        grad_hidden = torch.empty(N, H, device=hidden.device, dtype=hidden_dtype)
        if bias is not None:
            grad_bias = torch.zeros(V, device=weight.device, dtype=torch.float32)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        h = hidden[start:end]
        logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        rows_scale = scale if scale.dim() == 0 else scale[start:end]
        loss[start:end], zloss[start:end] = cross_entropy_forward(
            logits, target[start:end], logits if with_grad else None, rows_scale,
            ignore_index, label_smoothing, z_loss)
        if with_grad:
            _product_into(grad_hidden[start:end], logits, weight)
            acc = (_half_product if half_acc else _product)(logits.T, h, acc)
            if grad_bias is not None:
                grad_bias += logits.sum(dim=0, dtype=torch.float32)
        del logits
    if not with_grad:
        return loss, zloss, None, None, None
    if acc is None:  # no tokens
        acc = torch.zeros(V, H, device=weight.device, dtype=torch.float32)
    grad_weight = acc.to(weight_dtype)  # no copy when the accumulator has the weight's dtype
    del acc
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias_dtype)
    return loss, zloss, grad_hidden, grad_weight, grad_bias


def _reference(hidden, weight, bias, target, scale, ignore_index, label_smoothing, z_loss,
               with_grad, grad_dtypes):
    """Reference path: full float64 logits of the compute-dtype operands and the
    written-out gradient, rounded once to ``grad_dtypes``."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    rows, zrows, g = _reference_rows(logits, target, ignore_index, label_smoothing, z_loss,
                                     with_grad)
    if not with_grad:
        return rows, zrows, None, None, None
    hidden_dtype, weight_dtype, bias_dtype = grad_dtypes
    g = g * (scale.double() if scale.dim() == 0 else scale.double()[:, None])
    grad_bias = None if bias is None else g.sum(dim=0).to(bias_dtype)
    return (rows, zrows, (g @ weight.double()).to(hidden_dtype),
            (g.T @ hidden.double()).to(weight_dtype), grad_bias)


def _run(hidden, weight, bias, target, scale, ignore_index, label_smoothing, z_loss,
         with_grad, chunk_size, dtype, low_memory):
    """Either path on the operands cast to ``dtype`` (a copy only under autocast), with
    autocast off inside so that every matmul runs in the dtypes chosen here."""
    grad_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    h2 = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    t = target.reshape(-1)
    with torch.autocast(hidden.device.type, enabled=False):
        if _kernel_ok(h2, weight, target):
            chunk = chunk_size or chunk_rows(h2.shape[0], weight.shape[0], h2.element_size(),
                                             low_memory)
            return _chunked(h2, weight, bias, t, scale, ignore_index, label_smoothing,
                            z_loss, with_grad, chunk, grad_dtypes, low_memory)
        return _reference(h2, weight, bias, t, scale, ignore_index, label_smoothing, z_loss,
                          with_grad, grad_dtypes)


def _empty_grad(like: Optional[Tensor], grad: Optional[Tensor]) -> Tensor:
    """Custom ops return tensors only: an absent bias gets an empty gradient."""
    if grad is not None:
        return grad
    return torch.empty(0, device=like.device, dtype=like.dtype)


def _forward_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                  ignore_index: int, label_smoothing: float, z_loss: float, reduction: str,
                  check_targets: bool, with_grad: bool, chunk_size: int, dtype: torch.dtype,
                  low_memory: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss, z-loss, and (with_grad) the pre-scaled gradients of hidden, weight, bias;
    ``dtype`` is the matmuls' (:func:`compute_dtype`)."""
    if check_targets and not torch.compiler.is_compiling():
        # a host read: traced bodies (fake tensors) cannot make it
        check_target_range(target, weight.shape[0], ignore_index)
    t = target.reshape(-1)
    scale, n_valid = _grad_scale(t, ignore_index, reduction)
    rows, zrows, gh, gw, gb = _run(hidden, weight, bias, target, scale, ignore_index,
                                   label_smoothing, z_loss, with_grad, chunk_size, dtype,
                                   low_memory)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lead = hidden.shape[:-1]
    loss = _reduce(rows, t, ignore_index, reduction, lead, n_valid).to(out_dtype)
    zl = _reduce(zrows, t, ignore_index, reduction, lead, n_valid).to(out_dtype)
    if not with_grad:
        gh = gw = gb = None
    return (loss, zl, _empty_grad(hidden, None if gh is None else gh.view_as(hidden)),
            _empty_grad(weight, gw), _empty_grad(weight, gb))


def _forward_fake(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss,
                  reduction, check_targets, with_grad, chunk_size, dtype, low_memory):
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    shape = hidden.shape[:-1] if reduction == "none" else ()
    loss = hidden.new_empty(shape, dtype=out_dtype)
    if not with_grad:
        empty = hidden.new_empty(0)
        return loss, torch.empty_like(loss), empty, weight.new_empty(0), weight.new_empty(0)
    gb = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    return (loss, torch.empty_like(loss), torch.empty_like(hidden), torch.empty_like(weight),
            gb)


def _backward_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                   grad_loss: Tensor, ignore_index: int, label_smoothing: float,
                   z_loss: float, reduction: str, chunk_size: int, dtype: torch.dtype,
                   low_memory: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of the deferred path: each row's gradient times ``grad_loss`` (one per
    row for ``reduction="none"``, else one value, with the mean's 1/n_valid)."""
    if reduction == "none":
        scale = grad_loss.reshape(-1).to(torch.float32)
    else:
        scale = _grad_scale(target.reshape(-1), ignore_index, reduction)[0] * grad_loss.to(
            torch.float32)
    _, _, gh, gw, gb = _run(hidden, weight, bias, target, scale, ignore_index,
                            label_smoothing, z_loss, True, chunk_size, dtype, low_memory)
    return gh.view_as(hidden), gw, _empty_grad(weight, gb)


def _backward_fake(hidden, weight, bias, target, grad_loss, ignore_index, label_smoothing,
                   z_loss, reduction, chunk_size, dtype, low_memory):
    gb = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(hidden), torch.empty_like(weight), gb


_backward = define_op("fastlab::fused_linear_cross_entropy_backward", fake=_backward_fake,
                      triton=True)(_backward_impl)

_forward = define_op("fastlab::fused_linear_cross_entropy_forward", fake=_forward_fake,
                     triton=True)(_forward_impl)


# The backward multiplies the forward's gradients in place (no second V x H buffer); a
# registered autograd formula may not mutate the op's saved outputs, so autograd is this
# Function around the ops.
class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, label_smoothing, z_loss,
                reduction, check_targets, chunk_size, dtype, low_memory):
        deferred = reduction == "none" or dtype == torch.float16
        loss, zl, gh, gw, gb = _forward(hidden, weight, bias, target, ignore_index,
                                        label_smoothing, z_loss, reduction, check_targets,
                                        not deferred, chunk_size, dtype, low_memory)
        ctx.deferred = deferred
        ctx.has_bias = bias is not None
        ctx.options = (ignore_index, label_smoothing, z_loss, reduction, chunk_size, dtype,
                       low_memory)
        if deferred:
            ctx.save_for_backward(hidden, weight, bias, target)
        else:
            ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(zl)
        ctx.set_materialize_grads(False)  # no zero tensor for the z-loss output's gradient
        return loss, zl

    @staticmethod
    def backward(ctx, grad_loss, grad_zl):
        if grad_loss is None:
            return (None,) * 12
        if ctx.deferred:
            hidden, weight, bias, target = ctx.saved_tensors
            gh, gw, gb = _backward(hidden, weight, bias, target, grad_loss, *ctx.options)
        else:
            gh, gw, gb = ctx.saved_tensors
            for g in (gh, gw, gb):
                scale_grad_(g, grad_loss)
        return (gh, gw, gb if ctx.has_bias else None) + (None,) * 9


def _validate(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, z_loss,
              chunk_size, low_memory) -> None:
    """Every argument check of :func:`fused_linear_cross_entropy`, made before the kernel or
    the reference path is chosen, so both refuse the same inputs with the same errors."""
    validate(hidden, target, ignore_index, label_smoothing, reduction, z_loss,
             logits_name="hidden")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    if weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor (V, H)")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) to match hidden's "
                         f"last dimension, got {tuple(weight.shape)}")
    # under autocast every input is cast to the compute dtype, so their dtypes may differ
    any_dtype = _autocast_casts(hidden, weight, bias)
    if weight.device != hidden.device or weight.dtype != hidden.dtype and not any_dtype:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match hidden "
                         f"({hidden.dtype}, {hidden.device})")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != hidden.device
                             or bias.dtype != hidden.dtype and not any_dtype):
        raise ValueError(f"bias must be a ({weight.shape[0]},) tensor of {hidden.dtype} on "
                         f"{hidden.device}, got {tuple(bias.shape)} {bias.dtype} "
                         f"{bias.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or
                                   not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(low_memory, bool):
        raise TypeError(f"low_memory must be a bool, got {type(low_memory).__name__}")


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor,
                               bias: Optional[Tensor] = None, *, ignore_index: int = -100,
                               label_smoothing: float = 0.0, reduction: str = "mean",
                               z_loss: float = 0.0, return_z_loss: bool = False,
                               check_targets: Optional[bool] = None,
                               chunk_size: Optional[int] = None, low_memory: bool = False):
    """``cross_entropy(hidden @ weight.T + bias, target, ...)`` without the full logits.

    ``hidden`` (..., H), ``weight`` (V, H), ``bias`` (V,) or None, ``target`` (...) class
    indices. Options as :func:`fastlab.ops.cross_entropy`; ``chunk_size`` (tokens per
    chunk) defaults to a choice from the shapes. ``low_memory=True`` accumulates the weight
    gradient in the weight's dtype over small chunks instead of in fp32 (at N=16384 H=4096
    V=128256 bf16: 1.38 GB beyond the inputs instead of 3.29 GB), at the cost of one
    rounding of the weight gradient per chunk (module docstring).
    """
    _validate(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, z_loss,
              chunk_size, low_memory)
    check = target.device.type == "cpu" if check_targets is None else bool(check_targets)
    args = (int(ignore_index), float(label_smoothing), float(z_loss), reduction, check)
    dtype = compute_dtype(hidden, weight, bias)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if wants_grad:
        loss, zl = _FusedLinearCrossEntropy.apply(hidden, weight, bias, target, *args,
                                                  chunk_size or 0, dtype, low_memory)
    else:
        loss, zl = _forward(hidden, weight, bias, target, *args, False, chunk_size or 0,
                            dtype, low_memory)[:2]
    return (loss, zl) if return_z_loss else loss
