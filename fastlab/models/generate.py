"""Token generation for the GPT-style model over per-layer KV caches.

A batch of prompts of different lengths is right-padded and prefilled in one forward pass
(each cache row takes only its prompt's tokens, so rows end up with different lengths);
then each step feeds one token per row, which every layer appends to its cache and attends
over the row's own live keys. Nothing is recomputed and no cache is copied or padded.
"""
from typing import Optional, Sequence, Union

import torch

from fastlab.models.gpt import GPT


def _pad_prompts(prompts, device):
    """(B, S_max) right-padded token ids and the (B,) prompt lengths."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[0] < 1 or prompts.shape[1] < 1:
            raise ValueError(f"prompts must be a (batch, length) tensor, got shape "
                             f"{tuple(prompts.shape)}")
        prompts = list(prompts)
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() < 1:
            raise ValueError(f"prompt {i} must be a non-empty 1-D tensor of token ids")
        if p.dtype.is_floating_point or p.dtype == torch.bool:
            raise TypeError(f"prompt {i} must hold integer token ids, got {p.dtype}")
    sizes = [p.numel() for p in prompts]
    idx = torch.zeros(len(prompts), max(sizes), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, :p.numel()] = p.to(device)
    return idx, sizes


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row of ``logits`` (B, V): argmax when ``temperature`` is 0, else a draw
    from softmax(logits / temperature) restricted to the ``top_k`` largest logits."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPT, prompts: Union[torch.Tensor, Sequence[torch.Tensor]],
             max_new_tokens: int, *, temperature: float = 0.0, top_k: Optional[int] = None,
             generator: Optional[torch.Generator] = None,
             cache_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Continue every prompt by ``max_new_tokens`` tokens; returns (B, max_new_tokens).

    ``prompts``: a (B, S) tensor or a list of 1-D tensors of different lengths.
    ``temperature`` 0 is greedy; otherwise tokens are sampled (from the ``top_k`` most likely
    when given) with ``generator``. ``cache_dtype`` defaults to the model's parameter dtype.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    device = model.head.weight.device
    idx, sizes = _pad_prompts(prompts, device)
    lens = torch.tensor(sizes, device=device)
    batch, longest = idx.shape
    # the last new token is returned, never fed back: it needs no position
    positions = longest + max_new_tokens - 1
    if positions > model.cfg.block_size:
        raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) - 1 "
                         f"exceeds block_size {model.cfg.block_size}")
    caches = model.new_kv_caches(batch, positions, cache_dtype)
    ragged = min(sizes) != max(sizes)
    logits, _ = model(idx, caches=caches, new_lens=lens if ragged else None,
                      logits_at=lens - 1)
    last = logits[:, -1]
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = sample(last, temperature, top_k, generator)
        out[:, step] = token
        if step + 1 < max_new_tokens:
            logits, _ = model(token[:, None], caches=caches)
            last = logits[:, -1]
    return out
