"""Multi-head attention module on top of :func:`fastlab.ops.attention`."""
from typing import Optional

import torch
from torch import nn

from fastlab.ops.attention import attention
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
                cache=None, new_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cache is not None and context is not None:
            raise ValueError("a KV cache holds this layer's own keys/values: pass either "
                             "context or cache, not both")
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
