"""Scaled dot-product attention, dense (B, H, S, D) as torch SDPA or packed varlen, with
flash kernels.

Mask (bottom-right aligned): with ``shift = kv_len - q_len``, query ``i`` sees key ``j``
iff ``j < kv_len`` and, when ``causal``, ``j <= i + shift``. ``kv_len`` is the key length
of each sequence: ``kv_lens[b]`` when given (keys past it are padding), else
``k.shape[2]``; the causal alignment uses that per-sequence length, so the queries are the
last ``q_len`` positions of each sequence, as in a KV cache or Perceiver-AR. A query that
sees no key (causal with ``q_len > kv_len``, or ``kv_len == 0``) gets output 0, LSE
``-inf`` and gradient 0, never NaN.

:func:`attention_varlen` takes sequences packed along one token axis, (total, H, D), cut
by ``cu_seqlens`` offsets; each sequence has its own ``q_len`` and ``kv_len`` and the same
mask, so a batch of ragged sequences (right-padded queries included) needs no padding.

Options (both layouts, as flash-attn defines them), with ``d = i + shift - j`` (positive:
key j lies before query i's aligned position):

* ``window=(left, right)``: query i sees only keys with ``-right <= d <= left``; -1 is
  unbounded on that side. With ``causal`` the right side is 0. Key blocks outside every
  row's window are skipped by the kernels.
* ``softcap > 0``: scores become ``softcap * tanh(scale * q.k / softcap)``.
* ``alibi_slopes`` (Hq,) or (B, Hq) float32: ``-slope * |d|`` is added to the scores
  (after the softcap).
* ``dropout_p`` in [0, 1): after the softmax each probability is zeroed with probability
  ``dropout_p`` and the rest scaled by ``1 / (1 - dropout_p)``; the LSE is that of the
  undropped scores. Which elements drop is a pure function of (``dropout_seed``,
  ``dropout_offset``, b, h, i, j) (a counter-based integer hash, see
  :func:`_dropout_keep_ref`): the backward draws the same numbers again instead of
  storing a mask, and the reference draws them too, element for element. Without a seed,
  one is drawn from torch's default CPU generator (pass one under torch.compile, which
  would otherwise stop at the draw).

CUDA tensors run the Triton kernels of ``fastlab.kernels.attention`` (fp32 inputs there use
TF32 tensor-core dots, so expect about 1e-3 relative error, as with
``torch.backends.cuda.matmul.allow_tf32``); CPU tensors run :func:`attention_ref` and
:func:`attention_varlen_ref`. float64 inputs always run the reference. Both sides are one
``torch.library`` custom op, so the ops work under ``torch.compile(fullgraph=True)``. The
backward is deterministic.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch

from fastlab.ops._dispatch import define_op, use_triton

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPES = _KERNEL_DTYPES + (torch.float64,)
#: Largest head dim the kernels take: a 256-wide tile is the most that fits registers.
MAX_HEAD_DIM = 256


class _Options(NamedTuple):
    """Score and probability options shared by both layouts (see :func:`attention`)."""
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    dropout_p: float = 0.0
    dropout_key: int = 0


# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------

def _visible(q_len: int, kv_len: int, kv_lens: Optional[torch.Tensor], causal: bool,
             batch: int, device, opts: _Options = _Options()):
    """(B or 1, 1, Sq, Skv) bool of the (query, key) pairs the mask lets through, and the
    signed distance ``i + shift - j`` (for ALiBi)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    if kv_lens is None:
        lens = torch.full((1, 1, 1, 1), kv_len, device=device)
    else:
        lens = kv_lens.to(device=device, dtype=torch.long).clamp(0, kv_len).view(batch, 1, 1, 1)
    rel = i + (lens - q_len) - j
    ok = j < lens
    if causal:
        ok = ok & (rel >= 0)
    if opts.window_left >= 0:
        ok = ok & (rel <= opts.window_left)
    if opts.window_right >= 0:
        ok = ok & (rel >= -opts.window_right)
    return ok, rel


def _expand_kv(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) if x.shape[1] != q.shape[1] else x


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the reference's math and of the LSE: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores_ref(q, k, kv_lens, alibi_slopes, causal, scale, opts: _Options, first_batch: int):
    """Masked scores (-inf where hidden) in the compute dtype, the visibility mask, and
    ``tanh`` of the capped scores (None without softcap)."""
    compute = _compute_dtype(q.dtype)
    raw = torch.matmul(q.to(compute), _expand_kv(q, k).to(compute).transpose(-1, -2))
    tanh = None
    if opts.softcap > 0:
        tanh = torch.tanh(raw * (scale / opts.softcap))
        scores = opts.softcap * tanh
    else:
        scores = raw * scale
    ok, rel = _visible(q.shape[2], k.shape[2], kv_lens, causal, q.shape[0], q.device, opts)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(compute)
        if slopes.dim() == 2:
            slopes = slopes[first_batch:first_batch + q.shape[0]]
        scores = scores - slopes.reshape(-1, q.shape[1], 1, 1) * rel.abs().to(compute)
    return scores.masked_fill(~ok, float("-inf")), ok, tanh


_MASK32 = 0xFFFFFFFF


def _mix32(x: int) -> int:
    """A bijective 32-bit integer hash (xorshift-multiply rounds), on Python ints."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mul32_t(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 ``x`` in [0, 2**32), exactly (16-bit halves: no int64
    overflow)."""
    return (x & 0xFFFF) * c + (((x >> 16) * c) & 0xFFFF) * 65536 & _MASK32


def _mix32_t(x: torch.Tensor) -> torch.Tensor:
    """:func:`_mix32` on an int64 tensor of values in [0, 2**32): the kernels' uint32 hash."""
    x = x ^ (x >> 16)
    x = _mul32_t(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32_t(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_key(seed: int, offset: int) -> int:
    """The 31-bit key every dropout random number derives from: a hash of (seed, offset)."""
    x = _mix32(offset >> 32)
    x = _mix32((offset & _MASK32) ^ x)
    x = _mix32((seed >> 32) ^ x)
    return _mix32((seed & _MASK32) ^ x) & 0x7FFFFFFF


def dropout_threshold(p: float) -> int:
    """An element is kept when its 31-bit random number is at least this."""
    return min(int(round(p * 2.0 ** 31)), 2 ** 31 - 1)


def _options(window, softcap: float, dropout_p: float, dropout_seed: Optional[int],
             dropout_offset: int) -> _Options:
    if dropout_p > 0 and dropout_seed is None:
        # drawn on the host from torch's default CPU generator: no device sync, and
        # torch.manual_seed makes it reproducible
        dropout_seed = int(torch.randint(0, 2 ** 62, ()))
    key = dropout_key(dropout_seed, dropout_offset) if dropout_p > 0 else 0
    return _Options(int(window[0]), int(window[1]), float(softcap), float(dropout_p), key)


#: Multiplier spreading key positions before the last hash round (2**32 / golden ratio).
_GOLDEN = 0x9E3779B1


def _dropout_keep_ref(key: int, p: float, batch_ids: torch.Tensor, heads: int, q_len: int,
                      kv_len: int) -> torch.Tensor:
    """(B, H, Sq, Skv) bool: which probabilities dropout keeps, the same numbers as the
    kernels draw. Element (b, h, i, j) (i, j positions within sequence b) keeps iff
    ``mix(mix(mix(key ^ mix(b * H + h)) ^ i) ^ (j * GOLDEN)) >> 1 >= threshold``, all in
    uint32 arithmetic (done here in int64 with the products split to stay exact)."""
    device = batch_ids.device
    bh = batch_ids.long()[:, None] * heads + torch.arange(heads, device=device)[None, :]
    row = _mix32_t(key ^ _mix32_t(bh))[:, :, None]
    i = torch.arange(q_len, device=device)
    u = _mix32_t(row ^ i)[..., None]
    j = _mul32_t(torch.arange(kv_len, device=device), _GOLDEN)
    return (_mix32_t(u ^ j) >> 1) >= dropout_threshold(p)


def _forward_core(q, k, v, kv_lens, alibi_slopes, causal, scale, opts: _Options,
                  first_batch: int = 0):
    """Reference forward of dense (B, H, S, D) inputs: O and LSE in the compute dtype."""
    compute = _compute_dtype(q.dtype)
    scores, _, _ = _scores_ref(q, k, kv_lens, alibi_slopes, causal, scale, opts, first_batch)
    lse = torch.logsumexp(scores, dim=-1)
    # rows with no visible key: lse = -inf; shifting by 0 instead makes their weights 0
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    if opts.dropout_p > 0:
        keep = _dropout_keep_ref(opts.dropout_key, opts.dropout_p,
                                 torch.arange(first_batch, first_batch + q.shape[0],
                                              device=q.device),
                                 q.shape[1], q.shape[2], k.shape[2])
        probs = probs * keep / (1.0 - opts.dropout_p)
    return torch.matmul(probs, _expand_kv(q, v).to(compute)), lse


def _backward_core(grad_out, grad_lse, q, k, v, out, lse, kv_lens, alibi_slopes, causal,
                   scale, opts: _Options, first_batch: int = 0):
    """Reference gradients of dense inputs from the saved output and LSE (compute dtype)."""
    compute = _compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = q.to(compute), _expand_kv(q, k).to(compute), _expand_kv(q, v).to(compute)
    do, lse = grad_out.to(compute), lse.to(compute)
    scores, ok, tanh = _scores_ref(q, k, kv_lens, alibi_slopes, causal, scale, opts,
                                   first_batch)
    lse_safe = lse.masked_fill(lse == float("-inf"), float("inf"))
    probs = torch.exp(scores - lse_safe[..., None])
    dp = torch.matmul(do, vc.transpose(-1, -2))
    kept = probs
    if opts.dropout_p > 0:
        keep = _dropout_keep_ref(opts.dropout_key, opts.dropout_p,
                                 torch.arange(first_batch, first_batch + q.shape[0],
                                              device=q.device),
                                 q.shape[1], q.shape[2], k.shape[2])
        # in the compute dtype: bool / float would give float32, off by 3e-8 for float64
        keep = keep.to(compute) / (1.0 - opts.dropout_p)
        kept, dp = probs * keep, dp * keep
    # delta = rowsum(P * dP) = rowsum(dO * O), also with dropout (O = P_kept V)
    delta = (do * out.to(compute)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(compute)
    ds = probs * (dp - delta[..., None])
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    dq = torch.matmul(ds, kc) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qc) * scale
    dv = torch.matmul(kept.transpose(-1, -2), do)
    if group > 1:
        b, h, s, d = dk.shape
        dk = dk.view(b, h // group, group, s, d).sum(2)
        dv = dv.view(b, h // group, group, s, d).sum(2)
    return dq, dk, dv


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  scale: Optional[float] = None, kv_lens: Optional[torch.Tensor] = None,
                  return_lse: bool = False, window: Tuple[int, int] = (-1, -1),
                  softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                  dropout_p: float = 0.0, dropout_seed: int = 0, dropout_offset: int = 0):
    """Plain-PyTorch attention in float32 (float64 for float64 inputs): the test oracle.

    Same arguments and mask as :func:`attention`; materialises the (Sq, Skv) scores, and
    with dropout draws the same random numbers as the kernels. The LSE (natural log,
    float32 or float64) is returned with ``return_lse``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    opts = _options(window, softcap, dropout_p, dropout_seed, dropout_offset)
    out, lse = _forward_core(q, k, v, kv_lens, alibi_slopes, causal, scale, opts)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _sequences(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """(b, q slice, k slice) of each packed sequence. Host read of the offsets: the
    reference is the CPU path and the test oracle."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(b, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(cq) - 1)]


def _dense(x: torch.Tensor) -> torch.Tensor:
    """(L, H, D) tokens of one sequence as a (1, H, L, D) batch."""
    return x.transpose(0, 1)[None]


def _varlen_forward_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, causal, scale,
                        opts: _Options):
    """O (total_q, H, D) and LSE (H, total_q) of packed sequences, in the compute dtype."""
    compute = _compute_dtype(q.dtype)
    out = q.new_zeros(q.shape, dtype=compute)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=compute)
    for b, sq, sk in _sequences(cu_seqlens_q, cu_seqlens_k):
        o, l = _forward_core(_dense(q[sq]), _dense(k[sk]), _dense(v[sk]), None, alibi_slopes,
                             causal, scale, opts, first_batch=b)
        out[sq], lse[:, sq] = o[0].transpose(0, 1), l[0]
    return out, lse


def _varlen_backward_ref(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                         alibi_slopes, causal, scale, opts: _Options):
    compute = _compute_dtype(q.dtype)
    dq, dk, dv = (x.new_zeros(x.shape, dtype=compute) for x in (q, k, v))
    for b, sq, sk in _sequences(cu_seqlens_q, cu_seqlens_k):
        glse = None if grad_lse is None else grad_lse[None, :, sq]
        grads = _backward_core(_dense(grad_out[sq]), glse, _dense(q[sq]), _dense(k[sk]),
                               _dense(v[sk]), _dense(out[sq]), lse[None, :, sq], None,
                               alibi_slopes, causal, scale, opts, first_batch=b)
        for full, g, s in zip((dq, dk, dv), grads, (sq, sk, sk)):
            full[s] = g[0].transpose(0, 1)
    return dq, dk, dv


def attention_varlen_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                         scale: Optional[float] = None, return_lse: bool = False,
                         window: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                         alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                         dropout_seed: int = 0, dropout_offset: int = 0):
    """Plain-PyTorch :func:`attention_varlen`, one sequence at a time: the test oracle.

    The LSE is (H, total_q), float32 (float64 for float64 inputs).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    opts = _options(window, softcap, dropout_p, dropout_seed, dropout_offset)
    out, lse = _varlen_forward_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, causal,
                                   scale, opts)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------
# Dispatch: one custom op for both layouts (cu_seqlens_q given: packed)
# ----------------------------------------------------------------------------------------

def _kernel_wanted(q: torch.Tensor, *tensors: torch.Tensor) -> bool:
    return q.dtype in _KERNEL_DTYPES and use_triton(q, *tensors)


def _kernel_options(cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k,
                    opts: _Options) -> dict:
    """Keyword arguments of the kernel launchers for the optional features."""
    return dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                window=(opts.window_left, opts.window_right), softcap=opts.softcap,
                alibi_slopes=alibi_slopes, dropout_p=opts.dropout_p,
                dropout_key=opts.dropout_key,
                dropout_threshold=dropout_threshold(opts.dropout_p))


def _attention_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        kv_lens: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                        cu_seqlens_k: Optional[torch.Tensor],
                        alibi_slopes: Optional[torch.Tensor], max_seqlen_q: int,
                        max_seqlen_k: int, causal: bool, scale: float, window_left: int,
                        window_right: int, softcap: float, dropout_p: float,
                        dropout_key: int) -> Tuple[torch.Tensor, torch.Tensor]:
    opts = _Options(window_left, window_right, softcap, dropout_p, dropout_key)
    if _kernel_wanted(q, k, v):
        from fastlab.kernels.attention import attention_forward

        return attention_forward(q, k, v, kv_lens, causal, scale,
                                 **_kernel_options(cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                                                   max_seqlen_q, max_seqlen_k, opts))
    if cu_seqlens_q is None:
        ref, lse = _forward_core(q, k, v, kv_lens, alibi_slopes, causal, scale, opts)
    else:
        ref, lse = _varlen_forward_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                                       causal, scale, opts)
    # the kernel writes O in q's layout; the reference matches it so strides never differ
    return torch.empty_like(q).copy_(ref), lse.to(_compute_dtype(q.dtype))


def _attention_bwd_impl(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
                        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, kv_lens: Optional[torch.Tensor],
                        cu_seqlens_q: Optional[torch.Tensor],
                        cu_seqlens_k: Optional[torch.Tensor],
                        alibi_slopes: Optional[torch.Tensor], max_seqlen_q: int,
                        max_seqlen_k: int, causal: bool, scale: float, window_left: int,
                        window_right: int, softcap: float, dropout_p: float,
                        dropout_key: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = _Options(window_left, window_right, softcap, dropout_p, dropout_key)
    if _kernel_wanted(q, k, v, grad_out):
        from fastlab.kernels.attention import attention_backward

        return attention_backward(grad_out, grad_lse, q, k, v, out, lse, kv_lens, causal,
                                  scale, **_kernel_options(cu_seqlens_q, cu_seqlens_k,
                                                           alibi_slopes, max_seqlen_q,
                                                           max_seqlen_k, opts))
    if cu_seqlens_q is None:
        grads = _backward_core(grad_out, grad_lse, q, k, v, out, lse, kv_lens, alibi_slopes,
                               causal, scale, opts)
    else:
        grads = _varlen_backward_ref(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q,
                                     cu_seqlens_k, alibi_slopes, causal, scale, opts)
    return tuple(torch.empty_like(x).copy_(g) for x, g in zip((q, k, v), grads))


def _lse_shape(q: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor]):
    return q.shape[:3] if cu_seqlens_q is None else (q.shape[1], q.shape[0])


def _fwd_fake(q, k, v, kv_lens, cu_seqlens_q, *args):
    return (torch.empty_like(q),
            q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=_compute_dtype(q.dtype)))


def _bwd_fake(grad_out, grad_lse, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# Custom ops, not triton_ops: fastlab.kernels.attention launches its kernels without
# wrap_triton, so the compiler keeps these ops opaque.
_attention_bwd = define_op("fastlab::attention_bwd", fake=_bwd_fake)(_attention_bwd_impl)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lens, cu_seqlens_q, cu_seqlens_k, alibi_slopes = inputs[:7]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lens, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    ctx.scalars = inputs[7:]
    # an LSE nobody used has no gradient: skip a zero tensor and its read in the kernel
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd(grad_out, grad_lse, q, k, v, out, lse, *tensors,
                                *ctx.scalars)
    return (dq, dk, dv) + (None,) * (len(tensors) + len(ctx.scalars))


_attention_fwd = define_op("fastlab::attention_fwd", fake=_fwd_fake, backward=_backward,
                           setup_context=_setup_context)(_attention_fwd_impl)


# ----------------------------------------------------------------------------------------
# Validation: one set of checks for the kernel and the reference path
# ----------------------------------------------------------------------------------------

def _check_qkv(op: str, q, k, v, dims: int, layout: str, head_axis: int, scale) -> None:
    """Checks shared by both layouts: types, ranks, dtypes, devices, heads, head dim."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != dims:
            raise ValueError(f"{op}: {name} must be {dims}-D {layout}, got shape "
                             f"{tuple(x.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"{op}: q must be float16, bfloat16, float32 or float64, "
                        f"got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k and v must share a dtype, got q {q.dtype}, "
                        f"k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: q, k and v must be on one device, got q {q.device}, "
                         f"k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: head_dim of k/v ({k.shape[-1]}) must equal head_dim of "
                         f"q ({q.shape[-1]})")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be in 1..{MAX_HEAD_DIM}, "
                         f"got {q.shape[-1]}")
    hq, hkv = q.shape[head_axis], k.shape[head_axis]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{op}: q heads ({hq}) must be a multiple of k/v "
                         f"heads ({hkv}) (GQA/MQA)")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op}: scale must be a positive finite float, got {scale!r}")


def _check_inputs(q, k, v, kv_lens, scale, validate: bool = True) -> None:
    _check_qkv("attention", q, k, v, 4, "(batch, heads, seq, head_dim)", 1, scale)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"attention: batch of k/v ({k.shape[0]}) must equal batch of q "
                         f"({q.shape[0]})")
    if kv_lens is None:
        return
    if not isinstance(kv_lens, torch.Tensor):
        raise TypeError(f"attention: kv_lens must be a torch.Tensor, got "
                        f"{type(kv_lens).__name__}")
    if kv_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"attention: kv_lens must be int32 or int64, got {kv_lens.dtype}")
    if kv_lens.shape != (q.shape[0],):
        raise ValueError(f"attention: kv_lens must have shape (batch,) = ({q.shape[0]},), "
                         f"got {tuple(kv_lens.shape)}")
    if kv_lens.device != q.device:
        raise ValueError(f"attention: kv_lens must be on q's device {q.device}, got "
                         f"{kv_lens.device}")
    if not isinstance(validate, bool):
        raise TypeError(f"attention: validate must be a bool, got {validate!r}")
    if validate and not torch.compiler.is_compiling():
        # Host sync (one bool) when kv_lens lives on the GPU: the price of a clear error.
        # validate=False and torch.compile skip it; the kernels clamp to [0, kv_len].
        if bool(((kv_lens < 0) | (kv_lens > k.shape[2])).any()):
            raise ValueError(f"attention: kv_lens values must be in [0, {k.shape[2]}] "
                             f"(the key length), got {kv_lens.tolist()}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  scale) -> None:
    """Checks of :func:`attention_varlen`, for the kernel and the reference path alike.

    The offsets' values are checked where that costs no host sync: when they live on the
    CPU, outside torch.compile.
    """
    op = "attention_varlen"
    _check_qkv(op, q, k, v, 3, "(total_tokens, heads, head_dim)", 1, scale)
    for name, cu, total, max_len in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{op}: {name} must be int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{op}: {name} must have shape (batch + 1,), got "
                             f"{tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got "
                             f"{cu.device}")
        if not _is_int(max_len) or max_len < 0:
            raise ValueError(f"{op}: max_seqlen_{name[-1]} must be a non-negative int, got "
                             f"{max_len!r}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must have the same shape "
                         f"(batch + 1,), got {tuple(cu_seqlens_q.shape)} and "
                         f"{tuple(cu_seqlens_k.shape)}")
    if cu_seqlens_q.device.type != "cpu" or torch.compiler.is_compiling():
        return
    for name, cu, total, max_len in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        offsets = cu.tolist()
        if offsets[0] != 0:
            raise ValueError(f"{op}: {name}[0] must be 0, got {offsets[0]}")
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError(f"{op}: {name} must be non-decreasing, got {offsets}")
        if offsets[-1] != total:
            raise ValueError(f"{op}: {name}[-1] ({offsets[-1]}) must equal the number of "
                             f"tokens of {'q' if name[-1] == 'q' else 'k/v'} ({total})")
        if lengths and max(lengths) > max_len:
            raise ValueError(f"{op}: max_seqlen_{name[-1]} ({max_len}) must be at least the "
                             f"longest sequence of {name} ({max(lengths)})")


def _check_options(op: str, q, batch: int, window, softcap, alibi_slopes, dropout_p,
                   dropout_seed, dropout_offset) -> None:
    """Checks of the score and probability options, shared by both layouts."""
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(_is_int(w) and w >= -1 for w in window)):
        raise ValueError(f"{op}: window must be a pair (left, right) of ints >= -1 (-1: "
                         f"unbounded), got {window!r}")
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"{op}: softcap must be a finite float >= 0 (0: off), got "
                         f"{softcap!r}")
    if not (isinstance(dropout_p, (int, float)) and 0 <= dropout_p < 1):
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    for name, x in (("dropout_seed", dropout_seed), ("dropout_offset", dropout_offset)):
        if x is not None and not (_is_int(x) and 0 <= x < 2 ** 64):
            raise ValueError(f"{op}: {name} must be an int in [0, 2**64), got {x!r}")
    if dropout_offset is None:
        raise ValueError(f"{op}: dropout_offset must be an int in [0, 2**64), got None")
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"{op}: alibi_slopes must be a torch.Tensor, got "
                        f"{type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"{op}: alibi_slopes must be float32, got {alibi_slopes.dtype}")
    heads = q.shape[-2] if q.dim() == 3 else q.shape[1]
    if alibi_slopes.shape not in ((heads,), (batch, heads)):
        raise ValueError(f"{op}: alibi_slopes must have shape (heads,) = ({heads},) or "
                         f"(batch, heads) = ({batch}, {heads}), got "
                         f"{tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"{op}: alibi_slopes must be on q's device {q.device}, got "
                         f"{alibi_slopes.device}")


def _default_scale(q, dims: int):
    if isinstance(q, torch.Tensor) and q.dim() == dims and q.shape[-1] > 0:
        return 1.0 / math.sqrt(q.shape[-1])
    return 1.0


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None, kv_lens: Optional[torch.Tensor] = None,
              return_lse: bool = False, window: Tuple[int, int] = (-1, -1),
              softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
              dropout_offset: int = 0, validate: bool = True):
    """Attention of ``q`` (B, Hq, Sq, D) over ``k``, ``v`` (B, Hkv, Skv, D).

    Args:
        q, k, v: float16, bfloat16, float32 or float64, any strides (a transposed view of
            a (B, S, H, D) tensor is read without a copy). ``Hq`` must be a multiple of
            ``Hkv`` (GQA/MQA); ``D`` in 1..256.
        causal: bottom-right aligned causal mask (see the module docstring).
        scale: softmax scale, default ``1 / sqrt(D)``; must be positive.
        kv_lens: optional (B,) int32/int64 key length of each sequence, in [0, Skv].
            Its values are checked (ValueError) unless ``validate`` is False: on CUDA
            that check reads one bool back, a host sync per call.
        return_lse: also return the log-sum-exp of the scaled, masked scores
            (B, Hq, Sq), float32 (float64 for float64 inputs), ``-inf`` for rows that see
            no key; it is differentiable.
        window, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset: see
            the module docstring.
        validate: False skips the check of ``kv_lens``' values (and its host sync), for
            callers that checked them once for many calls (a model's layers); values
            outside [0, Skv] are then clamped to it. Shapes, dtypes and devices are always
            checked. Under torch.compile the values are never checked.

    Returns:
        The output (B, Hq, Sq, D) in q's dtype and memory layout, and the LSE when asked.
    """
    scale = _default_scale(q, 4) if scale is None else scale
    _check_inputs(q, k, v, kv_lens, scale, validate)
    _check_options("attention", q, q.shape[0], window, softcap, alibi_slopes, dropout_p,
                   dropout_seed, dropout_offset)
    opts = _options(window, softcap, dropout_p, dropout_seed, dropout_offset)
    out, lse = _attention_fwd(q, k, v, kv_lens, None, None, alibi_slopes, 0, 0, bool(causal),
                              float(scale), *opts)
    return (out, lse) if return_lse else out


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     scale: Optional[float] = None, return_lse: bool = False,
                     window: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                     dropout_seed: Optional[int] = None, dropout_offset: int = 0):
    """Attention of B packed sequences: ``q`` (total_q, Hq, D) over ``k``, ``v``
    (total_k, Hkv, D).

    Sequence ``b`` owns query tokens ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and key tokens
    ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``; it attends only within itself, with the mask
    of :func:`attention` at its own ``q_len`` and ``kv_len`` (causal: bottom-right aligned
    per sequence). Lengths may be 0.

    Args:
        q, k, v: float16, bfloat16, float32 or float64, any strides; ``Hq`` a multiple of
            ``Hkv`` (GQA/MQA); ``D`` in 1..256.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 offsets on q's device: 0 first,
            non-decreasing, the last equal to ``total_q`` (``total_k``).
        max_seqlen_q, max_seqlen_k: ints at least the longest query (key) sequence; the
            kernels size their grid by them, so no host sync reads the offsets.
        causal, scale, return_lse: as in :func:`attention`; the LSE is (Hq, total_q).
        window, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset: see
            the module docstring; positions i, j count from each sequence's start.

    The offsets' values and the ``max_seqlen`` bounds are checked (ValueError) when the
    offsets live on the CPU, as on the reference path: on the GPU that check would need a
    host sync, so it is skipped there (and under torch.compile), and a ``max_seqlen`` below
    the longest sequence leaves the rows past it undefined.

    Returns:
        The output (total_q, Hq, D) in q's dtype and memory layout, and the LSE when asked.
    """
    scale = _default_scale(q, 3) if scale is None else scale
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    _check_options("attention_varlen", q, cu_seqlens_q.shape[0] - 1, window, softcap,
                   alibi_slopes, dropout_p, dropout_seed, dropout_offset)
    opts = _options(window, softcap, dropout_p, dropout_seed, dropout_offset)
    out, lse = _attention_fwd(q, k, v, None, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                              int(max_seqlen_q), int(max_seqlen_k), bool(causal),
                              float(scale), *opts)
    return (out, lse) if return_lse else out

