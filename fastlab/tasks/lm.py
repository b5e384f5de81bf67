"""Language modelling: next-token prediction over one token stream.

Data (``task.data``):

- ``synthetic`` (the default): a stream generated from ``task.corpus_seed`` with structure a
  model can learn (Zipf-distributed tokens; half of the odd positions are a fixed function
  of the token before them), in ``task.vocab_size`` tokens: for benches and tests.
- ``grammar``: the English-like corpus of :mod:`fastlab.data.grammar` (``task.corpus_paragraphs``
  paragraphs), byte-level tokens.
- a path: a token file (``.npy`` uint16/uint32, or raw ``.bin`` tokens of ``task.dtype``),
  or text (``.txt`` one document, ``.jsonl`` one document per line under
  ``task.field``) tokenised by :class:`fastlab.data.ByteTokenizer` with an end-of-text
  token after each document. Nothing is downloaded.

Split: the last ``task.val_fraction`` of the stream is held out; no training window
reaches into it. The stream is copied to the device once (2 or 4 bytes per token); a step's
batch is ``batch_size`` windows of ``task.seq_len + 1`` tokens whose starts are drawn from a
counter-based hash of (seed, step), so any step's batch can be recomputed, also inside a
CUDA graph, and nothing repeats with a period.

Metrics: ``val_loss`` (nats per token over held-out windows), ``perplexity`` and the
next-token ``accuracy`` (the metric ``best.pt`` keeps).
"""
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from fastlab.data.grammar import english_corpus
from fastlab.data.stream import TokenStream
from fastlab.data.text import ByteTokenizer, read_tokens
from fastlab.models.gpt import GPT, GPTConfig
from fastlab.ops.cross_entropy import cross_entropy
from fastlab.tasks.base import ConfigError, LossOutput, Task, TaskConfig, check_option, \
    counter_bits

IGNORE = -100
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl")
#: logits per forward in evaluation (64M values, 256 MB in fp32): rows per forward follow
EVAL_LOGITS = 1 << 26
#: the successor map of synthetic streams: t -> (7919 t + 13) mod V
_SUCCESSOR_MUL, _SUCCESSOR_ADD = 7919, 13


@dataclass
class LMConfig(TaskConfig):
    name: str = "lm"
    #: synthetic, grammar, or a path: .npy/.bin token file, .txt/.jsonl text (byte tokens)
    data: str = "synthetic"
    #: tokens per training sequence (the model's context), >= 1
    seq_len: int = 256
    #: vocabulary size; 0: the byte tokenizer's for text, for a token file its largest token
    #: + 1 rounded up to a multiple of 64, 50304 for synthetic data
    vocab_size: int = 0
    #: fraction of the stream held out for validation (its end), in (0, 0.5]
    val_fraction: float = 0.05
    #: raw .bin token files only: uint16 or uint32
    dtype: str = "uint16"
    #: JSONL files: the field holding each document's text
    field: str = "text"
    #: synthetic: tokens in the stream, >= 2 x (task.seq_len + 1)
    synthetic_tokens: int = 1 << 22
    #: grammar: paragraphs of the generated corpus, >= 1
    corpus_paragraphs: int = 2000
    #: the seed of generated data (synthetic, grammar); the same data for every train.seed
    corpus_seed: int = 0

    def __post_init__(self):
        check_option(bool(self.data), "task.data must be synthetic, grammar or a path")
        check_option(self.seq_len >= 1, f"task.seq_len must be >= 1, got {self.seq_len}")
        check_option(self.vocab_size >= 0, f"task.vocab_size must be >= 0, got {self.vocab_size}")
        check_option(0 < self.val_fraction <= 0.5,
                     f"task.val_fraction must be in (0, 0.5], got {self.val_fraction}")
        check_option(self.dtype in ("uint16", "uint32"),
                     f"task.dtype must be uint16 or uint32, got {self.dtype!r}")
        check_option(self.synthetic_tokens >= 2 * (self.seq_len + 1),
                     f"task.synthetic_tokens must be >= 2 x (task.seq_len + 1) = "
                     f"{2 * (self.seq_len + 1)}, got {self.synthetic_tokens}")
        check_option(self.corpus_paragraphs >= 1,
                     f"task.corpus_paragraphs must be >= 1, got {self.corpus_paragraphs}")
        check_option(self.corpus_seed >= 0,
                     f"task.corpus_seed must be >= 0, got {self.corpus_seed}")
        if self.data not in ("synthetic", "grammar"):
            check_option(os.path.isfile(self.data),
                         f"task.data: no such file {self.data!r} (or use synthetic, grammar)")
        if self.data == "synthetic" and self.vocab_size:
            check_option(self.vocab_size >= 2,
                         f"task.vocab_size must be >= 2 for synthetic data, got {self.vocab_size}")


def synthetic_stream(n_tokens: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """``n_tokens`` tokens (uint16 or uint32 by ``vocab_size``): Zipf(1.1) draws over the
    vocabulary, and at half of the odd positions, chosen at random, the successor
    ``(7919 t + 13) mod V`` of the even position's token ``t`` before it. A model that
    learns the successor lowers its loss well below the unigram entropy."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    p = ranks ** -1.1
    # a random permutation: frequent tokens are not just the small ids
    ids = rng.permutation(vocab_size)
    tokens = ids[rng.choice(vocab_size, size=n_tokens, p=p / p.sum())].astype(np.int64)
    odd = np.arange(1, n_tokens, 2)
    follow = odd[rng.random(odd.shape[0]) < 0.5]
    tokens[follow] = (tokens[follow - 1] * _SUCCESSOR_MUL + _SUCCESSOR_ADD) % vocab_size
    return tokens.astype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class LanguageModel(Task):
    name = "lm"
    Config = LMConfig
    metric = "accuracy"

    def __init__(self, cfg: LMConfig):
        super().__init__(cfg)
        self.tokenizer: Optional[ByteTokenizer] = None
        tokens, vocab = self._load(cfg)
        self.tokens = tokens
        self.vocab_size = vocab
        self.seq_len = cfg.seq_len
        window = cfg.seq_len + 1
        n_val = int(len(tokens) * cfg.val_fraction)
        #: training windows start in [0, n_train - window], held-out ones after n_train
        self.n_train = len(tokens) - n_val
        if self.n_train < window or n_val < window:
            raise ConfigError(
                f"task.data: {len(tokens)} tokens is too short for task.seq_len={cfg.seq_len} "
                f"with task.val_fraction={cfg.val_fraction}: the training and held-out parts "
                f"need at least {window} tokens each")
        self._on_device: Dict[torch.device, torch.Tensor] = {}
        self._mask = 0xFFFF if tokens.dtype.itemsize == 2 else 0xFFFFFFFF

    # --- data ---------------------------------------------------------------------------
    def _load(self, cfg: LMConfig) -> Tuple[np.ndarray, int]:
        if cfg.data == "synthetic":
            vocab = cfg.vocab_size or 50304
            return synthetic_stream(cfg.synthetic_tokens, vocab, cfg.corpus_seed), vocab
        if cfg.data == "grammar" or cfg.data.lower().endswith(TEXT_SUFFIXES):
            self.tokenizer = ByteTokenizer()
            if cfg.data == "grammar":
                text = english_corpus(cfg.corpus_paragraphs, seed=cfg.corpus_seed)
                tokens = self.tokenizer.encode(text)
            else:
                try:
                    tokens = read_tokens(cfg.data, field=cfg.field)
                except (OSError, ValueError, UnicodeDecodeError) as exc:
                    raise ConfigError(f"task.data: {exc}") from None
            vocab = cfg.vocab_size or self.tokenizer.vocab_size
            check_option(vocab >= self.tokenizer.vocab_size,
                         f"task.vocab_size={cfg.vocab_size} is below the byte tokenizer's "
                         f"{self.tokenizer.vocab_size}")
            return tokens, vocab
        try:
            stream = TokenStream(cfg.data, None if cfg.data.endswith(".npy") else cfg.dtype)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"task.data: {exc}") from None
        tokens = stream.tokens
        top = int(tokens.max()) if len(tokens) else 0  # one pass over the file at set-up
        vocab = cfg.vocab_size or _round_up(top + 1, 64)
        check_option(top < vocab, f"task.vocab_size={vocab} but {cfg.data} holds token {top}")
        return tokens, vocab

    @torch.compiler.disable  # created once per device, outside any compiled graph
    def _stream_on(self, device: torch.device) -> torch.Tensor:
        """The stream on ``device`` as signed integers of the file's width (same bits)."""
        device = torch.device(device)
        if device not in self._on_device:
            signed = np.int16 if self.tokens.dtype.itemsize == 2 else np.int32
            host = np.ascontiguousarray(self.tokens).view(signed)
            self._on_device[device] = torch.from_numpy(host).to(device)
        return self._on_device[device]

    def windows(self, starts: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Inputs and targets (B, seq_len) of the windows starting at ``starts`` (B,)."""
        stream = self._stream_on(starts.device)
        pos = starts[:, None] + torch.arange(self.seq_len + 1, device=starts.device)
        # two gathers rather than two slices of one: both come out contiguous
        return {"inputs": stream[pos[:, :-1]].to(torch.int64) & self._mask,
                "targets": stream[pos[:, 1:]].to(torch.int64) & self._mask}

    def batch(self, step: torch.Tensor, batch_size: int, device: torch.device,
              seed: int = 0) -> Dict[str, torch.Tensor]:
        step = torch.as_tensor(step, device=device)
        index = torch.arange(2 * batch_size, device=device, dtype=torch.int64)
        bits = counter_bits(seed, 0, step, index).view(2, batch_size)
        # 63 random bits: the modulo's bias is below 2**-30 for any stream length
        draw = ((bits[0] >> 1) << 32) | bits[1]
        starts = draw % (self.n_train - self.seq_len)
        return self.windows(starts)

    def held_out_starts(self, n_samples: int, device: torch.device) -> torch.Tensor:
        """``n_samples`` window starts spread evenly over the held-out part."""
        first, last = self.n_train, len(self.tokens) - self.seq_len - 1
        starts = torch.linspace(first, last, n_samples, dtype=torch.float64, device=device)
        return starts.round().to(torch.int64)

    # --- model and loss -------------------------------------------------------------------
    def build_model(self, model_cfg) -> nn.Module:
        if model_cfg.arch != "gpt":
            raise ConfigError(f"task lm trains a causal decoder: model.arch must be gpt, got "
                              f"{model_cfg.arch!r}")
        return GPT(GPTConfig.from_model_config(model_cfg, vocab_size=self.vocab_size,
                                               block_size=self.seq_len))

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> LossOutput:
        targets = batch["targets"]
        _, total = model(batch["inputs"], targets, reduction="sum")
        return LossOutput(total.float(), (targets != IGNORE).sum())

    # --- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, n_samples: int, device: torch.device
                 ) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        starts = self.held_out_starts(n_samples, device)
        loss = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        rows = max(1, EVAL_LOGITS // (self.seq_len * self.vocab_size))
        for chunk in starts.split(rows):
            batch = self.windows(chunk)
            logits, _ = model(batch["inputs"])
            loss += cross_entropy(logits, batch["targets"], reduction="sum").double()
            correct += (logits.argmax(-1) == batch["targets"]).sum()
        model.train(was_training)
        count = starts.numel() * self.seq_len
        val_loss = float(loss) / count
        return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 700.0)),
                "accuracy": int(correct) / count}

    def validation_loss(self, model: nn.Module, n_samples: int, device: torch.device
                        ) -> Dict[str, float]:
        """The loss over the held-out part (the base class's would draw training windows)."""
        return {"val_loss": self.evaluate(model, n_samples, device)["val_loss"]}

    # --- text ---------------------------------------------------------------------------
    def _text_form(self) -> ByteTokenizer:
        if self.tokenizer is None:
            raise ConfigError(f"task.data={self.cfg.data!r} holds token ids without a "
                              f"tokenizer: its prompts have no text form")
        return self.tokenizer

    def encode_text(self, text: str) -> torch.Tensor:
        return torch.from_numpy(self._text_form().encode(text).astype(np.int64))

    def decode_text(self, ids: torch.Tensor) -> str:
        return self._text_form().decode(ids.tolist())

    def example_prompts(self, n: int, device: torch.device):
        """The first half of ``n`` held-out windows, and the text that follows each."""
        tokenizer = self._text_form()
        batch = self.windows(self.held_out_starts(n, device))
        half = max(1, self.seq_len // 2)
        prompts = batch["inputs"][:, :half]
        rest = batch["targets"][:, half - 1:]
        return prompts, [tokenizer.decode(row.tolist()) for row in rest]
