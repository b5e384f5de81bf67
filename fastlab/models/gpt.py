"""GPT-style decoder: pre-norm blocks of causal attention and a GELU MLP (GPT-2's layout).

Options a GPT-2 run needs: biases (``all``: every linear layer and LayerNorm, GPT-2's;
``mlp``: the MLP's and the LayerNorms', none in attention; ``none``), tied or
separate input and output embeddings, dropout, and the loss: ``fused`` computes the head
and the cross-entropy together with :func:`fastlab.ops.fused_linear_cross_entropy`, so
the (tokens x vocabulary) logits never exist in training; ``logits`` computes them and
:func:`fastlab.ops.cross_entropy` (both exact, fp32 inside). Initialisation is GPT-2's:
normal(0, 0.02) everywhere (``init="normal"``) or GPT-2's, with the projections that
write into the residual stream scaled by 1 / sqrt(2 * n_layer) (``init="gpt2"``).

``recompute="pointwise"`` trades time for memory in training: each block runs under a
selective activation checkpoint that keeps what the matmuls and fastlab's ops produce
(projections, attention output and LSE) and recomputes the rest in the backward
(LayerNorms, GELU, residual sums, autocast's bf16 copies of the weights). Under
torch.compile the recomputed ops fuse into the backward's own pointwise kernels.
"""
import functools
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from fastlab.nn.attention import Attention
from fastlab.nn.kvcache import KVCache
from fastlab.ops.cross_entropy import cross_entropy
from fastlab.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

LOSSES = ("fused", "logits")
BIASES = ("all", "mlp", "none")
INITS = ("normal", "gpt2")
RECOMPUTE = ("none", "pointwise")

#: matmuls whose outputs a pointwise-recompute block keeps
_KEPT = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def _keep_matmuls(ctx, op, *args, **kwargs):
    """Selective checkpoint policy: save matmul and fastlab op outputs (and random draws,
    such as dropout's, which must not be drawn again), recompute the rest."""
    if (op in _KEPT or getattr(op, "namespace", "") == "fastlab"
            or torch.Tag.nondeterministic_seeded in getattr(op, "tags", ())):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    #: width of the MLPs (0: 4 x d_model)
    d_hid: int = 0
    dropout: float = 0.0
    #: where biases are: all (GPT-2), mlp (MLP and LayerNorms, not attention) or none
    bias: str = "mlp"
    #: the output head shares the token embedding's weight
    tie_embeddings: bool = True
    #: fused: head + cross-entropy without the logits; logits: materialise them
    loss: str = "fused"
    #: normal: N(0, 0.02) everywhere; gpt2: residual projections scaled by 1/sqrt(2 n_layer)
    init: str = "normal"
    #: none, or pointwise: recompute norms, activations and residual sums in the backward
    recompute: str = "none"

    def __post_init__(self):
        if self.bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES}, got {self.bias!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")

    @classmethod
    def from_model_config(cls, model_cfg, *, vocab_size: int, block_size: int) -> "GPTConfig":
        """The GPT of the trainer's ``model.*`` options."""
        return cls(vocab_size=vocab_size, block_size=block_size, n_layer=model_cfg.n_layer,
                   n_head=model_cfg.n_head, d_model=model_cfg.d_model, d_hid=model_cfg.d_hid,
                   dropout=model_cfg.dropout, bias=model_cfg.bias,
                   tie_embeddings=model_cfg.tie_embeddings, loss=model_cfg.loss,
                   init=model_cfg.init, recompute=model_cfg.recompute)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        bias = cfg.bias != "none"
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=bias)
        self.attn = Attention(cfg.d_model, cfg.n_head, causal=True, bias=cfg.bias == "all")
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=bias)
        d_hid = cfg.d_hid or 4 * cfg.d_model
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, d_hid, bias=bias), nn.GELU(),
            nn.Linear(d_hid, cfg.d_model, bias=bias), nn.Dropout(cfg.dropout),
        )
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None,
                new_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.resid_drop(self.attn(self.ln1(x), cache=cache, new_lens=new_lens))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias != "none")
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init)
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for block in self.blocks if cfg.init == "gpt2" else ():
            nn.init.normal_(block.attn.out_proj.weight, std=resid_std)
            nn.init.normal_(block.mlp[2].weight, std=resid_std)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                caches: Optional[List[KVCache]] = None, new_lens: Optional[torch.Tensor] = None,
                logits_at: Optional[torch.Tensor] = None, reduction: str = "mean"):
        """``(logits, loss)``: logits (B, S, V); with ``targets`` also the cross-entropy
        (ignore -100; ``reduction`` mean or sum). With the ``fused`` loss and ``targets``
        the logits are never computed and ``None`` is returned in their place.

        With ``caches`` (one :class:`KVCache` per block, see :meth:`new_kv_caches`) the
        tokens continue each sequence where its cache ends: their keys/values are appended
        and they attend over the whole cache. ``new_lens`` (B,) marks how many leading
        tokens of each row are real (a right-padded batch of prompts of different lengths).
        ``logits_at`` (B,) computes the logits of one position per row only, (B, 1, V):
        a prefill needs just the last prompt token's, not S x V of them.
        """
        s = idx.shape[1]
        if s > self.cfg.block_size:
            raise ValueError(f"sequence length {s} exceeds block_size {self.cfg.block_size}")
        if logits_at is not None and targets is not None:
            raise ValueError("logits_at computes one position per row; the loss needs all: "
                             "pass targets or logits_at, not both")
        if caches is None:
            pos = torch.arange(s, device=idx.device)
        else:
            if len(caches) != len(self.blocks):
                raise ValueError(f"caches must hold one KVCache per block ({len(self.blocks)}), "
                                 f"got {len(caches)}")
            # Each row continues at its own length. Padding positions past the end of a
            # short row are clamped; the first cache rejects the call if real ones overflow.
            pos = caches[0].lengths.long()[:, None] + torch.arange(s, device=idx.device)
            pos = pos.clamp(max=self.cfg.block_size - 1)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        recompute = (self.cfg.recompute == "pointwise" and caches is None
                     and torch.is_grad_enabled())
        context = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, use_reentrant=False, context_fn=context)
            else:
                x = block(x, None if caches is None else caches[i], new_lens)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]
        x = self.ln_f(x)
        if targets is None:
            return self.head(x), None
        if self.cfg.loss == "fused":
            return None, fused_linear_cross_entropy(x, self.head.weight, targets,
                                                    reduction=reduction)
        logits = self.head(x)
        return logits, cross_entropy(logits, targets, reduction=reduction)

    def new_kv_caches(self, batch: int, max_len: Optional[int] = None,
                      dtype: Optional[torch.dtype] = None) -> List[KVCache]:
        """Empty caches, one per block, for ``batch`` sequences of up to ``max_len`` tokens
        (default and at most ``block_size``), in the parameters' dtype and device."""
        max_len = self.cfg.block_size if max_len is None else max_len
        if not 1 <= max_len <= self.cfg.block_size:
            raise ValueError(f"max_len must lie in [1, block_size={self.cfg.block_size}], "
                             f"got {max_len}")
        weight = self.head.weight
        attn = self.blocks[0].attn
        return [KVCache(batch, attn.n_kv_head, max_len, attn.head_dim, dtype or weight.dtype,
                        weight.device) for _ in self.blocks]

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the PaLM appendix B formula."""
        cfg = self.cfg
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.d_model * seq_len

    @torch.no_grad()
    def greedy_complete(self, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
        """Append ``n_new`` greedily chosen tokens to every row of ``prompt`` (B, S)."""
        idx = prompt
        for _ in range(n_new):
            logits, _ = self(idx[:, -self.cfg.block_size:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx[:, prompt.shape[1]:]
