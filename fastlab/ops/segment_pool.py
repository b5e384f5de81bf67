"""Ragged segment pooling and its inverse, over one level or a whole hierarchy.

Layout. ``x`` is ``(N, D)``: the rows of all units (characters of all words, say)
concatenated. ``offsets`` is ``(S + 1,)`` int32 or int64 in CSR form: unit ``s`` owns rows
``offsets[s] <= r < offsets[s + 1]``, so ``offsets[0] == 0``, ``offsets[-1] == N`` and
offsets never decrease. Empty units are allowed: they pool to 0 and get zero gradient.

Ops. :func:`segment_pool` reduces each unit to one vector (sum, mean, max, min, first,
last); :func:`segment_broadcast` repeats each unit's vector over its rows (the decoder's
unpool, optionally shifted by one unit for causal models and fused with a residual
``base``); :func:`hierarchical_pool` pools through several levels in one call. The helpers
build offsets from lengths or boundary masks and convert to and from padded ``(S, L, D)``.

Kernels. The ops run the C++/CUDA extension ``fastlab._C`` (csrc/), registered as
``torch.ops.fastlab.*`` with the fake kernels and autograd formulas below, so they trace
under ``torch.compile(fullgraph=True)``. Accumulation is in fp32 for bf16/fp16 (fp64 for
fp64); backward is deterministic (no atomics): sum/mean backward is a broadcast and
broadcast backward a segment sum, both twice differentiable; max/min route the gradient to
the arg row, the first one on ties. ``backend("reference")`` (fastlab.ops) runs the
plain-PyTorch references instead.

Integers. Pooling and broadcasting take int32/int64 values with torch_scatter's semantics
(its segment_csr): sums wrap around in the input's width, a mean is the sum divided by the
row count truncated toward zero, max/min and first/last as for floats; no gradients. The
CPU kernels run them (accumulating in 64 bits, so an int32 mean is exact even where its sum
overflows int32, where torch_scatter's wraps first); the CUDA kernels do not, and CUDA
integer inputs run the reference, which syncs with the host for max/min (the longest unit
sizes its padded view).

Host syncs. Output sizes come from shapes (``offsets.shape``, ``total``), never from
offsets' values, so no op syncs with the GPU. Offsets' values are checked (start at 0, end at
N, non-decreasing) always on CPU, and on CUDA only with ``validate=True``, which costs one
device-to-host copy. Unchecked bad offsets give unspecified values but never an
out-of-bounds access: the kernels clamp them. The helpers that must size their output from
data (``num_segments=None``, ``max_len=None``, ``total=None``) sync once, and say so.
"""
import contextlib
from typing import List, Optional, Sequence, Union

import torch

from fastlab._ext import extension_available, load_extension
from fastlab.ops._dispatch import extension_op, reference_forced

REDUCTIONS = ("sum", "mean", "max", "min", "first", "last")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: Integer values segment_pool and segment_broadcast take (no gradients, as in torch).
INT_DTYPES = (torch.int32, torch.int64)
INDEX_DTYPES = (torch.int32, torch.int64)
INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# Offsets and layout helpers (plain PyTorch, differentiable where data flows through them)
# ---------------------------------------------------------------------------------------------

def _check_index_vector(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """CSR offsets ``(S + 1,)`` from unit lengths ``(S,)``, in lengths' dtype."""
    _check_index_vector("lengths", lengths)
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0, dtype=lengths.dtype)])


def lengths_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """Unit lengths ``(S,)`` from CSR offsets ``(S + 1,)``."""
    _check_index_vector("offsets", offsets)
    return offsets[1:] - offsets[:-1]


def segment_ids(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """The unit of each of the ``total`` rows, ``(total,)`` in offsets' dtype."""
    _check_index_vector("offsets", offsets)
    rows = torch.arange(total, dtype=offsets.dtype, device=offsets.device)
    return torch.searchsorted(offsets[1:].contiguous(), rows, right=True)


def offsets_from_mask(is_end: torch.Tensor, num_segments: Optional[int] = None) -> torch.Tensor:
    """CSR offsets (int64) of the units that a boundary mask delimits.

    ``is_end`` is ``(N,)`` bool, True at the last row of a unit (a word ends at a space, a
    sentence at an end-of-sentence token); rows after the last True form one more unit.
    ``num_segments`` fixes S without a host sync: extra units are empty (padding), and too
    few leave ``offsets[-1] < N``, which the ops reject. ``None`` counts the units, which
    reads one number from the device (a host sync).
    """
    if not isinstance(is_end, torch.Tensor) or is_end.dtype != torch.bool:
        raise TypeError(f"is_end must be a bool tensor, got "
                        f"{getattr(is_end, 'dtype', type(is_end).__name__)}")
    if is_end.dim() != 1:
        raise ValueError(f"is_end must be 1-D (rows,), got shape {tuple(is_end.shape)}")
    ends = is_end.long()
    unit = ends.cumsum(0) - ends  # unit of each row = number of ends strictly before it
    if num_segments is None:
        num_segments = int(unit[-1]) + 1 if unit.numel() else 0  # host sync, documented
    if num_segments < 0:
        raise ValueError(f"num_segments must be >= 0, got {num_segments}")
    wanted = torch.arange(num_segments + 1, device=is_end.device)
    return torch.searchsorted(unit, wanted)


def ragged_to_padded(x: torch.Tensor, offsets: torch.Tensor, max_len: Optional[int] = None,
                     *, fill: float = 0.0) -> torch.Tensor:
    """Ragged rows ``(N, D)`` to padded units ``(S, max_len, D)``, padding with ``fill``.

    Units longer than ``max_len`` are truncated. ``None`` uses the longest unit, which reads
    one number from the device (a host sync). Differentiable in ``x``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, features), got shape {tuple(x.shape)}")
    lengths = lengths_from_offsets(offsets)
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0  # host sync, documented
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    total = x.shape[0]
    position = torch.arange(max_len, dtype=offsets.dtype, device=offsets.device)
    rows = offsets[:-1, None] + position
    # Padding slots read an extra row holding `fill`; clamping keeps bad offsets in bounds.
    rows = torch.where(position < lengths[:, None], rows, total).clamp(0, total)
    source = torch.cat([x, x.new_full((1, x.shape[1]), fill)])
    return source[rows]


def padded_to_ragged(padded: torch.Tensor, lengths: torch.Tensor,
                     total: Optional[int] = None) -> "tuple[torch.Tensor, torch.Tensor]":
    """Padded units ``(S, L, D)`` with ``lengths`` ``(S,)`` to ragged rows and offsets.

    Returns ``(x, offsets)``: x ``(total, D)`` holds the first ``lengths[s]`` rows of each
    unit (lengths are clamped to L). ``total`` is ``sum(lengths)``; ``None`` reads it from
    the device (a host sync). Differentiable in ``padded``.
    """
    if padded.dim() != 3:
        raise ValueError(f"padded must be 3-D (units, length, features), got shape "
                         f"{tuple(padded.shape)}")
    _check_index_vector("lengths", lengths)
    units, width, features = padded.shape
    if lengths.shape[0] != units:
        raise ValueError(f"lengths must have padded.shape[0] = {units} entries, got "
                         f"{lengths.shape[0]}")
    offsets = offsets_from_lengths(lengths.clamp(0, width))
    if total is None:
        total = int(offsets[-1])  # host sync, documented
    if units == 0 or width == 0:
        return padded.new_zeros(total, features), offsets
    unit = segment_ids(offsets, total).clamp(max=units - 1)
    rows = torch.arange(total, dtype=offsets.dtype, device=offsets.device)
    position = (rows - offsets[unit]).clamp(0, width - 1)
    return padded[unit, position], offsets


# ---------------------------------------------------------------------------------------------
# References: the test oracle and the backend("reference") path
# ---------------------------------------------------------------------------------------------

def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        return torch.int64
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_pool_ref(x: torch.Tensor, offsets: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Plain-PyTorch segment pooling with the kernels' semantics (fp32 accumulation, empty
    units give 0, max/min pick the first row on ties). Integers as torch_scatter's
    segment_csr: sums in int64 wrapped to the input's width, a mean truncated toward zero.
    Reads offsets on the host."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    lengths = lengths_from_offsets(offsets)
    units, features = lengths.shape[0], x.shape[1]
    acc = x.to(_accumulation_dtype(x.dtype))
    if reduce in ("sum", "mean"):
        out = acc.new_zeros(units, features).index_add(0, segment_ids(offsets, x.shape[0]), acc)
        if reduce == "mean":
            count = lengths.clamp(min=1)[:, None].to(out.dtype)
            out = out / count if out.is_floating_point() else out.div(count, rounding_mode="trunc")
        return out.to(x.dtype)
    if acc.is_floating_point():
        fill = {"max": -float("inf"), "min": float("inf")}.get(reduce, 0.0)
    else:
        fill = {"max": torch.iinfo(acc.dtype).min, "min": torch.iinfo(acc.dtype).max}.get(
            reduce, 0)
    padded = ragged_to_padded(acc, offsets, max(int(lengths.max()) if units else 0, 1), fill=fill)
    if reduce == "max":
        out = padded.max(dim=1).values
    elif reduce == "min":
        out = padded.min(dim=1).values
    elif reduce == "first":
        out = padded[:, 0]
    else:
        out = padded[torch.arange(units, device=x.device), (lengths - 1).clamp(min=0)]
    return torch.where(lengths[:, None] > 0, out, out.new_zeros(())).to(x.dtype)


def segment_broadcast_ref(y: torch.Tensor, offsets: torch.Tensor, total: Optional[int] = None,
                          shift: int = 0, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-PyTorch broadcast: row r of unit s gets ``base[r] + y[s - shift]`` (0 for
    ``s < shift``), computed in fp32 for bf16/fp16 and rounded once."""
    if total is None:
        total = base.shape[0] if base is not None else int(offsets[-1])
    acc_dtype = _accumulation_dtype(y.dtype)
    source = torch.cat([y.new_zeros(1, y.shape[1]), y]).to(acc_dtype)
    unit = segment_ids(offsets, total)
    out = source[(unit - shift + 1).clamp(min=0)]
    if base is not None:
        out = base.to(acc_dtype) + out
    return out.to(y.dtype)


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd of the extension's ops
# ---------------------------------------------------------------------------------------------
# The fake kernels repeat the structural checks of csrc/segment_pool.cpp with the same
# messages, so a traced program fails like an eager one.

def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")


def _check_features(op: str, name: str, t: torch.Tensor, integers: bool = False) -> None:
    """``integers``: int32/int64 values are taken too (the extension's CPU kernels only;
    the public functions run CUDA ones through the reference)."""
    _check_tensor(op, name, t)
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
    if integers and t.dtype not in FLOAT_DTYPES + INT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float64, float16, bfloat16, int32 or "
                        f"int64, got {t.dtype}")
    if not integers and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got "
                        f"{t.dtype}")


def _check_kernel_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """The extension's own rule (its fake kernels repeat it): integers on CPU only."""
    if t.dtype in INT_DTYPES and t.device.type == "cuda":
        raise TypeError(f"{op}: {name} of dtype {t.dtype} runs on CPU tensors only "
                        f"(fastlab.ops.{op} runs CUDA integer inputs through the reference)")


def _check_offsets(op: str, offsets: torch.Tensor, like: torch.Tensor, like_name: str,
                   total) -> None:
    _check_tensor(op, "offsets", offsets)
    if offsets.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: offsets must be int32 or int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"{op}: offsets must be 1-D with S + 1 >= 1 boundaries, got shape "
                         f"{tuple(offsets.shape)}")
    if offsets.device != like.device:
        raise ValueError(f"{op}: offsets must be on {like_name}'s device {like.device}, got "
                         f"{offsets.device}")
    if offsets.dtype == torch.int32 and total > INT32_MAX:
        raise ValueError(f"{op}: int32 offsets address at most 2**31 - 1 rows, got {total}; "
                         "use int64 offsets")


def _check_segments(op: str, offsets: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if offsets.shape[0] - 1 != t.shape[0]:
        raise ValueError(f"{op}: offsets must have {name}.shape[0] + 1 = {t.shape[0] + 1} "
                         f"boundaries, got {offsets.shape[0]}")


def _check_reduce(op: str, reduce) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"{op}: reduce must be one of 'sum', 'mean', 'max', 'min', "
                         f"'first', 'last', got '{reduce}'")


def _check_pool_args(x, offsets, reduce) -> None:
    _check_reduce("segment_pool", reduce)
    _check_features("segment_pool", "x", x, integers=True)
    _check_offsets("segment_pool", offsets, x, "x", x.shape[0])


def _check_offset_values(op: str, offsets: torch.Tensor, total: int) -> None:
    """offsets start at 0, end at ``total`` and never decrease: a host sync on CUDA."""
    o = offsets.long()
    first, last, ordered = torch.stack([o[0], o[-1], (o.diff() >= 0).all().long()]).tolist()
    if first != 0:
        raise ValueError(f"{op}: offsets must start at 0, got {first}")
    if last != total:
        raise ValueError(f"{op}: offsets must end at the number of rows ({total}), got {last}")
    if not ordered:
        raise ValueError(f"{op}: offsets must be non-decreasing")


# One validation function per op, run by the public functions before they choose a path, so
# backend("reference") refuses what the extension refuses, with the same messages (those of
# csrc/segment_pool.cpp, which checks again: metadata only). Offsets' values, which need a
# host copy on CUDA, are checked once: on CUDA here when asked (and the extension is told
# not to repeat it), on CPU here for the reference and by the extension's own loop for it.
# Traced calls check metadata only: the fake kernels do for the extension, these functions
# for the reference path (reading the values would break the graph).

def _check_values(op: str, offsets: torch.Tensor, total: int, validate: bool,
                  extension: bool) -> bool:
    """Offsets' values where they are due (above); returns the ``validate`` flag left to
    the extension."""
    if torch.compiler.is_compiling():
        return validate
    on_cpu = offsets.device.type == "cpu"
    if (validate and not on_cpu) or (on_cpu and not extension):
        _check_offset_values(op, offsets, total)
        return False
    return validate


def _validate_pool(x, offsets, reduce, validate: bool, extension: bool) -> bool:
    """Every check of a :func:`segment_pool` call; returns the extension's ``validate``."""
    if extension and torch.compiler.is_compiling():
        return validate
    _check_pool_args(x, offsets, reduce)
    return _check_values("segment_pool", offsets, x.shape[0], validate, extension)


def _validate_broadcast(y, offsets, total, shift, base, validate: bool, extension: bool):
    """Every check of a :func:`segment_broadcast` call; returns (total, the extension's
    ``validate``), ``total=None`` taken from base or else from offsets[-1] (a host sync)."""
    op = "segment_broadcast"
    if total is None:
        if base is not None:
            _check_tensor(op, "base", base)
            total = base.shape[0]
        else:
            _check_features(op, "y", y, integers=True)
            _check_offsets(op, offsets, y, "y", 0)
            total = int(offsets[-1])  # host sync, documented
    if extension and torch.compiler.is_compiling():
        return total, validate
    _check_broadcast_args(y, offsets, total, shift, base)
    return total, _check_values(op, offsets, total, validate, extension)


def _validate_hierarchy(level_offsets, reduce) -> List[str]:
    """:func:`hierarchical_pool`'s own checks, before any level runs (each level's call is
    checked by :func:`segment_pool`); returns the reduction of each level."""
    op = "hierarchical_pool"
    if isinstance(level_offsets, torch.Tensor) or not isinstance(level_offsets, Sequence):
        raise TypeError(f"{op}: level_offsets must be a sequence of offsets tensors, one a "
                        f"level, got {type(level_offsets).__name__}")
    reduces = [reduce] * len(level_offsets) if isinstance(reduce, str) else list(reduce)
    if len(reduces) != len(level_offsets):
        raise ValueError(f"{op}: reduce must be one string or one per level "
                         f"({len(level_offsets)}), got {len(reduces)}")
    for how in reduces:
        _check_reduce(op, how)
    return reduces


def _fake_segment_pool(x, offsets, reduce="mean", validate=False, return_arg=True):
    _check_pool_args(x, offsets, reduce)
    _check_kernel_dtype("segment_pool", "x", x)
    segments = offsets.shape[0] - 1
    out = x.new_empty(segments, x.shape[1])
    arg_shape = (segments, x.shape[1]) if reduce in ("max", "min") and return_arg else (0,)
    return out, offsets.new_empty(arg_shape)


def _check_broadcast_args(y, offsets, total, shift, base) -> None:
    op = "segment_broadcast"
    _check_features(op, "y", y, integers=True)
    if total < 0:
        raise ValueError(f"{op}: total must be >= 0, got {total}")
    if shift < 0:
        raise ValueError(f"{op}: shift must be >= 0, got {shift}")
    _check_offsets(op, offsets, y, "y", total)
    _check_segments(op, offsets, y, "y")
    if base is not None:
        if base.dim() != 2 or base.shape[0] != total or base.shape[1] != y.shape[1]:
            raise ValueError(f"{op}: base must have shape (total, y.shape[1]) = "
                             f"({total}, {y.shape[1]}), got {tuple(base.shape)}")
        if base.dtype != y.dtype:
            raise TypeError(f"{op}: base must have y's dtype {y.dtype}, got {base.dtype}")
        if base.device != y.device:
            raise ValueError(f"{op}: base must be on y's device {y.device}, got {base.device}")


def _fake_segment_broadcast(y, offsets, total, shift=0, base=None, mean=False, validate=False):
    _check_broadcast_args(y, offsets, total, shift, base)
    _check_kernel_dtype("segment_broadcast", "y", y)
    return y.new_empty(total, y.shape[1])


def _fake_segment_arg_scatter(grad, arg, offsets, total):
    op = "segment_arg_scatter"
    _check_features(op, "grad", grad)
    if total < 0:
        raise ValueError(f"{op}: total must be >= 0, got {total}")
    _check_offsets(op, offsets, grad, "grad", total)
    _check_segments(op, offsets, grad, "grad")
    if arg.shape != grad.shape:
        raise ValueError(f"{op}: arg must have grad's shape {tuple(grad.shape)}, got "
                         f"{tuple(arg.shape)}")
    if arg.dtype != offsets.dtype:
        raise TypeError(f"{op}: arg must have offsets' dtype {offsets.dtype}, got {arg.dtype}")
    return grad.new_empty(total, grad.shape[1])


def _route_to_row(grad: torch.Tensor, offsets: torch.Tensor, total, first: bool) -> torch.Tensor:
    """Backward of first/last: each unit's gradient lands on its first (last) row only."""
    # A mask with one spare slot: empty units point at it (first: offsets[s] == N; last:
    # offsets[s + 1] == 0) or at a row their non-empty neighbour marks anyway.
    marks = grad.new_zeros(total + 1)
    ends = offsets[:-1] if first else offsets[1:]
    marks.index_fill_(0, ends.clamp(0, total).long(), 1)
    mask = marks[:total] if first else marks[1:]
    spread = torch.ops.fastlab.segment_broadcast(grad, offsets, total, 0, None, False, False)
    return spread * mask[:, None]


def _pool_setup_context(ctx, inputs, output):
    x, offsets, reduce, _validate, _return_arg = inputs
    _out, arg = output
    ctx.reduce = reduce
    ctx.total = x.shape[0]
    ctx.save_for_backward(offsets, arg)


def _pool_backward(ctx, grad_out, _grad_arg):
    ops = torch.ops.fastlab
    offsets, arg = ctx.saved_tensors
    if ctx.reduce in ("sum", "mean"):
        grad_x = ops.segment_broadcast(grad_out, offsets, ctx.total, 0, None,
                                       ctx.reduce == "mean", False)
    elif ctx.reduce in ("max", "min"):
        if arg.dim() != 2:
            raise RuntimeError("segment_pool: the max/min backward needs the arg rows; call "
                               "torch.ops.fastlab.segment_pool with return_arg=True")
        grad_x = ops.segment_arg_scatter(grad_out, arg, offsets, ctx.total)
    else:
        grad_x = _route_to_row(grad_out, offsets, ctx.total, first=ctx.reduce == "first")
    return grad_x, None, None, None, None


def _broadcast_setup_context(ctx, inputs, output):
    _y, offsets, _total, shift, base, mean, _validate = inputs
    ctx.shift, ctx.mean, ctx.has_base = shift, mean, base is not None
    ctx.save_for_backward(offsets)


def _broadcast_backward(ctx, grad):
    ops = torch.ops.fastlab
    (offsets,) = ctx.saved_tensors
    # The adjoint of repeating y[s - shift] over unit s is the segment sum (mean) of unit
    # s + shift: pool every unit, then move the result `shift` units up.
    grad_y = ops.segment_pool(grad, offsets, "mean" if ctx.mean else "sum", False)[0]
    if ctx.shift:
        moved = grad_y[ctx.shift:]
        grad_y = torch.cat([moved, grad_y.new_zeros(grad_y.shape[0] - moved.shape[0],
                                                     grad_y.shape[1])])
    return grad_y, None, None, None, grad if ctx.has_base else None, None, None


def _arg_scatter_setup_context(ctx, inputs, output):
    _grad, arg, _offsets, _total = inputs
    ctx.save_for_backward(arg)


def _arg_scatter_backward(ctx, grad_grad):
    (arg,) = ctx.saved_tensors
    # Gather each unit's value back from its arg row; empty units point at the zero row N.
    padded = torch.cat([grad_grad, grad_grad.new_zeros(1, grad_grad.shape[1])])
    return padded.gather(0, arg.long()), None, None, None


_HAVE_EXTENSION = extension_available()

if _HAVE_EXTENSION:
    # the extension defines the ops and their CPU/CUDA kernels; their fakes and autograd
    # are these
    _POOL = extension_op("fastlab::segment_pool", fake=_fake_segment_pool,
                         backward=_pool_backward, setup_context=_pool_setup_context)
    _BROADCAST = extension_op("fastlab::segment_broadcast", fake=_fake_segment_broadcast,
                              backward=_broadcast_backward,
                              setup_context=_broadcast_setup_context)
    _ARG_SCATTER = extension_op("fastlab::segment_arg_scatter",
                                fake=_fake_segment_arg_scatter, backward=_arg_scatter_backward,
                                setup_context=_arg_scatter_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _ops():
    """torch.ops.fastlab, or the extension's ImportError saying how to build it."""
    if not _HAVE_EXTENSION:
        load_extension()
    return torch.ops.fastlab


def _runs_reference(values) -> bool:
    """backend("reference"), or integer values on CUDA, which the CUDA kernels do not take
    (the CPU kernels do): there the reference is the correct path."""
    if reference_forced():
        return True
    return (isinstance(values, torch.Tensor) and values.dtype in INT_DTYPES
            and values.device.type == "cuda")


def segment_pool(x: torch.Tensor, offsets: torch.Tensor, reduce: str = "mean", *,
                 validate: bool = False) -> torch.Tensor:
    """Reduce each unit's rows of ``x`` ``(N, D)`` to one vector: returns ``(S, D)``.

    ``reduce``: "sum", "mean", "max", "min", "first" or "last". Empty units give 0.
    ``x`` is float32, float64, float16, bfloat16, int32 or int64; integers follow
    torch_scatter's segment_csr (the sum wraps around in their width, the mean truncates
    toward zero) and have no gradient. ``validate=True`` checks offsets' values on CUDA too
    (one host sync); CPU always checks.
    """
    reference = _runs_reference(x)
    validate = _validate_pool(x, offsets, reduce, validate, not reference)
    if reference:
        return segment_pool_ref(x, offsets, reduce)
    # max/min write the (S, D) arg rows only when a backward will read them
    return_arg = torch.is_grad_enabled() and x.requires_grad
    return _ops().segment_pool(x, offsets, reduce, validate, return_arg)[0]


def segment_broadcast(y: torch.Tensor, offsets: torch.Tensor, total: Optional[int] = None,
                      shift: int = 0, base: Optional[torch.Tensor] = None, *,
                      validate: bool = False) -> torch.Tensor:
    """Repeat each unit's vector over its rows: ``(S, D)`` to ``(total, D)``, the inverse
    of :func:`segment_pool` (the decoder's unpool).

    ``shift=1`` gives each unit the previous unit's vector (0 for the first unit), the
    causal variant; ``base`` ``(total, D)`` fuses ``base + broadcast(y)``. ``total`` is N;
    ``None`` takes it from ``base`` or else reads ``offsets[-1]`` (a host sync). Integer
    ``y`` and ``base`` (int32, int64) are added in their width, wrapping around.
    """
    reference = _runs_reference(y)
    total, validate = _validate_broadcast(y, offsets, total, shift, base, validate,
                                          not reference)
    if reference:
        return segment_broadcast_ref(y, offsets, total, shift, base)
    return _ops().segment_broadcast(y, offsets, total, shift, base, False, validate)


@contextlib.contextmanager
def staged_kernel_tuning(*, buffer_kib: int = -1, window_kib: int = -1,
                         segs_per_group: int = -1, threads: int = -1, stage_offsets: int = -1):
    """Inside the block, the CUDA pooling kernels launch with these overrides (benches and
    tests: ``buffer_kib=0`` runs the register kernel; other buffer and window KiB, segments
    a group, threads a block, ``stage_offsets=0`` leaves the offsets in global memory);
    -1 keeps the kernel's own choice. Process-wide, and the exit restores every default, so
    blocks do not nest. No effect on CPU tensors."""
    _ops().segment_pool_tuning(buffer_kib, window_kib, segs_per_group, threads, stage_offsets)
    try:
        yield
    finally:
        _ops().segment_pool_tuning()


def hierarchical_pool(x: torch.Tensor, level_offsets: Sequence[torch.Tensor],
                      reduce: Union[str, Sequence[str]] = "mean", *,
                      validate: bool = False) -> List[torch.Tensor]:
    """Pool through several levels (chars -> words -> sentences -> ...) in one call.

    ``level_offsets[l]`` groups the units of level l (``x`` for l = 0) into those of level
    l + 1. ``reduce`` is one reduction for every level or one per level. Returns every
    pooled level, ``[(S_1, D), (S_2, D), ...]``.
    """
    reduces = _validate_hierarchy(level_offsets, reduce)
    levels = []
    for offsets, how in zip(level_offsets, reduces):
        x = segment_pool(x, offsets, how, validate=validate)
        levels.append(x)
    return levels
