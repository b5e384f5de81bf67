"""Masked language modelling (BERT pre-training from scratch) on bytes.

Text. ``task.data`` names a plain-text file (one document) or a JSONL file (one document
per line, its text under ``task.field``); without it the text is
:func:`fastlab.data.english_corpus` (``task.corpus_paragraphs`` paragraphs of seed
``task.corpus_seed``, each paragraph a document), so a run needs no download. Text becomes
bytes through :class:`fastlab.data.ByteTokenizer`; its pad, mask, and its bos and eos (as
[CLS] and [SEP]) are the special tokens.

Rows. Each row of ``task.seq_len`` tokens is ``[CLS] s_i s_i+1 ... [SEP] [PAD] ...``: the
sentences (those of :func:`fastlab.data.text_offsets`, surrounding whitespace dropped)
from a start sentence ``i`` on, as many whole ones as fit in ``seq_len - 2`` bytes, never
past the end of the document, then padding. A first sentence longer than that is cut to
fit. So most rows end in padding, and the model reads them with ``kv_lens`` (the real
tokens of each row, [CLS] and [SEP] included), the key lengths of
:func:`fastlab.ops.attention`.

Held out. With two documents or more the last ``task.held_out`` of the documents (at
least one) are held out; a single document holds out the last ``task.held_out`` of its
sentences. Training rows never start in the held-out part and never run into it;
evaluation and ``validation_loss`` draw only from it.

Masking (BERT's recipe, every step anew on the device). In each row ``mask_prob * n`` of
the row's ``n`` text tokens are selected, rounded down or up at random so that the
expected count is exactly ``mask_prob * n`` ([CLS], [SEP] and padding are never
selected); of the selected, ``mask_replace`` become [MASK], ``mask_random`` a random
byte, the rest stay as they were. The loss and the accuracy are
over the selected tokens only. A row carries its selected positions (B, P), P =
``ceil(mask_prob * (seq_len - 2))``, and their labels, -100 in the slots of a row with
fewer: the model's prediction head runs at those P positions alone, through the fused
linear cross-entropy, and no logits exist for the other positions.

Data are a pure function of (seed, step): the start sentences, the selection (the
positions with the smallest counter-based keys) and the replacements are hashes of
(seed, stream, step, index) computed on the device (:func:`fastlab.tasks.base.counter_bits`),
with no host sync, so a resumed or captured step sees exactly its data. Start sentences are
drawn with replacement, uniformly (a modulo of 32-bit hashes: bias below n / 2**32).
"""
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from fastlab.data import ByteTokenizer, english_corpus, read_documents, text_offsets
from fastlab.data.text import WHITESPACE
from fastlab.ops.cross_entropy import cross_entropy
from fastlab.models.encoder import IGNORE, EncoderConfig, EncoderForMaskedLM
from fastlab.tasks.base import ConfigError, LossOutput, Task, TaskConfig, check_option, counter_bits

TOKENIZER = ByteTokenizer()
#: probabilities are applied as integer thresholds on 16-bit draws
UNIT = 1 << 16
#: the seed of the evaluation draws, apart from every training seed's streams
EVAL_SEED = 0x5EED
#: rows per evaluation forward pass
EVAL_BATCH = 256
MAX_SEQ_LEN = 4096
#: random streams of the batch (see counter_bits)
STREAM_ROWS, STREAM_SELECT, STREAM_REPLACE, STREAM_RANDOM, STREAM_ROUND = 0, 1, 2, 3, 5


@dataclass
class MLMConfig(TaskConfig):
    name: str = "mlm"
    #: a .txt file (one document) or .jsonl file (a document per line) to train on; empty:
    #: the built-in English-like grammar corpus
    data: str = ""
    #: the JSONL field holding each document's text
    field: str = "text"
    #: paragraphs (documents) of the grammar corpus when task.data is empty, >= 2
    corpus_paragraphs: int = 4000
    #: the seed of the grammar corpus
    corpus_seed: int = 0
    #: tokens per row: [CLS], whole sentences of bytes, [SEP], padding; in [8, 4096]
    seq_len: int = 128
    #: the share of documents (or of the sentences of a single document) held out for
    #: evaluation, in (0, 0.5]
    held_out: float = 0.05
    #: the share of each row's text tokens selected for prediction, in (0, 1)
    mask_prob: float = 0.15
    #: of the selected tokens, the share replaced by [MASK], in [0, 1]
    mask_replace: float = 0.8
    #: of the selected tokens, the share replaced by a random byte; the rest (1 -
    #: mask_replace - mask_random) stay unchanged
    mask_random: float = 0.1

    def __post_init__(self):
        check_option(not self.data or os.path.isfile(self.data),
                     f"task.data: no such file {self.data!r}")
        check_option(bool(self.field), "task.field must not be empty")
        check_option(self.corpus_paragraphs >= 2,
                     f"task.corpus_paragraphs must be >= 2, got {self.corpus_paragraphs}")
        check_option(8 <= self.seq_len <= MAX_SEQ_LEN,
                     f"task.seq_len must be in [8, {MAX_SEQ_LEN}], got {self.seq_len}")
        check_option(0 < self.held_out <= 0.5,
                     f"task.held_out must be in (0, 0.5], got {self.held_out}")
        check_option(0 < self.mask_prob < 1,
                     f"task.mask_prob must be in (0, 1), got {self.mask_prob}")
        check_option(0 <= self.mask_replace <= 1,
                     f"task.mask_replace must be in [0, 1], got {self.mask_replace}")
        check_option(0 <= self.mask_random <= 1 - self.mask_replace,
                     f"task.mask_random must be in [0, 1 - task.mask_replace = "
                     f"{1 - self.mask_replace:g}], got {self.mask_random}")


# --- text to rows ------------------------------------------------------------------------
def _documents(cfg: MLMConfig) -> List[str]:
    if not cfg.data:
        return english_corpus(cfg.corpus_paragraphs, seed=cfg.corpus_seed).split("\n\n")
    try:
        return read_documents(cfg.data, field=cfg.field)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"task.data (with task.field={cfg.field!r}): {exc}") from None


def _sentences(text: str) -> Tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of each sentence of ``text`` without the whitespace
    around it; whitespace-only sentences are dropped."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    solid = np.flatnonzero(~np.isin(data, np.frombuffer(WHITESPACE, np.uint8)))
    if solid.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    words, sentences = text_offsets(text)
    raw_start, raw_end = words[sentences[:-1]], words[sentences[1:]]
    first = np.searchsorted(solid, raw_start)
    last = np.searchsorted(solid, raw_end) - 1
    keep = (first < solid.size) & (first <= last)
    return solid[first[keep]], solid[last[keep]] + 1


class Corpus:
    """The tokens of every document and, for each split, the start of each row's first
    sentence and the row's text length (see the module docstring)."""

    def __init__(self, documents: List[str], seq_len: int, held_out: float, source: str):
        width = seq_len - 2
        chunks, starts, ends, docs = [], [], [], []
        offset = 0
        for d, text in enumerate(documents):
            s, e = _sentences(text)
            chunks.append(TOKENIZER.encode(text).astype(np.uint8))
            starts.append(s + offset)
            ends.append(e + offset)
            docs.append(np.full(s.size, d))
            offset += chunks[-1].size
        start, end, doc = (np.concatenate(a) for a in (starts, ends, docs))
        n_docs = len(np.unique(doc))
        if n_docs >= 2:
            first_held_doc = np.unique(doc)[-max(1, round(held_out * n_docs))]
            cut = int(np.searchsorted(doc, first_held_doc))
        else:
            cut = start.size - max(1, round(held_out * start.size))
        if not 1 <= cut < start.size:
            raise ConfigError(f"task.data: {source} has {start.size} sentence(s): too few for "
                              f"a training and a held-out part")
        # rows never cross a document's end or the split: a segment each
        segment = doc * 2 + (np.arange(start.size) >= cut)
        segment_last = np.searchsorted(segment, segment, side="right") - 1
        fits = np.minimum(np.searchsorted(end, start + width, side="right") - 1, segment_last)
        index = np.arange(start.size)
        length = np.where(fits >= index, end[np.maximum(fits, index)] - start, width)
        self.tokens = torch.from_numpy(np.concatenate(chunks))
        self.starts = {"train": torch.from_numpy(start[:cut]),
                       "held_out": torch.from_numpy(start[cut:])}
        self.lengths = {"train": torch.from_numpy(length[:cut]),
                        "held_out": torch.from_numpy(length[cut:])}

    def rows(self, split: str) -> int:
        return int(self.starts[split].shape[0])


class MaskedLM(Task):
    name = "mlm"
    Config = MLMConfig
    metric = "masked_accuracy"

    def __init__(self, cfg: MLMConfig):
        super().__init__(cfg)
        self.seq_len = cfg.seq_len
        self.vocab_size = TOKENIZER.vocab_size
        self.corpus = Corpus(_documents(cfg), cfg.seq_len, cfg.held_out,
                             cfg.data or "the grammar corpus")
        #: the 16-bit thresholds of the selection and the replacements
        self.select_q = round(cfg.mask_prob * UNIT)
        self.replace_q = round(cfg.mask_replace * UNIT)
        self.random_q = round((cfg.mask_replace + cfg.mask_random) * UNIT)
        #: prediction slots per row: enough for the most a full row selects
        self.n_predict = max(1, math.ceil(self.select_q * (cfg.seq_len - 2) / UNIT))
        self._on_device: Dict[torch.device, Tuple[torch.Tensor, ...]] = {}

    def build_model(self, model_cfg) -> nn.Module:
        if model_cfg.arch == "thinker":
            raise ConfigError("task mlm trains a BERT-style encoder: model.arch=thinker does "
                              "not apply (leave model.arch at its default)")
        cfg = EncoderConfig.from_model_config(model_cfg, vocab_size=self.vocab_size,
                                              max_len=self.seq_len)
        return EncoderForMaskedLM(cfg, mask_fraction=self.cfg.mask_prob)

    # --- data ------------------------------------------------------------------------
    @torch.compiler.disable  # copied once per device, outside any compiled graph
    def _on(self, device: torch.device) -> Tuple[torch.Tensor, ...]:
        """(tokens, train starts, train lengths, held-out starts, held-out lengths) on
        ``device``, copied at the first eager call (a captured step copies nothing)."""
        device = torch.device(device)
        if device not in self._on_device:
            c = self.corpus
            self._on_device[device] = tuple(t.to(device) for t in (
                c.tokens, c.starts["train"], c.lengths["train"], c.starts["held_out"],
                c.lengths["held_out"]))
        return self._on_device[device]

    def rows(self, split: str, step: torch.Tensor, batch_size: int, device: torch.device,
             seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` unmasked rows (B, seq_len) of ``split`` and their real lengths
        ``kv_lens`` (B,), [CLS] and [SEP] included."""
        tokens, *tables = self._on(device)
        starts, lengths = tables[:2] if split == "train" else tables[2:]
        pick = counter_bits(seed, STREAM_ROWS, step,
                            torch.arange(batch_size, device=device)) % starts.shape[0]
        n = lengths[pick]
        col = torch.arange(self.seq_len - 2, device=device)
        text = tokens[(starts[pick, None] + col).clamp(max=tokens.shape[0] - 1)].long()
        text = torch.where(col < n[:, None], text, TOKENIZER.PAD)
        row = torch.cat([torch.full_like(text[:, :1], TOKENIZER.CLS), text,
                         torch.full_like(text[:, :1], TOKENIZER.PAD)], 1)
        row = row.scatter(1, (n + 1)[:, None], TOKENIZER.SEP)
        return row, n + 2

    def mask(self, row: torch.Tensor, kv_lens: torch.Tensor, step: torch.Tensor, seed: int
             ) -> Dict[str, torch.Tensor]:
        """BERT's masking of ``row`` (B, S): the corrupted ``inputs``, the selected
        ``positions`` (B, P) and their ``labels`` (IGNORE in unused slots)."""
        b, s = row.shape
        device = row.device
        index = torch.arange(b * s, device=device).view(b, s)
        pos = index % s
        text = (pos >= 1) & (pos <= kv_lens[:, None] - 2)  # not [CLS], [SEP] or padding
        keys = counter_bits(seed, STREAM_SELECT, step, index) + torch.where(text, 0, 1 << 32)
        positions = keys.sort(dim=1, stable=True).indices[:, :self.n_predict]
        # floor(n * q + u) for u uniform in [0, 1): mask_prob * n in expectation
        jitter = counter_bits(seed, STREAM_ROUND, step, index[:, 0]) % UNIT
        n_pick = ((kv_lens - 2) * self.select_q + jitter) >> 16
        used = torch.arange(self.n_predict, device=device) < n_pick[:, None]
        original = row.gather(1, positions)
        slot = index[:, :self.n_predict]
        draw = counter_bits(seed, STREAM_REPLACE, step, slot) % UNIT
        random_byte = counter_bits(seed, STREAM_RANDOM, step, slot) % 256
        new = torch.where(draw < self.replace_q, TOKENIZER.MASK,
                          torch.where(draw < self.random_q, random_byte, original))
        inputs = row.scatter(1, positions, torch.where(used, new, original))
        return {"inputs": inputs, "positions": positions,
                "labels": torch.where(used, original, IGNORE)}

    def draw(self, split: str, step: torch.Tensor, batch_size: int, device: torch.device,
             seed: int) -> Dict[str, torch.Tensor]:
        """Masked rows of ``split``: inputs, kv_lens, positions, labels, and the clean rows
        (``clean``)."""
        step = torch.as_tensor(step, device=device)
        row, kv_lens = self.rows(split, step, batch_size, device, seed)
        return {**self.mask(row, kv_lens, step, seed), "kv_lens": kv_lens, "clean": row}

    def batch(self, step: torch.Tensor, batch_size: int, device: torch.device,
              seed: int = 0) -> Dict[str, torch.Tensor]:
        out = self.draw("train", step, batch_size, device, seed)
        del out["clean"]
        return out

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> LossOutput:
        labels = batch["labels"]
        total = model(batch["inputs"], batch["kv_lens"], batch["positions"], labels)
        return LossOutput(total, (labels != IGNORE).sum())

    # --- evaluation --------------------------------------------------------------------
    def held_out_batches(self, n_samples: int, device: torch.device):
        """Masked held-out rows, ``n_samples`` in batches of at most EVAL_BATCH; the same
        rows and masks at every evaluation."""
        for i in range(-(-n_samples // EVAL_BATCH)):
            size = min(EVAL_BATCH, n_samples - i * EVAL_BATCH)
            yield self.draw("held_out", torch.tensor(i, device=device), size, device, EVAL_SEED)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, n_samples: int, device: torch.device) -> Dict[str, float]:
        """Masked-token accuracy and loss (per masked token) on held-out rows."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for batch in self.held_out_batches(n_samples, device):
            labels = batch["labels"]
            logits = model(batch["inputs"], batch["kv_lens"], batch["positions"])
            used = labels != IGNORE
            loss = cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                 reduction="sum")
            hits = ((logits.argmax(-1) == labels) & used).sum()
            sums += torch.stack([hits.double(), loss.double(), used.sum().double()])
        model.train(was_training)
        hits, loss, count = sums.tolist()  # host sync: evaluation runs outside the step
        return {"masked_accuracy": hits / count, "masked_loss": loss / count}

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, n_samples: int, device: torch.device
                        ) -> Dict[str, float]:
        """The training loss over held-out rows, never trained on."""
        return {"val_loss": self.evaluate(model, n_samples, device)["masked_loss"]}
