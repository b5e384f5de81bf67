"""Attention over a KV cache, with the append of the new keys/values fused in.

``attention_with_kvcache(q, cache, k_new, v_new, *, causal=True)`` appends ``k_new``/``v_new``
(B, Hkv, Tn, D) to every sequence of ``cache`` (a :class:`KVCache`) and attends
``q`` (B, Hq, Tq, D) over each sequence's live keys, Hq a multiple of Hkv (GQA/MQA).

Positions. Sequence b holds ``L_b`` live tokens after the append. Query i sits at position
``L_b - Tq + i`` (the mask is aligned bottom-right, as in :func:`fastlab.ops.attention`),
so with ``causal=True`` it sees keys ``j <= L_b - Tq + i``; without, all ``j < L_b``. With
``new_lens`` (B,) only the first ``new_lens[b]`` tokens of k_new/v_new are appended to
sequence b (prefill of prompts of different lengths, right-padded); then Tq == Tn and query
i is new token i, at position ``L_b - new_lens[b] + i``. A query that sees no key returns 0.
No slot at or beyond a sequence's live length is ever read. ``window``, ``softcap`` and
``alibi_slopes`` are those of :func:`fastlab.ops.attention`, with d = (query position) -
(key position) in the positions above, on both paths.

Two paths:

* Inference (no tensor involved needs a gradient): one custom op,
  ``fastlab::kvcache_attention``, writes the new tokens into the preallocated cache and
  attends in the same Triton kernel (split-KV when B x Hkv is too small to fill the GPU).
  Eager calls run its implementation without the dispatcher; compiled ones go through it.
* Training (autograd on): the log's pattern -- several forward steps, each appending to the
  cache and attending over all of it, then one backward -- must neither trip autograd's
  in-place check nor copy the cache at every step. The cache keeps each appended chunk (an
  autograd tensor) and writes its values into the preallocated buffer, which autograd never
  sees. Attention reads the live slots through a ``.data`` alias of the buffer, which has a
  version counter of its own: later appends write the buffer (bumping its counter) but
  never the slots an attention read. Traced by ``torch.compile`` the alias is a plain view
  that shares the buffer's counter, so this path runs eagerly inside compiled code (a graph
  break). Its backward computes the gradient of the whole
  live buffer and hands each chunk the slice at the positions it was written to (a gather
  per chunk). Nothing but the
  appended values is stored, once. If the slots an attention read are overwritten before its
  backward (a truncate or reset followed by an append), backward raises instead of
  returning wrong gradients.

The cache's state -- :class:`KVCache`, its buffers, lengths, host-side bounds and the chunks
kept for autograd -- lives in this module with every operation that changes it (append,
truncate, reset, and the append fused into attention); ``fastlab.nn.KVCache`` is the same
class under its public name.

The reference, :func:`attention_with_kvcache_ref`, is SDPA over each sequence's explicitly
concatenated keys and values.
"""
import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from fastlab.ops._dispatch import define_op, use_triton
from fastlab.ops.attention import _check_options, _dropout_keep_ref, attention, dropout_key


# ----------------------------------------------------------------------------- reference
def _score_options(scores: torch.Tensor, rel: torch.Tensor, visible: torch.Tensor,
                   window, softcap: float, slopes: Optional[torch.Tensor]):
    """Scores (..., H, Tq, L) and visibility after the window, softcap and ALiBi of
    :func:`fastlab.ops.attention`; ``rel`` (..., Tq, L) is query position minus key position
    and ``slopes`` (..., H) the ALiBi slopes."""
    left, right = window
    if left >= 0:
        visible = visible & (rel <= left)
    if right >= 0:
        visible = visible & (rel >= -right)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if slopes is not None:
        scores = scores - slopes[..., None, None].to(scores.dtype) * rel.abs().unsqueeze(-3)
    return scores, visible


def attention_with_kvcache_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor, k_new: Optional[torch.Tensor] = None,
                               v_new: Optional[torch.Tensor] = None,
                               new_lens: Optional[torch.Tensor] = None, *, causal: bool = True,
                               scale: Optional[float] = None, window=(-1, -1),
                               softcap: float = 0.0,
                               alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of each sequence over its live cache concatenated with its new tokens
    (SDPA without the score options; with them, the scores written out).

    Does not modify the cache. Computes in float32 (float64 for float64 inputs).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_len = q.shape[2]
    options = tuple(window) != (-1, -1) or softcap > 0 or alibi_slopes is not None
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
        if options:
            group = q.shape[1] // k.shape[0]
            kb, vb = (x.to(compute).repeat_interleave(group, 0) for x in (k, v))
            scores = torch.matmul(q[b].to(compute), kb.transpose(-1, -2)) * scale
            slopes = None
            if alibi_slopes is not None:
                slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
            scores, visible = _score_options(scores, base + i - j, visible, window, softcap,
                                             slopes)
            any_key = visible.any(-1, keepdim=True)
            scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_key, 0.0)
            out = torch.matmul(torch.softmax(scores, -1) * any_key, vb)
        else:
            out = F.scaled_dot_product_attention(q[b].to(compute), k.to(compute),
                                                 v.to(compute), attn_mask=visible, scale=scale,
                                                 enable_gqa=True)
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
# Eager calls run these implementations directly (fastlab.ops._dispatch.Op): the custom-op
# dispatcher costs tens of microseconds per call, which a decode step pays once per layer.
# Under torch.compile the calls go through the registered ops, kept in the graph.
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
                    causal: bool, scale: float, kv_bound: int, window_left: int,
                    window_right: int, softcap: float,
                    alibi_slopes: Optional[torch.Tensor]) -> torch.Tensor:
    window = (window_left, window_right)
    if use_triton(q, k_cache):
        from fastlab.kernels.kvcache_attention import kvcache_attention_forward

        out = kvcache_attention_forward(q, k_cache, v_cache, lengths, k_new, v_new, new_lens,
                                        causal, scale, kv_bound, window, softcap,
                                        alibi_slopes)
    else:
        out = attention_with_kvcache_ref(q, k_cache, v_cache, lengths, k_new, v_new, new_lens,
                                         causal=causal, scale=scale, window=window,
                                         softcap=softcap,
                                         alibi_slopes=alibi_slopes).contiguous()
        if k_new is not None:
            kvcache_append_ref(k_cache, v_cache, lengths, k_new, v_new, new_lens)
    if k_new is not None:
        lengths.add_(new_lens if new_lens is not None else k_new.shape[2])
    return out


def _append_fake(k_cache, v_cache, lengths, k_new, v_new, new_lens):
    return None


def _attention_fake(q, k_cache, v_cache, lengths, k_new, v_new, new_lens, causal, scale,
                    kv_bound, window_left, window_right, softcap, alibi_slopes):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# Custom ops, not triton_ops: fastlab.kernels.kvcache_attention launches its kernels
# without wrap_triton. They write the cache in place, so they carry no autograd (training
# goes through _CacheAttention below).
_append_op = define_op("fastlab::kvcache_append", fake=_append_fake,
                       mutates_args=("k_cache", "v_cache", "lengths"))(_append_impl)
_attention_op = define_op("fastlab::kvcache_attention", fake=_attention_fake,
                          mutates_args=("k_cache", "v_cache", "lengths"))(_attention_impl)


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
    cache._check_per_row("new_lens", new_lens)
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


def _live_kv(x, kv_len, group: int, compute) -> torch.Tensor:
    """x (B, Hkv, L, D) in ``compute`` with the slots past each row's length zeroed (they
    hold stale values, NaN even, and 0 * NaN would leak into the products), one copy per
    query head of its group."""
    live = torch.arange(x.shape[2], device=x.device)[None, :] < kv_len[:, None]
    return torch.where(live[:, None, :, None], x.to(compute), 0.0).repeat_interleave(group, 1)


def _masked_attention(q, k, v, q_base, kv_len, causal: bool, scale: float, window=(-1, -1),
                      softcap: float = 0.0, alibi_slopes=None, dropout_p: float = 0.0,
                      dropout_seed: int = 0, dropout_offset: int = 0):
    """Attention with per-sequence live lengths and query offsets (ragged caches), in fp32
    (float64 for float64): the output in q's dtype."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    j = torch.arange(k.shape[2], device=q.device)
    k, v = _live_kv(k, kv_len, group, compute), _live_kv(v, kv_len, group, compute)
    scores = torch.matmul(q.to(compute), k.transpose(-1, -2)) * scale
    visible = (j[None, :] < kv_len[:, None])[:, None, :].expand(-1, q.shape[2], -1)
    i = torch.arange(q.shape[2], device=q.device)
    rel = q_base[:, None, None] + i[None, :, None] - j[None, None, :]  # (B, Tq, L)
    if causal:
        visible = visible & (rel >= 0)
    slopes = alibi_slopes
    if slopes is not None and slopes.dim() == 1:
        slopes = slopes.expand(q.shape[0], -1)
    scores, visible = _score_options(scores, rel, visible, window, softcap, slopes)
    visible = visible[:, None]
    any_key = visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_key, 0.0)
    probs = torch.softmax(scores, dim=-1) * any_key
    if dropout_p > 0:
        # the numbers fastlab.ops.attention draws for (b, h, i, j): query i of this call,
        # key slot j of the cache
        keep = _dropout_keep_ref(dropout_key(dropout_seed, dropout_offset), dropout_p,
                                 torch.arange(q.shape[0], device=q.device), q.shape[1],
                                 q.shape[2], k.shape[2])
        probs = probs * keep / (1.0 - dropout_p)
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
    """Attention over the live cache whose backward hands each appended chunk its gradient.

    It runs eagerly (see :func:`_attend_training`): the forward records the attention on
    ``.data`` aliases of the buffer and the backward differentiates that record.
    """

    @staticmethod
    def forward(ctx, q, cache, q_base, kv_len, causal, scale, options, *chunk_tensors):
        length = cache.length_bound
        # ``.data`` aliases the buffer under a fresh version counter: later appends write
        # slots this attention did not read and must not fail its backward.
        k = cache.k_buffer.data[:, :, :length]
        v = cache.v_buffer.data[:, :, :length]
        with torch.enable_grad():
            q_in = q.detach().requires_grad_()
            k_in, v_in = k.requires_grad_(), v.requires_grad_()
            if q_base is None:
                out = attention(q_in, k_in, v_in, causal=causal, scale=scale, **options)
            else:
                out = _masked_attention(q_in, k_in, v_in, q_base, kv_len, causal, scale,
                                        **options)
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
        return (dq, None, None, None, None, None, None, *grads)


def kvcache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                   k_new: torch.Tensor, v_new: torch.Tensor,
                   new_lens: Optional[torch.Tensor] = None) -> None:
    """Write k_new/v_new after each row's live slots and advance ``lengths``, unchecked
    (:meth:`KVCache.append` checks every argument first)."""
    _append_op(k_cache, v_cache, lengths, k_new, v_new, new_lens)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Eager even inside a compiled function (a graph break). Traced, the buffer alias the
# attention reads shares the buffer's version counter and the next append fails backward;
# a traced variant that kept the slots as ctx attributes returned zero gradients under
# Inductor on CUDA (H200, torch 2.11). Inference through a cache (no gradients) stays in
# the graph through the registered ops.
@torch.compiler.disable
def _attend_training(q, cache, k_new, v_new, new_lens, causal, scale, options):
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
    return _CacheAttention.apply(q, cache, q_base, kv_len, causal, scale, options, *tensors)


# ----------------------------------------------------------------------------- state
class KVCache:
    """Keys and values of ``batch`` sequences, preallocated to ``max_len`` slots each.

    Storage is (batch, kv_heads, max_len, head_dim) for keys and for values; ``lengths``
    (a (batch,) int32 tensor on ``device``) says how many leading slots of each sequence
    are live. Sequences may have different lengths (prefill of prompts of different
    lengths, per-sequence rollback).

    * :meth:`append` writes new keys/values after each sequence's live slots;
      :func:`attention_with_kvcache` does the same fused with attention.
    * :meth:`truncate` rolls sequences back to a length; :meth:`reset` empties the cache.
    * :attr:`k` / :attr:`v` are views of the slots up to the longest sequence (slots at and
      beyond ``lengths[b]`` are not live for sequence b).

    Lengths live on the device, so checking capacity must not read them back at every
    decoding step: the cache keeps a host-side upper bound of the longest sequence, exact
    while all sequences share one length, and only when that bound says an append might not
    fit does it read the exact lengths (one host sync).

    Training: keys/values appended while autograd records (they require grad) are kept as
    chunks; attention over the cache sends each chunk the gradient of the slots it was
    written to, so a model can append and attend over several forward steps and backprop
    through all of them (module docstring). :meth:`reset` drops the chunks.

    Caller-owned storage: :meth:`from_buffers` wraps key/value tensors the caller allocated
    (in any layout, e.g. the (batch, max_len, kv_heads, head_dim) of flash-attn's
    ``flash_attn_with_kvcache``, transposed) and writes into them in place;
    :meth:`set_lengths` sets the live lengths (a caller's ``cache_seqlens``) without copying
    anything else.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32,
                 device: Optional[Union[str, torch.device]] = None):
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("max_len", max_len),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        shape = (batch, kv_heads, max_len, head_dim)
        k_buffer = torch.empty(shape, dtype=dtype, device=device)
        v_buffer = torch.empty(shape, dtype=dtype, device=device)
        self._attach(k_buffer, v_buffer,
                     torch.zeros(batch, dtype=torch.int32, device=k_buffer.device))

    @classmethod
    def from_buffers(cls, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                     lengths: Union[int, torch.Tensor] = 0, *,
                     length_bound: Optional[int] = None) -> "KVCache":
        """A cache over caller-owned ``k_buffer``/``v_buffer`` (batch, kv_heads, max_len,
        head_dim), any strides, one floating dtype and device: appends write into them in
        place and nothing is copied.

        ``lengths`` (an int, or a (batch,) integer tensor on the buffers' device) says how
        many leading slots of each sequence already hold keys/values; see
        :meth:`set_lengths` for ``length_bound``. An int32 ``lengths`` tensor on the
        device is used as the cache's own (appends advance it in place, so the caller
        sees the new lengths); any other is copied.
        """
        for name, x in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
            if x.dim() != 4 or 0 in x.shape:
                raise ValueError(f"{name} must have shape (batch, kv_heads, max_len, "
                                 f"head_dim), none of them 0, got {_describe(x)}")
            if not x.dtype.is_floating_point:
                raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if v_buffer.shape != k_buffer.shape:
            raise ValueError(f"v_buffer {tuple(v_buffer.shape)} must have k_buffer's shape "
                             f"{tuple(k_buffer.shape)}")
        if v_buffer.dtype != k_buffer.dtype or v_buffer.device != k_buffer.device:
            raise ValueError(f"v_buffer ({v_buffer.dtype} on {v_buffer.device}) must match "
                             f"k_buffer ({k_buffer.dtype} on {k_buffer.device})")
        if k_buffer.requires_grad or v_buffer.requires_grad:
            raise ValueError("k_buffer and v_buffer must not require grad: the cache writes "
                             "them in place (append keys/values that require grad instead)")
        batch = k_buffer.shape[0]
        shared = (isinstance(lengths, torch.Tensor) and lengths.dtype == torch.int32
                  and lengths.shape == (batch,) and lengths.device == k_buffer.device
                  and lengths.is_contiguous())
        own = lengths if shared else torch.zeros(batch, dtype=torch.int32,
                                                 device=k_buffer.device)
        cache = cls.__new__(cls)
        cache._attach(k_buffer, v_buffer, own)
        cache.set_lengths(lengths, length_bound=length_bound)
        return cache

    def _attach(self, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                lengths: torch.Tensor) -> None:
        self.k_buffer, self.v_buffer, self.lengths = k_buffer, v_buffer, lengths
        self.batch, self.kv_heads, self.max_len, self.head_dim = k_buffer.shape
        self.dtype, self.device = k_buffer.dtype, k_buffer.device
        self._bound = 0          # host upper bound of max(lengths)
        self._uniform = True     # all lengths equal _bound exactly
        self.chunks: List[Chunk] = []
        # Truncations/resets so far, and the count at the last append that followed one:
        # an attention that read the cache before a truncation sees its slots overwritten
        # once an append follows it.
        self.shrink_count = 0
        self.overwrite_count = 0

    # ------------------------------------------------------------------ views and bounds
    @property
    def k(self) -> torch.Tensor:
        """Keys (batch, kv_heads, longest length, head_dim): a view, not a copy."""
        return self.k_buffer[:, :, :self._bound]

    @property
    def v(self) -> torch.Tensor:
        """Values (batch, kv_heads, longest length, head_dim): a view, not a copy."""
        return self.v_buffer[:, :, :self._bound]

    @property
    def length_bound(self) -> int:
        """A host-side upper bound of the longest live length (exact when :attr:`uniform`)."""
        return self._bound

    @property
    def uniform(self) -> bool:
        """True when every sequence is known, on the host, to have ``length_bound`` tokens."""
        return self._uniform

    def reserve(self, n_new: int, new_lens: Optional[torch.Tensor] = None) -> None:
        """Raise ValueError unless ``n_new`` tokens (or ``new_lens[b]``) fit every sequence."""
        if self._bound + n_new <= self.max_len:
            return
        if not self._uniform:
            # The bound is loose after ragged appends or rollbacks: read the exact lengths
            # (one host sync, only when the bound alone cannot rule out an overflow).
            self._bound = int(self.lengths.max())
            needed = self.lengths if new_lens is None else self.lengths + new_lens
            if int((needed + (n_new if new_lens is None else 0)).max()) <= self.max_len:
                return
        raise ValueError(
            f"appending {n_new} tokens to a cache whose longest sequence holds {self._bound} "
            f"would exceed max_len {self.max_len}")

    def appended(self, n_new: int, new_lens: Optional[torch.Tensor] = None) -> None:
        """Update the host bookkeeping after ``n_new`` tokens were written."""
        if n_new == 0:
            return
        self._bound = min(self._bound + n_new, self.max_len)
        self._uniform = self._uniform and new_lens is None
        self.overwrite_count = self.shrink_count

    # ------------------------------------------------------------------ mutation
    def append(self, k: torch.Tensor, v: torch.Tensor,
               new_lens: Optional[torch.Tensor] = None) -> None:
        """Append k/v (batch, kv_heads, n, head_dim) to every sequence.

        With ``new_lens`` (batch,) only the first ``new_lens[b]`` tokens go to sequence b.
        Raises (leaving the cache unchanged) if anything does not fit.
        """
        new_lens = check_new_tokens(self, k, v, new_lens)
        n_new = k.shape[2]
        self.reserve(n_new, new_lens)
        record = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        start = self.lengths.long() if record else None  # a copy, taken before the append
        kvcache_append(self.k_buffer, self.v_buffer, self.lengths, k.detach(), v.detach(),
                       new_lens)
        if record:
            end = start + (new_lens.long() if new_lens is not None else n_new)
            self.chunks.append(Chunk(k, v, start, end))
        self.appended(n_new, new_lens)

    def truncate(self, length: Union[int, torch.Tensor]) -> None:
        """Roll every sequence back to at most ``length`` tokens (an int, or (batch,) tensor).

        Sequences already shorter are left as they are; slots past the new lengths are
        dropped (and overwritten by the next append).
        """
        if isinstance(length, torch.Tensor):
            self._check_per_row("length", length)
            if bool((length < 0).any()):  # host sync: a rollback is not a per-token step
                raise ValueError(f"length must be >= 0, got {length.tolist()}")
            torch.minimum(self.lengths, length.to(torch.int32), out=self.lengths)
            self._uniform = False
        elif isinstance(length, int) and not isinstance(length, bool):
            if length < 0:
                raise ValueError(f"length must be >= 0, got {length}")
            self.lengths.clamp_(max=length)
            self._bound = min(self._bound, length)
        else:
            raise TypeError(f"length must be an int or a tensor, got {type(length).__name__}")
        self.shrink_count += 1
        if self.chunks:
            live = self.lengths.long()
            self.chunks = [c._replace(end=torch.minimum(c.end, live)) for c in self.chunks]

    def _check_per_row(self, name: str, x: torch.Tensor) -> None:
        """Raise unless ``x`` is a (batch,) integer tensor on the cache's device."""
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
        if x.shape != (self.batch,):
            raise ValueError(f"{name} must have shape ({self.batch},), got {_describe(x)}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the cache is on {self.device}")

    def set_lengths(self, lengths: Union[int, torch.Tensor], *,
                    length_bound: Optional[int] = None) -> None:
        """Set every sequence's live length: an int, or a (batch,) integer tensor on the
        cache's device, each in [0, max_len]; the slots below it are taken as written.

        A tensor's values are checked (ValueError) and its longest length read back, one
        host sync, unless ``length_bound`` (an int in [0, max_len]) is given: then nothing
        is read back, the values are clamped to [0, length_bound] on the device, and the
        caller promises none was larger (a sequence longer than the bound attends over
        its first ``length_bound`` slots only). Drops the chunks kept for autograd, as
        :meth:`reset` does.
        """
        if length_bound is not None:
            if not isinstance(length_bound, int) or isinstance(length_bound, bool) or not (
                    0 <= length_bound <= self.max_len):
                raise ValueError(f"length_bound must be an int in [0, {self.max_len}], got "
                                 f"{length_bound!r}")
        if isinstance(lengths, torch.Tensor):
            self._check_per_row("lengths", lengths)
            if length_bound is None:
                lo, hi = torch.stack((lengths.min(), lengths.max())).tolist()  # one sync
                if lo < 0 or hi > self.max_len:
                    raise ValueError(f"lengths must lie in [0, {self.max_len}] (max_len), got "
                                     f"{lengths.tolist()}")
                self.lengths.copy_(lengths)
                bound, uniform = hi, lo == hi
            else:
                self.lengths.copy_(lengths.clamp(0, length_bound))
                bound, uniform = length_bound, False
        elif isinstance(lengths, int) and not isinstance(lengths, bool):
            if not 0 <= lengths <= self.max_len:
                raise ValueError(f"lengths must lie in [0, {self.max_len}] (max_len), got "
                                 f"{lengths}")
            if length_bound is not None and lengths > length_bound:
                raise ValueError(f"lengths {lengths} exceeds length_bound {length_bound}")
            self.lengths.fill_(lengths)
            bound, uniform = lengths, True
        else:
            raise TypeError(f"lengths must be an int or a tensor, got "
                            f"{type(lengths).__name__}")
        self._bound, self._uniform = bound, uniform
        self.chunks = []
        self.shrink_count += 1

    def reset(self) -> None:
        """Empty every sequence and forget the chunks kept for autograd."""
        self.lengths.zero_()
        self._bound, self._uniform = 0, True
        self.chunks = []
        self.shrink_count += 1

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.batch}, kv_heads={self.kv_heads}, max_len={self.max_len}, "
                f"head_dim={self.head_dim}, dtype={self.dtype}, device={self.device}, "
                f"length_bound={self._bound})")


# ----------------------------------------------------------------------------- public API
def attention_with_kvcache(q: torch.Tensor, cache, k_new: Optional[torch.Tensor] = None,
                           v_new: Optional[torch.Tensor] = None, *, causal: bool = True,
                           scale: Optional[float] = None,
                           new_lens: Optional[torch.Tensor] = None,
                           window: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                           dropout_seed: Optional[int] = None,
                           dropout_offset: int = 0) -> torch.Tensor:
    """Append k_new/v_new (B, Hkv, Tn, D) to ``cache`` and attend q (B, Hq, Tq, D) over it.

    Returns (B, Hq, Tq, D) in q's dtype. ``scale`` defaults to 1/sqrt(D). ``new_lens`` (B,)
    appends only the first ``new_lens[b]`` new tokens to sequence b (see the module
    docstring for positions and masking). ``window``, ``softcap`` and ``alibi_slopes``
    ((Hq,) or (B, Hq) float32) mean what they mean in :func:`fastlab.ops.attention`, with
    d = (the query's position) - (the key's position). Dropout (``dropout_p``,
    ``dropout_seed``, ``dropout_offset`` as there, i the query's index in this call and j
    the key's slot) applies to training through the cache only: an inference call (nothing
    needs a gradient) with ``dropout_p > 0`` raises ValueError. Every argument is checked before
    anything is written: on error the cache is unchanged. Differentiable with respect to q,
    k_new, v_new and every key/value appended earlier under autograd.
    """
    check_query(q, cache)
    new_lens = check_new_tokens(cache, k_new, v_new, new_lens, q_len=q.shape[2])
    _check_options("attention_with_kvcache", q, cache.batch, window, softcap, alibi_slopes,
                   dropout_p, dropout_seed, dropout_offset)
    window = (int(window[0]), int(window[1]))
    softcap = float(softcap)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _needs_grad(q, k_new, v_new) or (torch.is_grad_enabled() and cache.chunks):
        options = dict(window=window, softcap=softcap, alibi_slopes=alibi_slopes)
        if dropout_p > 0:
            if dropout_seed is None:  # from torch's CPU generator, as attention draws it
                dropout_seed = int(torch.randint(0, 2 ** 62, ()))
            options.update(dropout_p=float(dropout_p), dropout_seed=dropout_seed,
                           dropout_offset=dropout_offset)
        return _attend_training(q, cache, k_new, v_new, new_lens, causal, scale, options)
    if dropout_p > 0:
        raise ValueError("attention_with_kvcache: dropout_p > 0 applies to training through "
                         "the cache (q, k_new or v_new requiring grad); this call records no "
                         "gradient")
    n_new = 0 if k_new is None else k_new.shape[2]
    cache.reserve(n_new, new_lens)
    out = _attention_op(q, cache.k_buffer, cache.v_buffer, cache.lengths, k_new, v_new,
                        new_lens, causal, scale, min(cache.length_bound + n_new, cache.max_len),
                        window[0], window[1], softcap, alibi_slopes)
    cache.appended(n_new, new_lens)
    return out
