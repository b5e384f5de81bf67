"""Scaled dot-product attention, layout (B, H, S, D) as torch SDPA.

With ``causal=True`` and ``q_len != kv_len`` the mask is aligned bottom-right: query ``i``
sees keys ``j <= i + kv_len - q_len``, which is what a KV cache and Perceiver-AR need.
A query row that sees no key returns 0 (not NaN).
"""
import math
from typing import Optional

import torch


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  scale: Optional[float] = None) -> torch.Tensor:
    """Plain-PyTorch attention in float32 (float64 for float64 inputs): the test oracle."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_len, kv_len = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(q_len, device=q.device)[:, None]
        j = torch.arange(kv_len, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (kv_len - q_len), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None) -> torch.Tensor:
    """Attention of ``q`` (B, Hq, Sq, D) over ``k``, ``v`` (B, Hkv, Skv, D)."""
    return attention_ref(q, k, v, causal=causal, scale=scale)
