"""Multi-head attention module on top of :func:`fastlab.ops.attention` and
:func:`fastlab.ops.attention_varlen`."""
from typing import Optional

import torch
from torch import nn

from fastlab.ops.attention import attention, attention_varlen
from fastlab.ops.kvcache import attention_with_kvcache


class Attention(nn.Module):
    """Multi-head self- or cross-attention with grouped key/value heads (GQA/MQA).

    ``forward(x, context=None)``: queries from ``x`` (B, S, d_model); keys and values from
    ``context`` (B, T, d_model), or from ``x`` for self-attention. With ``causal=True`` and
    S != T the mask is aligned bottom-right (see :func:`fastlab.ops.attention`).

    ``forward(x, cache=kv_cache)``: self-attention of ``x`` over a :class:`fastlab.nn.KVCache`
    (kv_heads = n_kv_head, head_dim = d_model // n_head): the keys/values of ``x`` are
    appended to the cache and the queries attend over everything it holds. ``new_lens``
    (B,) appends only the first ``new_lens[b]`` positions of row b (right-padded prompts).

    ``forward(x, cu_seqlens=offsets, max_seqlen=n)``: ``x`` is (total, d_model), sequences
    packed along the first axis and cut by the (B + 1,) int32 ``offsets`` (see
    :func:`fastlab.ops.attention_varlen`); each attends only within itself. For packed
    cross-attention ``context`` is (total_k, d_model) with its own ``context_cu_seqlens``
    and ``context_max_seqlen``.
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: Optional[int] = None,
                 causal: bool = False, bias: bool = False):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if d_model % n_head != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        if n_head % n_kv_head != 0:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        self.n_head, self.n_kv_head, self.causal = n_head, n_kv_head, causal
        self.head_dim = d_model // n_head
        self.q_proj = nn.Linear(d_model, n_head * self.head_dim, bias=bias)
        self.kv_proj = nn.Linear(d_model, 2 * n_kv_head * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, *,
                cache=None, new_lens: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                context_cu_seqlens: Optional[torch.Tensor] = None,
                context_max_seqlen: Optional[int] = None) -> torch.Tensor:
        if cache is not None and context is not None:
            raise ValueError("a KV cache holds this layer's own keys/values: pass either "
                             "context or cache, not both")
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("packed inputs (cu_seqlens) do not take a KV cache")
            return self._packed(x, context, cu_seqlens, max_seqlen, context_cu_seqlens,
                                context_max_seqlen)
        if max_seqlen is not None or context_cu_seqlens is not None:
            raise ValueError("max_seqlen and context_cu_seqlens go with cu_seqlens "
                             "(packed inputs)")
        context = x if context is None else context
        b, s, _ = x.shape
        t = context.shape[1]
        # (B, S, H, D) viewed as (B, H, S, D): the op takes strided views without a copy.
        q = self.q_proj(x).view(b, s, self.n_head, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(context).view(b, t, 2, self.n_kv_head, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if cache is None:
            y = attention(q, k, v, causal=self.causal)
        else:
            # Under autocast the projections come out in the autocast dtype; the cache
            # stores (and the op reads) its own.
            dtype = cache.dtype
            y = attention_with_kvcache(q.to(dtype), cache, k.to(dtype), v.to(dtype),
                                       causal=self.causal, new_lens=new_lens).to(q.dtype)
        return self.out_proj(y.transpose(1, 2).reshape(b, s, -1))

    def _packed(self, x, context, cu_seqlens, max_seqlen, context_cu_seqlens,
                context_max_seqlen) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"packed x must be (total, d_model), got shape {tuple(x.shape)}")
        if max_seqlen is None:
            raise ValueError("cu_seqlens needs max_seqlen, the longest sequence (an int: "
                             "reading it from the offsets would cost a host sync)")
        if context is None:
            if context_cu_seqlens is not None:
                raise ValueError("context_cu_seqlens goes with a packed context")
            context, context_cu_seqlens, context_max_seqlen = x, cu_seqlens, max_seqlen
        elif context_cu_seqlens is None or context_max_seqlen is None:
            raise ValueError("a packed context needs context_cu_seqlens and "
                             "context_max_seqlen")
        q = self.q_proj(x).view(x.shape[0], self.n_head, self.head_dim)
        k, v = self.kv_proj(context).view(context.shape[0], 2, self.n_kv_head,
                                          self.head_dim).unbind(1)
        y = attention_varlen(q, k, v, cu_seqlens, context_cu_seqlens, max_seqlen,
                             context_max_seqlen, causal=self.causal)
        return self.out_proj(y.reshape(x.shape[0], -1))
