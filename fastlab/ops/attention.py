"""Scaled dot-product attention, layout (B, H, S, D) as torch SDPA, with flash kernels.

Mask (bottom-right aligned): with ``shift = kv_len - q_len``, query ``i`` sees key ``j``
iff ``j < kv_len`` and, when ``causal``, ``j <= i + shift``. ``kv_len`` is the key length
of each sequence: ``kv_lens[b]`` when given (keys past it are padding), else
``k.shape[2]``; the causal alignment uses that per-sequence length, so the queries are the
last ``q_len`` positions of each sequence, as in a KV cache or Perceiver-AR. A query that
sees no key (causal with ``q_len > kv_len``, or ``kv_len == 0``) gets output 0, LSE
``-inf`` and gradient 0, never NaN.

CUDA tensors run the Triton kernels of ``fastlab.kernels.attention`` (fp32 inputs there use
TF32 tensor-core dots, so expect about 1e-3 relative error, as with
``torch.backends.cuda.matmul.allow_tf32``); CPU tensors run :func:`attention_ref`.
float64 inputs always run the reference. Both sides are one ``torch.library`` custom op,
so the op works under ``torch.compile(fullgraph=True)``. The backward is deterministic.
"""
import math
from typing import Optional, Tuple

import torch

from fastlab.ops._dispatch import call_op, eager, use_triton

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPES = _KERNEL_DTYPES + (torch.float64,)
#: Largest head dim the kernels take: a 256-wide tile is the most that fits registers.
MAX_HEAD_DIM = 256


def _visible(q_len: int, kv_len: int, kv_lens: Optional[torch.Tensor], causal: bool,
             batch: int, device) -> torch.Tensor:
    """(B or 1, 1, Sq, Skv) bool: which (query, key) pairs the mask lets through."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    if kv_lens is None:
        lens = torch.full((1, 1, 1, 1), kv_len, device=device)
    else:
        lens = kv_lens.to(device=device, dtype=torch.long).clamp(0, kv_len).view(batch, 1, 1, 1)
    ok = j < lens
    if causal:
        ok = ok & (j <= i + (lens - q_len))
    return ok


def _expand_kv(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) if x.shape[1] != q.shape[1] else x


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the reference's math and of the LSE: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  scale: Optional[float] = None, kv_lens: Optional[torch.Tensor] = None,
                  return_lse: bool = False):
    """Plain-PyTorch attention in float32 (float64 for float64 inputs): the test oracle.

    Same arguments and mask as :func:`attention`; materialises the (Sq, Skv) scores.
    The LSE (natural log, float32 or float64) is returned with ``return_lse``.
    """
    compute = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    ok = _visible(q.shape[2], k.shape[2], kv_lens, causal, q.shape[0], q.device)
    scores = scores.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # rows with no visible key: lse = -inf; shifting by 0 instead makes their weights 0
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    out = torch.matmul(probs, v.to(compute)).to(q.dtype)
    return (out, lse) if return_lse else out


def _attention_backward_ref(grad_out, grad_lse, q, k, v, out, lse, kv_lens, causal, scale):
    """Gradients of :func:`attention_ref` from the saved output and LSE, in plain PyTorch."""
    compute = _compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = q.to(compute), _expand_kv(q, k).to(compute), _expand_kv(q, v).to(compute)
    do, lse = grad_out.to(compute), lse.to(compute)
    ok = _visible(q.shape[2], k.shape[2], kv_lens, causal, q.shape[0], q.device)
    lse_safe = lse.masked_fill(lse == float("-inf"), float("inf"))
    probs = torch.exp(torch.matmul(qc, kc.transpose(-1, -2)) * scale - lse_safe[..., None])
    probs = probs.masked_fill(~ok, 0.0)
    delta = (do * out.to(compute)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(compute)
    ds = probs * (torch.matmul(do, vc.transpose(-1, -2)) - delta[..., None])
    dq = torch.matmul(ds, kc) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qc) * scale
    dv = torch.matmul(probs.transpose(-1, -2), do)
    if group > 1:
        b, h, s, d = dk.shape
        dk = dk.view(b, h // group, group, s, d).sum(2)
        dv = dv.view(b, h // group, group, s, d).sum(2)
    return dq, dk, dv


def _kernel_wanted(q: torch.Tensor, *tensors: torch.Tensor) -> bool:
    return q.dtype in _KERNEL_DTYPES and use_triton(q, *tensors)


def _attention_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        kv_lens: Optional[torch.Tensor], causal: bool,
                        scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    if _kernel_wanted(q, k, v):
        from fastlab.kernels.attention import attention_forward

        return attention_forward(q, k, v, kv_lens, causal, scale)
    ref, lse = attention_ref(q, k, v, causal=causal, scale=scale, kv_lens=kv_lens,
                             return_lse=True)
    # the kernel writes O in q's layout; the reference matches it so strides never differ
    return torch.empty_like(q).copy_(ref), lse.to(_compute_dtype(q.dtype))


def _attention_bwd_impl(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
                        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, kv_lens: Optional[torch.Tensor], causal: bool,
                        scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _kernel_wanted(q, k, v, grad_out):
        from fastlab.kernels.attention import attention_backward

        return attention_backward(grad_out, grad_lse, q, k, v, out, lse, kv_lens, causal,
                                  scale)
    grads = _attention_backward_ref(grad_out, grad_lse, q, k, v, out, lse, kv_lens, causal,
                                    scale)
    return tuple(torch.empty_like(x).copy_(g) for x, g in zip((q, k, v), grads))


_attention_fwd = torch.library.custom_op("fastlab::attention_fwd", mutates_args=())(
    _attention_fwd_impl)
_attention_bwd = torch.library.custom_op("fastlab::attention_bwd", mutates_args=())(
    _attention_bwd_impl)


@_attention_fwd.register_fake
def _(q, k, v, kv_lens, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_compute_dtype(q.dtype))


@_attention_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, kv_lens, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lens, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lens)
    ctx.causal, ctx.scale = causal, scale
    # an LSE nobody used has no gradient: skip a zero tensor and its read in the kernel
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_lens = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = call_op(_attention_bwd, _attention_bwd_impl, grad_out, grad_lse, q, k, v,
                         out, lse, kv_lens, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Attention(torch.autograd.Function):
    """Eager-mode autograd around the same bodies as the custom ops, without their
    dispatcher overhead (see :func:`fastlab.ops._dispatch.call_op`)."""

    @staticmethod
    def forward(ctx, q, k, v, kv_lens, causal, scale):
        out, lse = _attention_fwd_impl(q, k, v, kv_lens, causal, scale)
        _setup_context(ctx, (q, k, v, kv_lens, causal, scale), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _backward(ctx, grad_out, grad_lse)


def _run_attention(q, k, v, kv_lens, causal, scale):
    if not eager(q, k, v, kv_lens):
        return _attention_fwd(q, k, v, kv_lens, causal, scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Attention.apply(q, k, v, kv_lens, causal, scale)
    return _attention_fwd_impl(q, k, v, kv_lens, causal, scale)  # inference: no graph node


def _check_inputs(q, k, v, kv_lens, scale) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (batch, heads, seq, head_dim), "
                             f"got shape {tuple(x.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"attention: q must be float16, bfloat16, float32 or float64, "
                        f"got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k and v must share a dtype, got q {q.dtype}, "
                        f"k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention: q, k and v must be on one device, got q {q.device}, "
                         f"k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"attention: batch of k/v ({k.shape[0]}) must equal batch of q "
                         f"({q.shape[0]})")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: head_dim of k/v ({k.shape[3]}) must equal head_dim of "
                         f"q ({q.shape[3]})")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim must be in 1..{MAX_HEAD_DIM}, "
                         f"got {q.shape[3]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"attention: q heads ({q.shape[1]}) must be a multiple of k/v "
                         f"heads ({k.shape[1]}) (GQA/MQA)")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"attention: scale must be a positive finite float, got {scale!r}")
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
    if not torch.compiler.is_compiling():
        # Host sync (one bool) when kv_lens lives on the GPU: the price of a clear error.
        # Under torch.compile the check is skipped and the kernels clamp to [0, kv_len].
        if bool(((kv_lens < 0) | (kv_lens > k.shape[2])).any()):
            raise ValueError(f"attention: kv_lens values must be in [0, {k.shape[2]}] "
                             f"(the key length), got {kv_lens.tolist()}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None, kv_lens: Optional[torch.Tensor] = None,
              return_lse: bool = False):
    """Attention of ``q`` (B, Hq, Sq, D) over ``k``, ``v`` (B, Hkv, Skv, D).

    Args:
        q, k, v: float16, bfloat16, float32 or float64, any strides (a transposed view of
            a (B, S, H, D) tensor is read without a copy). ``Hq`` must be a multiple of
            ``Hkv`` (GQA/MQA); ``D`` in 1..256.
        causal: bottom-right aligned causal mask (see the module docstring).
        scale: softmax scale, default ``1 / sqrt(D)``; must be positive.
        kv_lens: optional (B,) int32/int64 key length of each sequence, in [0, Skv].
        return_lse: also return the log-sum-exp of the scaled, masked scores
            (B, Hq, Sq), float32 (float64 for float64 inputs), ``-inf`` for rows that see
            no key; it is differentiable.

    Returns:
        The output (B, Hq, Sq, D) in q's dtype and memory layout, and the LSE when asked.
    """
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    _check_inputs(q, k, v, kv_lens, scale)
    out, lse = _run_attention(q, k, v, kv_lens, bool(causal), float(scale))
    return (out, lse) if return_lse else out
