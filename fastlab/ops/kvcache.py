"""Attention over a KV cache, with the append of the new keys/values fused in.

``attention_with_kvcache(q, cache, k_new, v_new, *, causal=True)`` appends ``k_new``/``v_new``
(B, Hkv, Tn, D) to every sequence of ``cache`` (a :class:`fastlab.nn.KVCache`) and attends
``q`` (B, Hq, Tq, D) over each sequence's live keys, Hq a multiple of Hkv (GQA/MQA).

Positions. Sequence b holds ``L_b`` live tokens after the append. Query i sits at position
``L_b - Tq + i`` (the mask is aligned bottom-right, as in :func:`fastlab.ops.attention`),
so with ``causal=True`` it sees keys ``j <= L_b - Tq + i``; without, all ``j < L_b``. With
``new_lens`` (B,) only the first ``new_lens[b]`` tokens of k_new/v_new are appended to
sequence b (prefill of prompts of different lengths, right-padded); then Tq == Tn and query
i is new token i, at position ``L_b - new_lens[b] + i``. A query that sees no key returns 0.
No slot at or beyond a sequence's live length is ever read.

Two paths:

* Inference (no tensor involved needs a gradient): one custom op,
  ``fastlab::kvcache_attention``, writes the new tokens into the preallocated cache and
  attends in the same Triton kernel (split-KV when B x Hkv is too small to fill the GPU).
  Eager calls run its implementation without the dispatcher; compiled ones go through it.
* Training (autograd on): the log's pattern -- several forward steps, each appending to the
  cache and attending over all of it, then one backward -- must neither trip autograd's
  in-place check nor copy the cache at every step. The cache keeps each appended chunk (an
  autograd tensor) and writes its values into the preallocated buffer, which autograd never
  sees. Attention reads the buffer through an alias whose version counter later appends do
  not touch; its backward computes the gradient of the whole live buffer and hands each
  chunk the slice at the positions it was written to (a gather per chunk). Nothing but the
  appended values is stored, once. If the slots an attention read are overwritten before its
  backward (a truncate or reset followed by an append), backward raises instead of
  returning wrong gradients.

The reference, :func:`attention_with_kvcache_ref`, is SDPA over each sequence's explicitly
concatenated keys and values.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from fastlab.ops._dispatch import call_op, use_triton
from fastlab.ops.attention import attention


# ----------------------------------------------------------------------------- reference
def attention_with_kvcache_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor, k_new: Optional[torch.Tensor] = None,
                               v_new: Optional[torch.Tensor] = None,
                               new_lens: Optional[torch.Tensor] = None, *, causal: bool = True,
                               scale: Optional[float] = None) -> torch.Tensor:
    """SDPA of each sequence over its live cache concatenated with its new tokens.

    Does not modify the cache. Computes in float32 (float64 for float64 inputs).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_len = q.shape[2]
    outs = []
    for b in range(q.shape[0]):
        length = int(lengths[b])  # host read: the reference is the CPU path and test oracle
        k, v = k_cache[b, :, :length], v_cache[b, :, :length]
        base = length - q_len
        if k_new is not None:
            n = int(new_lens[b]) if new_lens is not None else k_new.shape[2]
            k = torch.cat([k, k_new[b, :, :n]], dim=1)
            v = torch.cat([v, v_new[b, :, :n]], dim=1)
            base = length if new_lens is not None else length + n - q_len
        i = torch.arange(q_len, device=q.device)[:, None]
        j = torch.arange(k.shape[1], device=q.device)[None, :]
        visible = j <= base + i if causal else torch.ones_like(j <= i)
        out = F.scaled_dot_product_attention(q[b].to(compute), k.to(compute), v.to(compute),
                                             attn_mask=visible, scale=scale, enable_gqa=True)
        outs.append(torch.where(visible.any(-1)[None, :, None], out, 0.0))
    return torch.stack(outs).to(q.dtype)


def kvcache_append_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                       k_new: torch.Tensor, v_new: torch.Tensor,
                       new_lens: Optional[torch.Tensor] = None) -> None:
    """Write k_new/v_new into the cache at each sequence's length (``lengths`` unchanged)."""
    batch, _, n_new, _ = k_new.shape
    t = torch.arange(n_new, device=k_new.device)
    counts = new_lens if new_lens is not None else torch.full_like(lengths, n_new)
    rows, cols = (t[None, :] < counts[:, None].long()).nonzero(as_tuple=True)
    pos = lengths.long()[rows] + cols
    k_cache[rows, :, pos] = k_new[rows, :, cols]
    v_cache[rows, :, pos] = v_new[rows, :, cols]


# ----------------------------------------------------------------------------- custom ops
# Eager calls run these implementations directly: the custom-op dispatcher costs tens of
# microseconds per call, which a decode step pays once per layer. Under torch.compile the
# calls go through the registered ops, which the compiler sees and keeps in the graph.
def _append_impl(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                 k_new: torch.Tensor, v_new: torch.Tensor,
                 new_lens: Optional[torch.Tensor]) -> None:
    if use_triton(k_cache, k_new):
        from fastlab.kernels.kvcache_attention import kvcache_append as launch

        launch(k_cache, v_cache, lengths, k_new, v_new, new_lens)
    else:
        kvcache_append_ref(k_cache, v_cache, lengths, k_new, v_new, new_lens)
    lengths.add_(new_lens if new_lens is not None else k_new.shape[2])


def _attention_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    lengths: torch.Tensor, k_new: Optional[torch.Tensor],
                    v_new: Optional[torch.Tensor], new_lens: Optional[torch.Tensor],
                    causal: bool, scale: float, kv_bound: int) -> torch.Tensor:
    if use_triton(q, k_cache):
        from fastlab.kernels.kvcache_attention import kvcache_attention_forward

        out = kvcache_attention_forward(q, k_cache, v_cache, lengths, k_new, v_new, new_lens,
                                        causal, scale, kv_bound)
    else:
        out = attention_with_kvcache_ref(q, k_cache, v_cache, lengths, k_new, v_new, new_lens,
                                         causal=causal, scale=scale).contiguous()
        if k_new is not None:
            kvcache_append_ref(k_cache, v_cache, lengths, k_new, v_new, new_lens)
    if k_new is not None:
        lengths.add_(new_lens if new_lens is not None else k_new.shape[2])
    return out


@torch.library.custom_op("fastlab::kvcache_append", mutates_args=("k_cache", "v_cache", "lengths"))
def _append_op(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
               k_new: torch.Tensor, v_new: torch.Tensor, new_lens: Optional[torch.Tensor]) -> None:
    _append_impl(k_cache, v_cache, lengths, k_new, v_new, new_lens)


@_append_op.register_fake
def _append_fake(k_cache, v_cache, lengths, k_new, v_new, new_lens):
    return None


@torch.library.custom_op("fastlab::kvcache_attention",
                         mutates_args=("k_cache", "v_cache", "lengths"))
def _attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  lengths: torch.Tensor, k_new: Optional[torch.Tensor],
                  v_new: Optional[torch.Tensor], new_lens: Optional[torch.Tensor], causal: bool,
                  scale: float, kv_bound: int) -> torch.Tensor:
    return _attention_impl(q, k_cache, v_cache, lengths, k_new, v_new, new_lens, causal, scale,
                           kv_bound)


@_attention_op.register_fake
def _attention_fake(q, k_cache, v_cache, lengths, k_new, v_new, new_lens, causal, scale,
                    kv_bound):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- validation
def _describe(x) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)


def _check_like_cache(name: str, x: torch.Tensor, cache) -> None:
    if x.dtype != cache.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the cache holds {cache.dtype}")
    if x.device != cache.device:
        raise ValueError(f"{name} is on {x.device} but the cache is on {cache.device}")


def check_query(q: torch.Tensor, cache) -> None:
    """Raise a clear error unless ``q`` (B, Hq, Tq, D) fits ``cache``."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (batch, heads, q_len, head_dim), got {_describe(q)}")
    b, h, t, d = q.shape
    if b != cache.batch:
        raise ValueError(f"q has batch {b} but the cache holds {cache.batch} sequences")
    if d != cache.head_dim:
        raise ValueError(f"q has head_dim {d} but the cache has head_dim {cache.head_dim}")
    if h % cache.kv_heads != 0:
        raise ValueError(f"q has {h} heads, not a multiple of the cache's {cache.kv_heads} "
                         "kv heads")
    if t < 1:
        raise ValueError("q must hold at least one query (q_len >= 1)")
    _check_like_cache("q", q, cache)


def check_new_tokens(cache, k_new, v_new, new_lens=None, q_len: Optional[int] = None):
    """Raise a clear error unless k_new/v_new (B, Hkv, Tn, D) and new_lens (B,) fit ``cache``.

    Returns ``new_lens`` as a contiguous int32 tensor (or None). Checking its values costs one
    host sync; it is only given for a prefill, never per decoded token.
    """
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    if k_new is None:
        if new_lens is not None:
            raise ValueError("new_lens needs k_new and v_new")
        return None
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if (x.dim() != 4 or x.shape[0] != cache.batch or x.shape[1] != cache.kv_heads
                or x.shape[3] != cache.head_dim or x.shape[2] < 1):
            raise ValueError(
                f"{name} must have shape (batch={cache.batch}, kv_heads={cache.kv_heads}, "
                f"n_new >= 1, head_dim={cache.head_dim}), got {_describe(x)}")
        _check_like_cache(name, x, cache)
    if k_new.shape != v_new.shape:
        raise ValueError(f"k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} differ "
                         "in shape")
    if new_lens is None:
        return None
    if not isinstance(new_lens, torch.Tensor):
        raise TypeError(f"new_lens must be a tensor, got {type(new_lens).__name__}")
    if new_lens.dtype.is_floating_point or new_lens.dtype == torch.bool or new_lens.is_complex():
        raise TypeError(f"new_lens must be an integer tensor, got {new_lens.dtype}")
    if new_lens.shape != (cache.batch,):
        raise ValueError(f"new_lens must have shape ({cache.batch},), got {_describe(new_lens)}")
    if new_lens.device != cache.device:
        raise ValueError(f"new_lens is on {new_lens.device} but the cache is on {cache.device}")
    n_new = k_new.shape[2]
    if q_len is not None and q_len != n_new:
        raise ValueError(f"with new_lens, q_len ({q_len}) must equal the new tokens' length "
                         f"({n_new}): query i is new token i")
    if bool(((new_lens < 0) | (new_lens > n_new)).any()):  # host sync: prefill only
        raise ValueError(f"new_lens must lie in [0, {n_new}], got {new_lens.tolist()}")
    return new_lens.to(torch.int32).contiguous()


# ----------------------------------------------------------------------------- training path
class Chunk(NamedTuple):
    """Keys/values appended under autograd, and the slots [start, end) they fill per row."""
    k: torch.Tensor
    v: torch.Tensor
    start: torch.Tensor  # (B,) int64
    end: torch.Tensor    # (B,) int64, clipped by truncations


def _masked_attention(q, k, v, q_base, kv_len, causal: bool, scale: float) -> torch.Tensor:
    """Attention with per-sequence live lengths and query offsets (ragged caches), fp32."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    j = torch.arange(k.shape[2], device=q.device)
    live = j[None, :] < kv_len[:, None]
    # Slots past a row's length hold stale values (NaN, even): zero them, as 0 * NaN in the
    # products below would otherwise leak into the output and the gradients.
    k = torch.where(live[:, None, :, None], k.to(compute), 0.0).repeat_interleave(group, dim=1)
    v = torch.where(live[:, None, :, None], v.to(compute), 0.0).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(compute), k.transpose(-1, -2)) * scale
    visible = live[:, None, :].expand(-1, q.shape[2], -1)
    if causal:
        i = torch.arange(q.shape[2], device=q.device)
        visible = visible & (j[None, None, :] <= q_base[:, None, None] + i[None, :, None])
    visible = visible[:, None]
    any_key = visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_key, 0.0)
    probs = torch.softmax(scores, dim=-1) * any_key
    return torch.matmul(probs, v).to(q.dtype)


def _chunk_grad(grad: torch.Tensor, chunk: Chunk, x: torch.Tensor) -> torch.Tensor:
    """The part of ``grad`` (B, Hkv, L, D) at the slots ``chunk`` was written to."""
    length = grad.shape[2]
    b, h, n, d = x.shape
    pos = chunk.start[:, None] + torch.arange(n, device=grad.device)[None, :]
    live = (pos < chunk.end[:, None]) & (pos < length)
    if length == 0:
        return torch.zeros_like(x)
    index = pos.clamp(max=length - 1)[:, None, :, None].expand(b, h, n, d)
    return grad.gather(2, index) * live[:, None, :, None].to(grad.dtype)


class _CacheAttention(torch.autograd.Function):
    """Attention over the live cache whose backward hands each appended chunk its gradient."""

    @staticmethod
    def forward(ctx, q, cache, q_base, kv_len, causal, scale, *chunk_tensors):
        length = cache.length_bound
        # ``.data`` aliases the buffer under a fresh version counter: later appends write
        # slots this attention did not read and must not fail its backward.
        k = cache.k_buffer.data[:, :, :length]
        v = cache.v_buffer.data[:, :, :length]
        with torch.enable_grad():
            q_in = q.detach().requires_grad_()
            k_in, v_in = k.requires_grad_(), v.requires_grad_()
            if q_base is None:
                out = attention(q_in, k_in, v_in, causal=causal, scale=scale)
            else:
                out = _masked_attention(q_in, k_in, v_in, q_base, kv_len, causal, scale)
        ctx.inner = (out, q_in, k_in, v_in)
        ctx.cache, ctx.shrinks, ctx.chunks = cache, cache.shrink_count, list(cache.chunks)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.cache.overwrite_count > ctx.shrinks:
            raise RuntimeError(
                "the KV cache was truncated or reset and then appended to after an attention "
                "read it, so the keys/values that attention needs for backward are gone; call "
                "backward before reusing the cache's slots")
        out, q_in, k_in, v_in = ctx.inner
        dq, dk, dv = torch.autograd.grad(out, (q_in, k_in, v_in), grad_out)
        grads = []
        for chunk in ctx.chunks:
            grads += [_chunk_grad(dk, chunk, chunk.k), _chunk_grad(dv, chunk, chunk.v)]
        return (dq, None, None, None, None, None, *grads)


def kvcache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                   k_new: torch.Tensor, v_new: torch.Tensor,
                   new_lens: Optional[torch.Tensor] = None) -> None:
    """Write k_new/v_new after each row's live slots and advance ``lengths``, unchecked
    (:meth:`fastlab.nn.KVCache.append` checks every argument first)."""
    call_op(torch.ops.fastlab.kvcache_append, _append_impl, k_cache, v_cache, lengths, k_new,
            v_new, new_lens)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _attend_training(q, cache, k_new, v_new, new_lens, causal, scale):
    q_base = kv_len = None
    if new_lens is not None:
        q_base = cache.lengths.long()  # a copy: the append below moves the lengths on
    if k_new is not None:
        cache.append(k_new, v_new, new_lens)
    if q_base is not None or not cache.uniform:
        kv_len = cache.lengths.long()
        if q_base is None:
            q_base = kv_len - q.shape[2]
    tensors = [t for chunk in cache.chunks for t in (chunk.k, chunk.v)]
    return _CacheAttention.apply(q, cache, q_base, kv_len, causal, scale, *tensors)


# ----------------------------------------------------------------------------- public API
def attention_with_kvcache(q: torch.Tensor, cache, k_new: Optional[torch.Tensor] = None,
                           v_new: Optional[torch.Tensor] = None, *, causal: bool = True,
                           scale: Optional[float] = None,
                           new_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Append k_new/v_new (B, Hkv, Tn, D) to ``cache`` and attend q (B, Hq, Tq, D) over it.

    Returns (B, Hq, Tq, D) in q's dtype. ``scale`` defaults to 1/sqrt(D). ``new_lens`` (B,)
    appends only the first ``new_lens[b]`` new tokens to sequence b (see the module
    docstring for positions and masking). Every argument is checked before anything is
    written: on error the cache is unchanged. Differentiable with respect to q, k_new, v_new
    and every key/value appended earlier under autograd.
    """
    check_query(q, cache)
    new_lens = check_new_tokens(cache, k_new, v_new, new_lens, q_len=q.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _needs_grad(q, k_new, v_new) or (torch.is_grad_enabled() and cache.chunks):
        return _attend_training(q, cache, k_new, v_new, new_lens, causal, scale)
    n_new = 0 if k_new is None else k_new.shape[2]
    cache.reserve(n_new, new_lens)
    out = call_op(torch.ops.fastlab.kvcache_attention, _attention_impl, q, cache.k_buffer,
                  cache.v_buffer, cache.lengths, k_new, v_new, new_lens, causal, scale,
                  min(cache.length_bound + n_new, cache.max_len))
    cache.appended(n_new, new_lens)
    return out
