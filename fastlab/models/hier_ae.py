"""Hierarchical autoencoder: bytes -> words -> sentences -> groups of sentences -> ...

Levels. Level ``l`` reads items of width ``vector_sizes[l]`` (bytes at level 0) grouped in
units of at most ``sequence_lengths[l]`` items (a word of bytes, a sentence of words, a
group of sentences), and writes one vector of width ``vector_sizes[l + 1]`` per unit: the
items of level ``l + 1``. Each level has

- an encoder: the items (masked items replaced by a learned mask vector, or the [MASK]
  byte at level 0) plus a position embedding within their unit, then pre-norm transformer
  blocks whose attention stays inside each unit; the mean over the unit
  (:func:`fastlab.ops.segment_pool`), normalised and projected, is the unit's vector;
- a decoder: the unit's vector, projected and repeated over the unit's rows
  (:func:`fastlab.ops.segment_broadcast`) plus a position embedding, then blocks whose
  attention inside the unit is causal, so a row sees its unit's vector and the positions
  before it but no content of its own: what it predicts must come through the unit's vector;
- heads. Reconstruction (every item, from the decoder), MLM (the masked items, from the
  encoder) and end of unit (a logit per decoder row: is this the unit's last item; the
  causal decoder cannot count the rows after it, so the length must be in the vector).
  Level 0 predicts the byte (cross-entropy over 256 classes). A level above predicts a
  vector scored against every real item of its level in the batch (cosine similarity
  times ``CONTRAST_SCALE``, softmax over those candidates); every candidate with the same
  content (equal hashes) counts as right, so a word that occurs twice is no wrong answer.

The decoder of level ``l`` reads the unit vector the encoder wrote (before level ``l + 1``
masks anything), so each level is an autoencoder of its own items through one vector,
trained together with the others.

Layouts. The model reads its rows through a :class:`Hierarchy`: one :class:`Units` per
level saying how rows group into units, how to pool, broadcast and attend.

- :class:`RaggedUnits` (training): rows of all units back to back, CSR offsets as in
  :mod:`fastlab.ops.segment_pool`, no padding inside or between units. Fixed shapes for
  CUDA graphs: a level has a fixed number of rows and unit slots; the real rows come first,
  then empty unit slots, then one last unit holding every padding row. Attention runs over
  segments of at most ``sequence_lengths[l]`` rows: the units, and the padding cut into
  pieces of that length (so padding never costs more than a unit's worth per piece).
- :class:`PaddedUnits` (the baseline of ``benches/hier_ae_throughput.py``): every unit
  padded to ``sequence_lengths[l]`` rows, attention by torch's scaled_dot_product_attention
  with a boolean mask, pooling as a masked mean. On the same data both layouts compute the
  same losses (tests/test_hier_ae.py checks it).

Attention inside units, two ways for ragged units (``attention``):

- ``banded`` (:func:`unit_attention`): a row's keys are the rows of its segment, which lie
  within ``max_len - 1`` rows of it, so it looks at that band only: the keys
  ``r - max_len + 1 .. r + max_len - 1`` (``.. r`` when causal) gathered into a window,
  masked to the row's segment. Exact, O(rows x max_len) time and memory, plain PyTorch
  ops with fixed shapes (CUDA graphs, torch.compile).
- ``varlen``: :func:`fastlab.ops.attention_varlen` over the segments' ``cu_seqlens`` (int32),
  ``max_seqlen`` = ``max_len``; the same result (tests/test_hier_ae.py). Its packed
  layout runs the reference on every device for now, one sequence at a time with the
  offsets read on the host, so ``banded`` is the default until its kernels land.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastlab.ops.attention import attention_varlen
from fastlab.ops.cross_entropy import cross_entropy
from fastlab.ops.segment_pool import segment_broadcast, segment_ids, segment_pool

#: byte classes the level-0 heads predict (the special tokens are never targets)
BYTES = 256
#: input ids of level 0: the bytes, then ByteTokenizer's pad, bos, eos and mask
INPUT_VOCAB = 260
PAD, MASK = 256, 259
#: how ragged units attend: the band of unit_attention, or fastlab.ops.attention_varlen
ATTENTION = ("banded", "varlen")
#: cosine similarities times this are the logits over candidates: a softmax temperature of
#: 0.1, sharp enough that one right candidate among a thousand can take almost all the mass
CONTRAST_SCALE = 10.0


@dataclass
class HierAEConfig:
    #: most items of a unit at each level: bytes a word, words a sentence, sentences a group
    sequence_lengths: Sequence[int] = (16, 16, 6, 3, 4)
    #: item width at each level, one more than sequence_lengths (the top units' width last)
    vector_sizes: Sequence[int] = (32, 48, 64, 96, 128, 156)
    #: attention heads at each level
    num_heads: Sequence[int] = (2, 2, 2, 2, 2)
    #: transformer blocks of each encoder and of each decoder
    n_layer: int = 1
    dropout: float = 0.0

    def __post_init__(self):
        n = len(self.sequence_lengths)
        if n < 1 or len(self.vector_sizes) != n + 1 or len(self.num_heads) != n:
            raise ValueError(f"need one vector size more than sequence lengths and one head "
                             f"count per level, got {len(self.sequence_lengths)} lengths, "
                             f"{len(self.vector_sizes)} sizes, {len(self.num_heads)} heads")
        for d, h in zip(self.vector_sizes, self.num_heads):
            if h < 1 or d % h:
                raise ValueError(f"vector size {d} must be a multiple of its heads {h}")

    @property
    def levels(self) -> int:
        return len(self.sequence_lengths)


# --- attention inside units ----------------------------------------------------------------
def unit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor,
                   max_len: int, causal: bool) -> torch.Tensor:
    """Attention of each row over the rows of its segment: q, k, v (R, H, D), ``segment``
    (R,) non-decreasing ids, every segment at most ``max_len`` rows; (R, H, D) out.

    Causal: a row sees its segment's rows up to itself. Softmax in fp32."""
    rows = q.shape[0]
    lo = -(max_len - 1)
    hi = 0 if causal else max_len - 1
    where = torch.arange(rows, device=q.device)[:, None] + torch.arange(lo, hi + 1,
                                                                       device=q.device)
    inside = (where >= 0) & (where < rows)
    where = where.clamp(0, rows - 1)
    seen = inside & (segment[where] == segment[:, None])  # (R, W)
    scores = torch.einsum("rhd,rwhd->rhw", q, k[where]).float() / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~seen[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("rhw,rwhd->rhd", weights, v[where])


# --- layouts ---------------------------------------------------------------------------------
class Units:
    """How one level's ``rows`` group into units: ``real`` (R,) rows that are items,
    ``position`` (R,) index within the unit, ``last`` (R,) the last item of its unit;
    ``pool`` gives one row per unit slot for the level above (``units`` of them),
    ``broadcast`` the inverse, ``attend`` attention inside units."""

    rows: int
    units: int
    max_len: int
    real: torch.Tensor
    position: torch.Tensor
    last: torch.Tensor

    def pool(self, x: torch.Tensor, rows_above: int) -> torch.Tensor:
        raise NotImplementedError

    def broadcast(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attend(self, q, k, v, causal: bool) -> torch.Tensor:
        raise NotImplementedError


class RaggedUnits(Units):
    """Units back to back (see the module docstring): ``offsets`` (U + 1,) int64 CSR over
    ``rows``; unit U - 1 is the padding and starts after the last real row. ``attention``:
    one of :data:`ATTENTION`."""

    def __init__(self, offsets: torch.Tensor, rows: int, max_len: int,
                 attention: str = "banded"):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.offsets, self.rows, self.max_len = offsets, rows, max_len
        self.attention = attention
        self.units = offsets.shape[0] - 1
        r = torch.arange(rows, device=offsets.device)
        unit = segment_ids(offsets, rows)
        self.n_real = offsets[-2]
        self.real = r < self.n_real
        self.position = (r - offsets[unit]).clamp(max=max_len - 1)
        self.last = self.real & (r == offsets[unit + 1] - 1)
        # attention segments: the units, with the padding cut every max_len rows
        pieces = -(-rows // max_len)
        cuts = (self.n_real + max_len * torch.arange(1, pieces + 1, device=r.device)).clamp(
            max=rows)
        self.cu_seqlens = torch.cat([offsets[:-1], cuts])
        self.segment = segment_ids(self.cu_seqlens, rows)

    def pool(self, x: torch.Tensor, rows_above: int) -> torch.Tensor:
        if rows_above != self.units:
            raise ValueError(f"ragged units pool into {self.units} rows, not {rows_above}")
        return segment_pool(x, self.offsets, "mean")

    def broadcast(self, z: torch.Tensor) -> torch.Tensor:
        return segment_broadcast(z, self.offsets, self.rows)

    def attend(self, q, k, v, causal: bool) -> torch.Tensor:
        if self.attention == "varlen":
            cu = self.cu_seqlens.to(torch.int32)
            return attention_varlen(q, k, v, cu, cu, self.max_len, self.max_len,
                                    causal=causal)
        return unit_attention(q, k, v, self.segment, self.max_len, causal)


class PaddedUnits(Units):
    """Every unit padded to ``max_len`` rows: ``lengths`` (U,) real items of each unit;
    row ``u * max_len + i`` is item i of unit u."""

    def __init__(self, lengths: torch.Tensor, max_len: int):
        self.lengths, self.max_len = lengths, max_len
        self.units = lengths.shape[0]
        self.rows = self.units * max_len
        position = torch.arange(max_len, device=lengths.device)
        self.position = position.repeat(self.units)
        self.real = (position < lengths[:, None]).reshape(-1)
        self.last = (position == lengths[:, None] - 1).reshape(-1)
        i, j = position[:, None], position[None, :]
        self._seen = (j < lengths[:, None, None]) | (i == j)  # (U, L, L): padding sees itself
        self._seen_causal = self._seen & (j <= i)

    def pool(self, x: torch.Tensor, rows_above: int) -> torch.Tensor:
        real = self.real.view(self.units, self.max_len, 1)
        total = (x.view(self.units, self.max_len, -1).float() * real).sum(1)
        mean = (total / self.lengths.clamp(min=1)[:, None]).to(x.dtype)
        return F.pad(mean, (0, 0, 0, rows_above - self.units))

    def broadcast(self, z: torch.Tensor) -> torch.Tensor:
        return z[:self.units].repeat_interleave(self.max_len, dim=0)

    def attend(self, q, k, v, causal: bool) -> torch.Tensor:
        heads = q.shape[1:]
        q, k, v = (t.reshape((self.units, self.max_len) + heads).transpose(1, 2)
                   for t in (q, k, v))
        mask = (self._seen_causal if causal else self._seen)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape((self.rows,) + heads)


@dataclass
class Hierarchy:
    """A batch as the model reads it: ``chars`` (R_0,) level-0 ids (PAD where not real),
    ``levels[l]`` the units of level l, ``masked[l]`` (R_l,) items the encoder masks,
    ``hashes[l]`` (R_l,) int64 content hashes of level l's items (equal items, equal
    hashes; level 0 is unused), ``top_rows`` the rows above the last level."""

    chars: torch.Tensor
    levels: List[Units]
    masked: List[torch.Tensor]
    hashes: List[torch.Tensor]
    top_rows: int


@dataclass
class LevelOutput:
    """Per-row results of one level: losses (fp32, 0 where not counted) and hits."""

    real: torch.Tensor
    masked: torch.Tensor
    reconstruction: torch.Tensor
    reconstruction_hit: torch.Tensor
    mlm: torch.Tensor
    eos: torch.Tensor
    eos_hit: torch.Tensor
    #: log of the number of classes (256) or of candidates, a 0-dim tensor
    log_vocab: torch.Tensor


# --- modules ---------------------------------------------------------------------------------
class UnitBlock(nn.Module):
    """Pre-norm block: attention inside units, then a GELU MLP."""

    def __init__(self, d: int, heads: int, dropout: float, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, units: Units) -> torch.Tensor:
        rows, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(rows, 3, self.heads, d // self.heads).unbind(1)
        x = x + self.out(units.attend(q, k, v, self.causal).reshape(rows, d))
        return x + self.mlp(self.ln2(x))


class Level(nn.Module):
    """Encoder, pooling, decoder and heads of one level (see the module docstring)."""

    def __init__(self, cfg: HierAEConfig, level: int):
        super().__init__()
        d, d_up = cfg.vector_sizes[level], cfg.vector_sizes[level + 1]
        heads, length = cfg.num_heads[level], cfg.sequence_lengths[level]
        self.bytes = level == 0
        if self.bytes:
            self.embed = nn.Embedding(INPUT_VOCAB, d)
        else:
            self.mask_vector = nn.Parameter(torch.randn(d) * 0.02)
        self.enc_pos = nn.Embedding(length, d)
        self.encoder = nn.ModuleList(UnitBlock(d, heads, cfg.dropout, causal=False)
                                     for _ in range(cfg.n_layer))
        self.pool_norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, d_up)
        self.down = nn.Linear(d_up, d)
        self.dec_pos = nn.Embedding(length, d)
        self.decoder = nn.ModuleList(UnitBlock(d, heads, cfg.dropout, causal=True)
                                     for _ in range(cfg.n_layer))
        self.enc_norm, self.dec_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        out = BYTES if self.bytes else d
        self.reconstruct = nn.Linear(d, out)
        self.predict_masked = nn.Linear(d, out)
        self.end = nn.Linear(d, 1)

    def items(self, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Level-0 ids or level items (R, d) -> the encoder's input, masked rows replaced."""
        if self.bytes:
            return self.embed(torch.where(masked, MASK, x))
        return torch.where(masked[:, None], self.mask_vector.to(x.dtype), x)

    def encode(self, x: torch.Tensor, units: Units) -> torch.Tensor:
        h = x + self.enc_pos(units.position)
        for block in self.encoder:
            h = block(h, units)
        return h

    def pool(self, h: torch.Tensor, units: Units, rows_above: int) -> torch.Tensor:
        return self.up(self.pool_norm(units.pool(h, rows_above)))

    def decode(self, z: torch.Tensor, units: Units) -> torch.Tensor:
        h = units.broadcast(self.down(z)) + self.dec_pos(units.position)
        for block in self.decoder:
            h = block(h, units)
        return self.dec_norm(h)


def _contrast(query: torch.Tensor, candidates: torch.Tensor, hashes: torch.Tensor,
              real: torch.Tensor):
    """Per-row loss and hit of predicting each row's item among the real ``candidates``:
    -log of the softmax mass on candidates whose hash equals the row's."""
    scores = CONTRAST_SCALE * F.normalize(query.float(), dim=-1) @ \
        F.normalize(candidates.float(), dim=-1).t()
    same = (hashes[:, None] == hashes[None, :]) & real[None, :]
    # a padding row (its loss is dropped) is its own one candidate, so no row is all -inf
    same = same | (~real[:, None] & torch.eye(len(real), dtype=torch.bool,
                                                device=real.device))
    everything = torch.logsumexp(scores.masked_fill(~(same | real[None, :]), float("-inf")),
                                 dim=-1)
    right = torch.logsumexp(scores.masked_fill(~same, float("-inf")), dim=-1)
    scores = scores.masked_fill(~real[None, :], float("-inf"))
    best = scores.argmax(-1)
    return everything - right, hashes[best] == hashes


class HierAE(nn.Module):
    """The levels of :class:`HierAEConfig`; ``forward(hierarchy)`` returns a
    :class:`LevelOutput` per level."""

    def __init__(self, cfg: HierAEConfig):
        super().__init__()
        self.cfg = cfg
        self.levels = nn.ModuleList(Level(cfg, level) for level in range(cfg.levels))

    def forward(self, batch: Hierarchy) -> List[LevelOutput]:
        n = self.cfg.levels
        if len(batch.levels) != n:
            raise ValueError(f"the model has {n} levels, the batch {len(batch.levels)}")
        rows_above = [batch.levels[l + 1].rows for l in range(n - 1)] + [batch.top_rows]
        x: Optional[torch.Tensor] = batch.chars
        inputs, encoded = [], []
        for l, (level, units) in enumerate(zip(self.levels, batch.levels)):
            inputs.append(x)
            h = level.encode(level.items(x, batch.masked[l]), units)
            encoded.append(h)
            x = level.pool(h, units, rows_above[l])
        above = inputs[1:] + [x]
        outputs = []
        for l, (level, units) in enumerate(zip(self.levels, batch.levels)):
            decoded = level.decode(above[l], units)
            enc = level.enc_norm(encoded[l])
            real = units.real
            masked = batch.masked[l] & real
            if level.bytes:
                target = torch.where(real, batch.chars, -100)
                logits = level.reconstruct(decoded)
                rec = cross_entropy(logits, target, reduction="none")
                rec_hit = logits.argmax(-1) == batch.chars
                mlm = cross_entropy(level.predict_masked(enc), torch.where(masked, target, -100),
                                    reduction="none")
                log_vocab = torch.full((), math.log(BYTES), device=real.device)
            else:
                items, hashes = inputs[l], batch.hashes[l]
                rec, rec_hit = _contrast(level.reconstruct(decoded), items, hashes, real)
                mlm, _ = _contrast(level.predict_masked(enc), items, hashes, real)
                log_vocab = real.sum().clamp(min=2).float().log()
            end = level.end(decoded).squeeze(-1).float()
            eos = F.binary_cross_entropy_with_logits(end, units.last.float(), reduction="none")
            zero = torch.zeros((), device=real.device)
            outputs.append(LevelOutput(
                real=real, masked=masked,
                reconstruction=torch.where(real, rec.float(), zero),
                reconstruction_hit=rec_hit & real,
                mlm=torch.where(masked, mlm.float(), zero),
                eos=torch.where(real, eos, zero),
                eos_hit=((end > 0) == units.last) & real,
                log_vocab=log_vocab))
        return outputs
