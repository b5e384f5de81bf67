"""BERT-style encoder: pre-norm blocks of bidirectional attention over right-padded rows.

Rows are right-padded: row ``b`` holds ``kv_lens[b]`` real tokens and padding after them.
Every attention layer passes ``kv_lens`` to :func:`fastlab.ops.attention`, so no query
sees a padded key and the padding never changes a real token's output (a padded query's
own output is computed but means nothing; losses read real positions only).

Pre-norm (LayerNorm before attention and MLP, one more after the last block) rather than
BERT's post-norm: post-norm encoders need a careful warm-up and a learning rate that falls
with depth, which is what made deeper models fail in the issue's runs; pre-norm trains at
one learning rate over a wider range of depths. Dropout (``dropout``, 0.1 in BERT) follows
the embeddings, each attention output and each MLP.

:class:`EncoderForMaskedLM` adds BERT's prediction head (dense, GELU, LayerNorm, then the
token embedding matrix tied as the output layer, with a bias of its own). Its loss runs
the head only at the masked positions and goes through
:func:`fastlab.ops.fused_linear_cross_entropy`, so the logits of the vocabulary exist for
no position, masked or not, at any time.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastlab.nn.attention import Attention
from fastlab.ops.attention import attention
from fastlab.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

IGNORE = -100


@dataclass
class EncoderConfig:
    vocab_size: int
    #: the longest row (learned positions)
    max_len: int
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    #: width of the MLPs (0: 4 x d_model)
    d_hid: int = 0
    #: after the embeddings, each attention output and each MLP
    dropout: float = 0.1

    @classmethod
    def from_model_config(cls, model_cfg, *, vocab_size: int, max_len: int) -> "EncoderConfig":
        """The encoder of the trainer's ``model.*`` options."""
        return cls(vocab_size=vocab_size, max_len=max_len, n_layer=model_cfg.n_layer,
                   n_head=model_cfg.n_head, d_model=model_cfg.d_model, d_hid=model_cfg.d_hid,
                   dropout=model_cfg.dropout)


class PaddedSelfAttention(Attention):
    """Bidirectional self-attention of right-padded rows: ``forward(x, kv_lens)`` with
    ``x`` (B, S, d_model) and ``kv_lens`` (B,) the real tokens of each row (None: all).
    ``validate=False`` skips the check of kv_lens' values (a host sync on CUDA), for callers
    that checked them once for all layers."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__(d_model, n_head, causal=False)

    def forward(self, x: torch.Tensor, kv_lens: Optional[torch.Tensor] = None,
                validate: bool = True) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_head, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(b, s, 2, self.n_kv_head, self.head_dim).unbind(2)
        y = attention(q, k.transpose(1, 2), v.transpose(1, 2), kv_lens=kv_lens,
                      validate=validate)
        return self.out_proj(y.transpose(1, 2).reshape(b, s, -1))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = PaddedSelfAttention(cfg.d_model, cfg.n_head)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        d_hid = cfg.d_hid or 4 * cfg.d_model
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, d_hid), nn.GELU(),
            nn.Linear(d_hid, cfg.d_model), nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, kv_lens: Optional[torch.Tensor]) -> torch.Tensor:
        # kv_lens' values were checked once by the Encoder, not once per layer
        x = x + self.drop(self.attn(self.ln1(x), kv_lens, validate=False))
        return x + self.mlp(self.ln2(x))


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class Encoder(nn.Module):
    """Token and learned position embeddings, ``n_layer`` blocks, a final LayerNorm.

    ``forward(idx, kv_lens=None)``: ``idx`` (B, S) token ids, ``kv_lens`` (B,) real tokens
    per row -> hidden states (B, S, d_model). kv_lens' values are checked once per call
    (ValueError outside [0, S]; one host sync on CUDA, none under torch.compile), not once
    per layer.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(_init)

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    def forward(self, idx: torch.Tensor, kv_lens: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        s = idx.shape[1]
        if s > self.cfg.max_len:
            raise ValueError(f"sequence length {s} exceeds max_len {self.cfg.max_len}")
        if kv_lens is not None and not torch.compiler.is_compiling():
            if not isinstance(kv_lens, torch.Tensor) or kv_lens.shape != idx.shape[:1]:
                raise ValueError(f"kv_lens must be a tensor of shape ({idx.shape[0]},), got "
                                 f"{kv_lens!r}")
            if bool(((kv_lens < 0) | (kv_lens > s)).any()):
                raise ValueError(f"kv_lens values must be in [0, {s}] (the sequence length), "
                                 f"got {kv_lens.tolist()}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(s, device=idx.device)))
        for block in self.blocks:
            x = block(x, kv_lens)
        return self.ln_f(x)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the blocks (forward + backward), PaLM's formula."""
        cfg = self.cfg
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.d_model * seq_len


class EncoderForMaskedLM(nn.Module):
    """An :class:`Encoder` and BERT's prediction head, the output layer tied to the token
    embeddings.

    ``forward(idx, kv_lens, positions, labels=None)``: the head runs at ``positions``
    (B, P) only. With ``labels`` (B, P) it returns the summed cross-entropy (fp32, 0-dim;
    IGNORE = -100 slots left out) through the fused linear cross-entropy, without the
    logits; without, the logits (B, P, V), for evaluation. The loss is the forward's, so
    DDP sees it.
    """

    def __init__(self, cfg: EncoderConfig, mask_fraction: float = 0.15):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.transform = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.GELU(),
                                       nn.LayerNorm(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        #: the share of positions the head runs at, for the FLOPs estimate
        self.mask_fraction = mask_fraction
        self.transform.apply(_init)

    @property
    def cfg(self) -> EncoderConfig:
        return self.encoder.cfg

    def forward(self, idx: torch.Tensor, kv_lens: Optional[torch.Tensor],
                positions: torch.Tensor, labels: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        hidden = self.encoder(idx, kv_lens)
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        h = self.transform(picked)
        weight = self.encoder.tok_emb.weight
        if labels is None:
            return nn.functional.linear(h, weight, self.bias)
        return fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), weight,
                                          labels.reshape(-1), self.bias, ignore_index=IGNORE,
                                          reduction="sum")

    def flops_per_token(self, seq_len: int) -> float:
        cfg = self.cfg
        head = 6 * (cfg.d_model * cfg.d_model + cfg.vocab_size * cfg.d_model)
        return self.encoder.flops_per_token(seq_len) + self.mask_fraction * head
