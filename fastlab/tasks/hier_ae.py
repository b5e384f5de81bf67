"""Hierarchical autoencoding of text: bytes into words, words into sentences, sentences into
groups, each level reconstructing the one below (:mod:`fastlab.models.hier_ae`).

Text. ``task.data`` names a plain-text file (one document) or a JSONL file (one document
per line, its text under ``task.field``); without it the text is
:func:`fastlab.data.english_corpus` (``task.corpus_paragraphs`` paragraphs of seed
``task.corpus_seed``, each a document). A document's units are those of
:func:`fastlab.data.text_offsets` (a word is its bytes with the whitespace after it, a
sentence ends at ``.``, ``!`` or ``?``), with two cuts so that every unit fits its level:
a word longer than ``sequence_lengths[0]`` bytes is cut into pieces of that many bytes, a
sentence of more than ``sequence_lengths[1]`` words into pieces of that many words.

Levels. ``task.sequence_lengths`` holds the most items of a unit at each level and
``task.vector_sizes`` the width of each level's items (one more entry: the top units').
Level 0 groups bytes into words, level 1 words into sentences, and every level above
groups consecutive items of the level below in runs of its length (sentences in groups
of ``sequence_lengths[2]``, those in groups of ``sequence_lengths[3]``, ...). The log's
configuration, 16 bytes a word, 16 words a sentence, then 6, 3 and 4, turns a batch of 64
sentences into 11 groups, 4 groups of groups and one vector of width 156 at the top.

Batches. ``train.batch_size`` sentences a step. So that groups hold text that belongs
together, the corpus's sentences are cut into blocks of ``sequence_lengths[2]``
consecutive sentences (of 1 with two levels) and a batch is blocks drawn uniformly with
replacement, their sentences in order (the last block cut to the batch size). A batch is
``bytes`` (B, S_1, S_0): the bytes of each word slot of each sentence, PAD past a word's
end and in the word slots past a sentence's end, with the masks of the MLM loss
(``mask0`` (B, S_1, S_0) bytes, ``mask1`` (B, S_1) words, ``mask_up`` (B, levels - 2) one
draw per sentence for each level above, read at the first sentence of a group). Set-up
puts the corpus bytes and the word and sentence offsets on the device once; a batch is
gathered from them by device ops, its blocks and masks hashes of (seed, step, index)
(:func:`fastlab.tasks.base.counter_bits`): a pure function of (seed, step), no host sync.

Packing. The model reads ragged units (:class:`fastlab.models.hier_ae.RaggedUnits`): the
loss packs a batch's bytes back to back, word after word, with no padding inside or
between units. Shapes stay fixed (CUDA graphs, torch.compile): the B sentences of a batch
get budgets of B x ``task.chars_per_sentence`` byte rows and B x
``task.words_per_sentence`` word rows; sentences are kept in order while both fit, those
from the first that does not are dropped from the step (no loss, not counted), and the
rows the kept ones leave free are padding at the end of each level. Evaluation reports
the share of held-out sentences that fit (``kept``). The defaults (64 bytes and 12 words a
sentence) suit the grammar corpus, whose sentences average 44 bytes (sd 21) and 7.4 words
(sd 3.5): at 64 sentences a batch the budgets are more than seven standard deviations
above the mean batch, so a sentence is almost never dropped, and about a third of the rows
are padding (against 83% of the byte rows with every sentence padded to 16 x 16).

Attention inside units is ``task.attention``: ``banded`` (default) or ``varlen``
(:func:`fastlab.ops.attention_varlen`); see :mod:`fastlab.models.hier_ae`.

Losses, per level ``l`` and logged under their names: ``reconstruction/l`` (each item
from its unit's vector), ``mlm/l`` (the masked items, ``task.mlm_probability`` of them,
from the encoder) and ``eos/l`` (is this item its unit's last). Reconstruction and MLM are
cross-entropies over 256 bytes at level 0 and over the batch's items of the level above
it; ``task.divide_by_log_vocab`` divides them by the log of that number of classes, so
chance is 1 at every level. The step's loss is the sum over levels and kinds of each
mean (weighted by ``task.*_weight``), counted once per kept sentence.

Held out. A block whose bytes hash (CRC-32) into one bucket of ``HELD_OUT_MOD`` is never
trained on: equal blocks are held out together. Evaluation (``accuracy``: level-0 byte
reconstruction accuracy; ``accuracy/l``: the same for the items of level ``l``;
``eos_accuracy/l``; ``kept``) and ``validation_loss`` read the held-out blocks in order.
"""
import math
import zlib
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from fastlab.data import english_corpus, read_documents, text_offsets
from fastlab.models.hier_ae import (ATTENTION, PAD, HierAE, HierAEConfig, Hierarchy, LevelOutput,
                                    PaddedUnits, RaggedUnits)
from fastlab.tasks.base import (VALIDATION_SEED, ConfigError, LossOutput, Task, TaskConfig,
                                _mix32, check_option, counter_bits)

#: one block in HELD_OUT_MOD is held out
HELD_OUT_MOD = 20
#: sentences per evaluation forward pass
EVAL_BATCH = 256
#: the most items a unit may have at any level (the position tables' size)
MAX_SEQUENCE_LENGTH = 1024
_M32 = 0xFFFFFFFF


def _ints(text: str, option: str) -> List[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers, got {text!r}") from None
    check_option(bool(values), f"{option} must list at least one integer, got {text!r}")
    return values


@dataclass
class HierarchicalAutoencoderConfig(TaskConfig):
    name: str = "hier_ae"
    #: a text file: plain (one document) or .jsonl/.ndjson (one per line); empty: the
    #: grammar corpus
    data: str = ""
    #: JSONL files: the field that holds each document's text
    field: str = "text"
    #: grammar corpus (no task.data): paragraphs, each a document
    corpus_paragraphs: int = 2000
    #: grammar corpus: its seed
    corpus_seed: int = 0
    #: most items of a unit at each level, comma-separated: bytes a word, words a
    #: sentence, then sentences a group, groups a group of groups, ...; at least two
    sequence_lengths: str = "16,16,6,3,4"
    #: item width at each level, comma-separated, one more than task.sequence_lengths
    vector_sizes: str = "32,48,64,96,128,156"
    #: attention heads: one count for every level, or one per level; each divides the
    #: level's vector size
    num_heads: str = "2"
    #: byte budget of a batch per sentence: B sentences pack into B x this many rows
    #: (sentences past a budget are dropped from the step); in [1, S_0 x S_1]
    chars_per_sentence: int = 64
    #: word budget of a batch per sentence: B x this many word rows; in [1, S_1]
    words_per_sentence: int = 12
    #: attention inside ragged units: banded (a masked band of plain PyTorch ops) or
    #: varlen (fastlab.ops.attention_varlen)
    attention: str = "banded"
    #: the share of each level's items masked for the MLM loss, in [0, 1)
    mlm_probability: float = 0.15
    #: divide reconstruction and MLM losses by log(number of classes): chance is 1 at
    #: every level
    divide_by_log_vocab: bool = True
    #: weight of each level's reconstruction loss, >= 0
    reconstruction_weight: float = 1.0
    #: weight of each level's MLM loss, >= 0
    mlm_weight: float = 1.0
    #: weight of each level's end-of-unit loss, >= 0
    eos_weight: float = 1.0

    def __post_init__(self):
        lengths = _ints(self.sequence_lengths, "task.sequence_lengths")
        sizes = _ints(self.vector_sizes, "task.vector_sizes")
        heads = _ints(self.num_heads, "task.num_heads")
        check_option(len(lengths) >= 2, "task.sequence_lengths needs two levels or more "
                     f"(bytes a word, words a sentence), got {self.sequence_lengths!r}")
        check_option(all(1 <= n <= MAX_SEQUENCE_LENGTH for n in lengths),
                     f"task.sequence_lengths must be in [1, {MAX_SEQUENCE_LENGTH}], got "
                     f"{self.sequence_lengths!r}")
        check_option(len(sizes) == len(lengths) + 1,
                     f"task.vector_sizes must have one entry more than task.sequence_lengths "
                     f"({len(lengths) + 1}), got {len(sizes)}")
        check_option(all(d >= 1 for d in sizes),
                     f"task.vector_sizes must be >= 1, got {self.vector_sizes!r}")
        check_option(len(heads) in (1, len(lengths)),
                     f"task.num_heads must be one count or one per level ({len(lengths)}), "
                     f"got {len(heads)}")
        heads = heads * len(lengths) if len(heads) == 1 else heads
        for level, (d, h) in enumerate(zip(sizes, heads)):
            check_option(h >= 1 and d % h == 0,
                         f"task.num_heads: level {level} has {h} heads, which must divide "
                         f"its vector size {d}")
        check_option(self.corpus_paragraphs >= 1,
                     f"task.corpus_paragraphs must be >= 1, got {self.corpus_paragraphs}")
        check_option(bool(self.field), "task.field must not be empty")
        check_option(1 <= self.chars_per_sentence <= lengths[0] * lengths[1],
                     f"task.chars_per_sentence must be in [1, {lengths[0] * lengths[1]}] "
                     f"(task.sequence_lengths' first two), got {self.chars_per_sentence}")
        check_option(1 <= self.words_per_sentence <= lengths[1],
                     f"task.words_per_sentence must be in [1, {lengths[1]}] "
                     f"(task.sequence_lengths' second), got {self.words_per_sentence}")
        check_option(self.attention in ATTENTION,
                     f"task.attention must be one of {ATTENTION}, got {self.attention!r}")
        check_option(0 <= self.mlm_probability < 1,
                     f"task.mlm_probability must be in [0, 1), got {self.mlm_probability}")
        for key in ("reconstruction_weight", "mlm_weight", "eos_weight"):
            value = getattr(self, key)
            check_option(math.isfinite(value) and value >= 0,
                         f"task.{key} must be finite and >= 0, got {value}")

    def model_config(self, n_layer: int = 1, dropout: float = 0.0) -> HierAEConfig:
        lengths = _ints(self.sequence_lengths, "task.sequence_lengths")
        heads = _ints(self.num_heads, "task.num_heads")
        return HierAEConfig(sequence_lengths=tuple(lengths),
                            vector_sizes=tuple(_ints(self.vector_sizes, "task.vector_sizes")),
                            num_heads=tuple(heads * len(lengths) if len(heads) == 1 else heads),
                            n_layer=n_layer, dropout=dropout)


# --- the corpus on the host ------------------------------------------------------------------
def _cut(offsets: np.ndarray, limit: int) -> Tuple[np.ndarray, np.ndarray]:
    """Cut every unit of CSR ``offsets`` longer than ``limit`` rows into pieces of
    ``limit``: (the new offsets, the new index of each old unit's first piece, one more
    entry for the end), so offsets over these units map through it."""
    lengths = np.diff(offsets)
    pieces = np.maximum(-(-lengths // limit), 1)
    first = np.concatenate([[0], np.cumsum(pieces)]).astype(np.int64)
    unit = np.repeat(np.arange(lengths.size), pieces)
    starts = offsets[unit] + limit * (np.arange(first[-1]) - first[unit])
    return np.concatenate([starts, offsets[-1:]]).astype(np.int64), first


def corpus_units(documents: List[str], word_limit: int, sentence_limit: int
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The documents' bytes back to back (uint8), the word offsets over them and the
    sentence offsets over the words (int64 CSR), with words of at most ``word_limit``
    bytes and sentences of at most ``sentence_limit`` words (see the module docstring)."""
    data, words, sentences = [], [np.zeros(1, np.int64)], [np.zeros(1, np.int64)]
    byte_base = word_base = 0
    for doc in documents:
        raw = np.frombuffer(doc.encode("utf-8"), np.uint8)
        word_off, sent_off = text_offsets(doc)
        word_off, first = _cut(word_off, word_limit)
        sent_off, _ = _cut(first[sent_off], sentence_limit)
        data.append(raw)
        words.append(word_off[1:] + byte_base)
        sentences.append(sent_off[1:] + word_base)
        byte_base += raw.size
        word_base += word_off.size - 1
    return (np.concatenate(data) if data else np.zeros(0, np.uint8),
            np.concatenate(words), np.concatenate(sentences))


def _documents(cfg: HierarchicalAutoencoderConfig) -> List[str]:
    if not cfg.data:
        return english_corpus(cfg.corpus_paragraphs, seed=cfg.corpus_seed).split("\n\n")
    try:
        return read_documents(cfg.data, field=cfg.field)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"task.data: {exc}") from None


# --- hashes of content (equal items, equal hashes) --------------------------------------------
def unit_hash(items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A 32-bit hash (int64) of each unit of ``items`` (..., L) (values < 2**32) over its
    ``valid`` (..., L) entries, in order."""
    # odd 31-bit weights by position, made on the device: each product stays below 2**63
    position = torch.arange(1, items.shape[-1] + 1, device=items.device)
    weights = (_mix32(position) >> 1) | 1
    terms = torch.where(valid, (items * weights) & _M32, 0)
    return _mix32(terms.sum(-1) & _M32)


def _group_hashes(hashes: torch.Tensor, n_real, length: int, groups: int) -> torch.Tensor:
    """Hashes of ``groups`` runs of ``length`` consecutive items, of which the first
    ``n_real`` of ``hashes`` are real."""
    index = torch.arange(groups * length, device=hashes.device)
    items = hashes[index.clamp(max=hashes.shape[0] - 1)].view(groups, length)
    return unit_hash(items, (index < n_real).view(groups, length))


def _compact(values: torch.Tensor, keep: torch.Tensor, size: int, fill) -> torch.Tensor:
    """The ``keep`` entries of ``values`` (1-D) first, in order, then ``fill``: ``size``
    entries (kept entries past it are lost)."""
    rank = keep.long().cumsum(0)
    source = torch.searchsorted(rank, torch.arange(1, size + 1, device=values.device))
    picked = values[source.clamp(max=values.shape[0] - 1)]
    return torch.where(torch.arange(size, device=values.device) < rank[-1], picked, fill)


def _with_padding_row(x: torch.Tensor, fill=0) -> torch.Tensor:
    return torch.cat([x, torch.full_like(x[:1], fill)])


# --- batches into the model's layouts -------------------------------------------------------
def ragged_hierarchy(batch: Dict[str, torch.Tensor], lengths: List[int],
                     chars_per_sentence: int, words_per_sentence: int,
                     attention: str = "banded") -> Tuple[Hierarchy, torch.Tensor]:
    """A batch (see the module docstring) packed as ragged units within the byte and word
    budgets: (the hierarchy, the kept sentences (B,) bool)."""
    data = batch["bytes"]
    b, s1, s0 = data.shape
    device = data.device
    budget, word_slots = b * chars_per_sentence, b * words_per_sentence
    valid = data != PAD
    word_len = valid.sum(-1)
    # whole sentences, in order, while they fit
    keep = ((word_len.sum(-1).cumsum(0) <= budget)
            & ((word_len > 0).sum(-1).cumsum(0) <= word_slots))
    valid = valid & keep[:, None, None]
    word_len = word_len * keep[:, None]
    word_valid = word_len > 0
    word_hash = unit_hash(data + 1, valid)
    sentence_hash = unit_hash(word_hash, word_valid)
    zero = torch.zeros(1, dtype=torch.int64, device=device)

    flat_valid, flat_words = valid.reshape(-1), word_valid.reshape(-1)
    chars = _compact(data.reshape(-1), flat_valid, budget, PAD)
    word_lengths = _compact(word_len.reshape(-1), flat_words, word_slots, 0)
    offsets = [torch.cat([zero, word_lengths.cumsum(0), zero + budget])]
    offsets.append(torch.cat([zero, word_valid.sum(-1).cumsum(0), zero + word_slots + 1]))
    masked = [_compact(batch["mask0"].reshape(-1), flat_valid, budget, False),
              _with_padding_row(_compact(batch["mask1"].reshape(-1), flat_words, word_slots,
                                         False), False)]
    hashes = [chars, _with_padding_row(_compact(word_hash.reshape(-1), flat_words, word_slots,
                                                0))]
    rows = [budget, word_slots + 1, b + 1]
    n_real = keep.sum()  # sentences: the real items of level 2
    if len(lengths) > 2:
        masked.append(_with_padding_row(batch["mask_up"][:, 0] & keep, False))
        hashes.append(_with_padding_row(torch.where(keep, sentence_hash, 0)))
    span = 1
    for level in range(2, len(lengths)):
        length, below = lengths[level], rows[level] - 1
        groups = -(-below // length)
        starts = (torch.arange(groups + 1, device=device) * length).clamp(max=n_real)
        offsets.append(torch.cat([starts, zero + rows[level]]))
        rows.append(groups + 1)
        if level + 1 < len(lengths):
            group_hash = _group_hashes(hashes[level], n_real, length, groups)
            n_real = (n_real + length - 1) // length
            span *= length
            first = (torch.arange(groups, device=device) * span).clamp(max=b - 1)
            real = torch.arange(groups, device=device) < n_real
            masked.append(_with_padding_row(batch["mask_up"][first, level - 1] & real, False))
            hashes.append(_with_padding_row(group_hash))
    units = [RaggedUnits(o, r, n, attention) for o, r, n in zip(offsets, rows, lengths)]
    return Hierarchy(chars, units, masked, hashes, top_rows=rows[-1]), keep


def padded_hierarchy(batch: Dict[str, torch.Tensor], lengths: List[int]) -> Hierarchy:
    """A batch in the padded layout, every unit at its level's maximum length (the
    baseline of ``benches/hier_ae_throughput.py``); every sentence is kept."""
    data = batch["bytes"]
    b, s1, s0 = data.shape
    device = data.device
    valid = data != PAD
    word_len = valid.sum(-1)
    word_valid = word_len > 0
    word_hash = unit_hash(data + 1, valid)
    sentence_hash = unit_hash(word_hash, word_valid)
    units = [PaddedUnits(word_len.reshape(-1), s0), PaddedUnits(word_valid.sum(-1), s1)]
    masked = [batch["mask0"].reshape(-1) & valid.reshape(-1),
              batch["mask1"].reshape(-1) & word_valid.reshape(-1)]
    hashes = [data.reshape(-1), word_hash.reshape(-1)]
    items, item_hash, span = b, sentence_hash, 1
    for level in range(2, len(lengths)):
        length = lengths[level]
        groups = -(-items // length)
        slots = groups * length
        index = torch.arange(slots, device=device)
        group_len = (items - torch.arange(groups, device=device) * length).clamp(0, length)
        units.append(PaddedUnits(group_len, length))
        first = (index * span).clamp(max=b - 1)
        masked.append(batch["mask_up"][first, level - 2] & (index < items))
        hashes.append(torch.cat([item_hash, item_hash.new_zeros(slots - items)]))
        item_hash = _group_hashes(hashes[-1], items, length, groups)
        items, span = groups, span * length
    return Hierarchy(data.reshape(-1), units, masked, hashes, top_rows=items)


# --- the task ----------------------------------------------------------------------------------
class HierarchicalAutoencoder(Task):
    name = "hier_ae"
    Config = HierarchicalAutoencoderConfig
    metric = "accuracy"

    def __init__(self, cfg: HierarchicalAutoencoderConfig):
        super().__init__(cfg)
        self.lengths = _ints(cfg.sequence_lengths, "task.sequence_lengths")
        self.levels = len(self.lengths)
        #: byte rows a sentence has in the packed batch: tokens/s counts them
        self.seq_len = cfg.chars_per_sentence
        self.budgets = (cfg.chars_per_sentence, cfg.words_per_sentence, cfg.attention)
        #: sentences a block: a group of the first level above sentences
        self.block = self.lengths[2] if self.levels > 2 else 1
        source = cfg.data or "the grammar corpus"
        data, words, sentences = corpus_units(_documents(cfg), self.lengths[0], self.lengths[1])
        n_blocks = (sentences.size - 1) // self.block
        held = np.array([zlib.crc32(data[words[sentences[i * self.block]]:
                                          words[sentences[(i + 1) * self.block]]].tobytes())
                         % HELD_OUT_MOD == 0 for i in range(n_blocks)], dtype=bool)
        if held.all() or not held.any():
            raise ConfigError(f"task.data: {source} has {n_blocks} block(s) of {self.block} "
                              f"sentence(s), {int(held.sum())} held out: too few for a "
                              f"training and a held-out part")
        self.n_sentences = sentences.size - 1
        self._host = {"data": torch.from_numpy(data.copy()), "words": torch.from_numpy(words),
                      "sentences": torch.from_numpy(sentences),
                      "train": torch.from_numpy(np.flatnonzero(~held)),
                      "held_out": torch.from_numpy(np.flatnonzero(held))}
        self._on_device: Dict[torch.device, Dict[str, torch.Tensor]] = {}
        self._mask_threshold = int(round(cfg.mlm_probability * (1 << 32)))

    def build_model(self, model_cfg) -> nn.Module:
        """The levels of ``task.*``; of ``model.*`` only n_layer (blocks of each encoder
        and decoder) and dropout apply."""
        return HierAE(self.cfg.model_config(model_cfg.n_layer, model_cfg.dropout))

    # --- data ------------------------------------------------------------------------
    @torch.compiler.disable  # copied once per device, outside any compiled graph
    def _on(self, device: torch.device) -> Dict[str, torch.Tensor]:
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = {k: v.to(device) for k, v in self._host.items()}
        return self._on_device[device]

    def blocks(self, split: str) -> int:
        return int(self._host[split].shape[0])

    def sentences_of(self, blocks: torch.Tensor, n: int) -> torch.Tensor:
        """The first ``n`` sentences of the ``blocks`` (indices into the block list of
        the corpus), in order."""
        slot = torch.arange(n, device=blocks.device)
        return blocks[slot // self.block] * self.block + slot % self.block

    def gather(self, sentences: torch.Tensor) -> torch.Tensor:
        """The bytes (B, S_1, S_0) of ``sentences`` (B,), PAD past each word and sentence."""
        t = self._on(sentences.device)
        s0, s1 = self.lengths[0], self.lengths[1]
        first = t["sentences"][sentences]
        n_words = t["sentences"][sentences + 1] - first
        slot = torch.arange(s1, device=sentences.device)
        word_valid = slot < n_words[:, None]
        word = torch.where(word_valid, first[:, None] + slot, 0)
        start = t["words"][word]
        n_bytes = torch.where(word_valid, t["words"][word + 1] - start, 0)
        pos = torch.arange(s0, device=sentences.device)
        where = (start[..., None] + pos).clamp(max=t["data"].shape[0] - 1)
        return torch.where(pos < n_bytes[..., None], t["data"][where].long(), PAD)

    def _masks(self, seed: int, step: torch.Tensor, b: int, device) -> Dict[str, torch.Tensor]:
        shapes = {"mask0": (b, self.lengths[1], self.lengths[0]),
                  "mask1": (b, self.lengths[1]), "mask_up": (b, max(self.levels - 2, 0))}
        out = {}
        for stream, (key, shape) in enumerate(shapes.items(), start=1):
            index = torch.arange(math.prod(shape), device=device).view(shape)
            out[key] = counter_bits(seed, stream, step, index) < self._mask_threshold
        return out

    def batch(self, step: torch.Tensor, batch_size: int, device: torch.device,
              seed: int = 0) -> Dict[str, torch.Tensor]:
        step = torch.as_tensor(step, device=device)
        train = self._on(device)["train"]
        n_blocks = -(-batch_size // self.block)
        draw = counter_bits(seed, 0, step, torch.arange(n_blocks, device=device))
        sentences = self.sentences_of(train[draw % train.shape[0]], batch_size)
        return {"bytes": self.gather(sentences), **self._masks(seed, step, batch_size, device)}

    def held_out_batch(self, index: int, batch_size: int, device: torch.device,
                       masked: bool, seed: int = VALIDATION_SEED) -> Dict[str, torch.Tensor]:
        """Batch ``index`` of the held-out blocks read in order (wrapping around), with
        masks drawn from ``seed`` or none."""
        held = self._on(device)["held_out"]
        n_blocks = -(-batch_size // self.block)
        pick = (index * n_blocks + torch.arange(n_blocks, device=device)) % held.shape[0]
        batch = {"bytes": self.gather(self.sentences_of(held[pick], batch_size))}
        masks = self._masks(seed, torch.tensor(index, device=device), batch_size, device)
        if not masked:
            masks = {k: torch.zeros_like(v) for k, v in masks.items()}
        return {**batch, **masks}

    # --- loss ------------------------------------------------------------------------
    def reduce(self, outputs: List[LevelOutput], kept: torch.Tensor) -> LossOutput:
        """Sums of each level's losses into a :class:`LossOutput` (module docstring)."""
        cfg = self.cfg
        parts, total = {}, torch.zeros((), device=kept.device)
        for level, out in enumerate(outputs):
            scale = out.log_vocab if cfg.divide_by_log_vocab else 1.0
            n_items, n_masked = out.real.sum(), out.masked.sum()
            for kind, value, n, weight in (
                    ("reconstruction", out.reconstruction.sum() / scale, n_items,
                     cfg.reconstruction_weight),
                    ("mlm", out.mlm.sum() / scale, n_masked, cfg.mlm_weight),
                    ("eos", out.eos.sum(), n_items, cfg.eos_weight)):
                parts[f"{kind}/{level}"] = (value, n)
                total = total + weight * value / n.clamp(min=1)
        count = kept.sum()
        return LossOutput(total * count, count, parts)

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> LossOutput:
        hierarchy, kept = ragged_hierarchy(batch, self.lengths, *self.budgets)
        return self.reduce(model(hierarchy), kept)

    # --- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, n_samples: int, device: torch.device
                 ) -> Dict[str, float]:
        """Reconstruction accuracy of every level and end-of-unit accuracy on
        ``n_samples`` held-out sentences, unmasked; ``kept``: the share within budget."""
        was_training = model.training
        model.eval()
        hits = torch.zeros(2 * self.levels + 1, dtype=torch.float64, device=device)
        counts = torch.zeros_like(hits)
        for i in range(-(-n_samples // EVAL_BATCH)):  # host syncs: outside training
            b = min(EVAL_BATCH, n_samples - i * EVAL_BATCH)
            batch = self.held_out_batch(i, b, device, masked=False)
            hierarchy, kept = ragged_hierarchy(batch, self.lengths, *self.budgets)
            outputs = model(hierarchy)
            hits += torch.stack([o.reconstruction_hit.sum() for o in outputs]
                                + [o.eos_hit.sum() for o in outputs] + [kept.sum()]).double()
            counts += torch.stack([o.real.sum() for o in outputs] * 2
                                  + [torch.tensor(b, device=device)]).double()
        model.train(was_training)
        values = (hits / counts.clamp(min=1)).tolist()
        metrics = {"accuracy": values[0]}
        metrics.update({f"accuracy/{l}": values[l] for l in range(1, self.levels)})
        metrics.update({f"eos_accuracy/{l}": values[self.levels + l]
                        for l in range(self.levels)})
        metrics["kept"] = values[-1]
        return metrics

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, n_samples: int, device: torch.device
                        ) -> Dict[str, float]:
        """The loss over ``n_samples`` held-out sentences, masked as in training (masks
        drawn from :data:`VALIDATION_SEED`)."""
        was_training = model.training
        model.eval()
        total = count = 0.0
        for i in range(-(-n_samples // EVAL_BATCH)):  # host syncs: outside training
            b = min(EVAL_BATCH, n_samples - i * EVAL_BATCH)
            out = self.loss(model, self.held_out_batch(i, b, device, masked=True))
            total += float(out.total)
            count += float(out.count)
        model.train(was_training)
        return {"val_loss": total / max(count, 1.0)}

