"""Sequence transduction: copy, flip (reverse) or roll (cyclic shift) a row of symbols.

A row is ``length`` symbols from ``vocab`` followed by padding up to ``task.length``; each
row draws its own length. The target is the row itself (``copy``), reversed (``flip``), or
rolled by ``task.shift`` as ``torch.roll`` does (``roll``: output i is input
(i - shift) mod length). Targets past a row's length are ignored (-100), so batch shapes
never change.

Layouts, by the model the task builds (``model.arch``):

- ``gpt``: one causal sequence ``x_0 .. x_{N-1} SEP y_0 .. y_{N-1}`` with N = ``task.length``
  and PAD past each row's length; the loss covers the output positions only. Output i
  always sits at position N + 1 + i, so evaluation decodes N tokens greedily after SEP and
  compares the first ``length`` of them.
- ``thinker``: the padded input row (B, N) in, logits of the N outputs (B, N, V) out, all
  at once.

Data: symbols and lengths are drawn on the device from a counter-based hash of
(seed, step, row, column), so any step's batch can be recomputed, also inside a CUDA graph.
A length is the inverse CDF of the length distribution (a device tensor) at a uniform draw.

Held out: a row whose hash over (length, live symbols) lands in the bucket (one in
``HELD_OUT_MOD``) is never trained on; a training row that lands there is redrawn, up to
``REDRAWS`` times, and one still held out (a chance of 20**-6) has its targets ignored.
Evaluation draws from a seed of its own and keeps only rows in the bucket, so its exact
match measures generalisation to unseen rows. Lengths with fewer than ``MIN_POOL``
distinct rows (vocab ** length; length <= 3 with 16 symbols) have no bucket: those few
rows are all trained on, and evaluation at such a length measures fit.

Curricula (``task.curriculum``), each a length distribution over [1, N]:

- ``none``: every row has length N.
- ``uniform``: lengths uniform over [``min_length``, N].
- ``dynamic``: uniform over [``min_length``, N] at first; then every evaluation measures
  the held-out exact match a_l at each length l and the rows draw length l with weight
  ``curriculum_floor + 1 - a_l``: the mass moves to the lengths not solved yet, and a
  solved length keeps a little so it is not forgotten. Every output position is trained
  from the first step: a level that admits longer rows one at a time would train each
  new position from scratch, and its loss would jump at each change. The level is the
  longest L such that every length from ``min_length`` to L reaches
  ``curriculum_threshold``; the curriculum is done at level N.

The distribution is a device tensor updated in place, so a captured step follows it; the
per-length accuracies, the level and the distribution go into checkpoints.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from fastlab.models.generate import generate
from fastlab.models.gpt import GPT, GPTConfig
from fastlab.models.thinker import Thinker, ThinkerConfig
from fastlab.ops.cross_entropy import cross_entropy
from fastlab.tasks.base import (LossOutput, Task, TaskConfig, _mix32, check_option,
                                 counter_uniform)

IGNORE = -100
MODES = ("copy", "flip", "roll")
CURRICULA = ("none", "uniform", "dynamic")
MAX_LENGTH = 1024
MAX_VOCAB = 1 << 16
#: one row in HELD_OUT_MOD lands in the held-out bucket
HELD_OUT_MOD = 20
#: draws per training row before giving up on finding one outside the bucket
REDRAWS = 6
#: distinct rows a length needs for a bucket: then about 1000 distinct rows are held out
MIN_POOL = 20_000
#: the length distribution is a CDF in steps of 2**-16, the resolution of counter_uniform
CDF_ONE = 1 << 16
#: the seed of the evaluation draws, apart from every training seed's streams
EVAL_SEED = 0x5EED
#: candidate rows per evaluation attempt, per row asked for: about two found per row
EVAL_DRAWS = 2 * HELD_OUT_MOD
EVAL_ATTEMPTS = 8


@dataclass
class CopyConfig(TaskConfig):
    name: str = "copy"
    #: copy, flip (reverse) or roll (cyclic shift by task.shift, as torch.roll)
    mode: str = "copy"
    #: roll: output i is input (i - shift) mod the row's length
    shift: int = 1
    #: symbols; the vocabulary adds a separator and a padding token
    vocab: int = 16
    #: the longest row (the sequence layout); evaluation's accuracy is at this length
    length: int = 20
    #: the shortest row the uniform and dynamic curricula draw
    min_length: int = 1
    #: length distribution: none (always task.length), uniform over [min_length, length],
    #: or dynamic (weights that move to the lengths held-out accuracy finds unsolved)
    curriculum: str = "none"
    #: dynamic: held-out exact match at which a length counts as solved
    curriculum_threshold: float = 0.9
    #: dynamic: weight of a solved length; an unsolved one has 1 + this
    curriculum_floor: float = 0.1

    def __post_init__(self):
        check_option(self.mode in MODES, f"task.mode must be one of {MODES}, got {self.mode!r}")
        check_option(2 <= self.vocab <= MAX_VOCAB,
                     f"task.vocab must be in [2, {MAX_VOCAB}], got {self.vocab}")
        check_option(1 <= self.length <= MAX_LENGTH,
                     f"task.length must be in [1, {MAX_LENGTH}], got {self.length}")
        check_option(1 <= self.min_length <= self.length,
                     f"task.min_length must be in [1, task.length={self.length}], got "
                     f"{self.min_length}")
        check_option(self.curriculum in CURRICULA,
                     f"task.curriculum must be one of {CURRICULA}, got {self.curriculum!r}")
        check_option(0 < self.curriculum_threshold <= 1,
                     "task.curriculum_threshold must be in (0, 1], got "
                     f"{self.curriculum_threshold}")
        check_option(0 < self.curriculum_floor <= 1,
                     f"task.curriculum_floor must be in (0, 1], got {self.curriculum_floor}")


class Copy(Task):
    name = "copy"
    Config = CopyConfig
    metric = "accuracy"

    def __init__(self, cfg: CopyConfig):
        super().__init__(cfg)
        self.n, self.vocab = cfg.length, cfg.vocab
        self.sep, self.pad = self.vocab, self.vocab + 1
        self.vocab_size = self.vocab + 2
        #: the layout of the batches: that of the model built last (gpt until then)
        self.arch = "gpt"
        self.seq_len = 2 * self.n
        self.dynamic = cfg.curriculum == "dynamic"
        #: lengths the curriculum draws; dynamic: the held-out exact match at each of them
        self.lengths = list(range(self.n if cfg.curriculum == "none" else cfg.min_length,
                                  self.n + 1))
        self.length_accuracy = [0.0] * len(self.lengths)
        #: dynamic: every length up to this one is solved (min_length - 1: none yet)
        self.level = cfg.min_length - 1 if self.dynamic else self.n
        self.cdf = self._cdf(self.length_accuracy)
        #: the per-length accuracies of the last evaluation, for the curriculum after it
        self._measured: Optional[List[float]] = None
        # per-column weights of the held-out hash, then the length's
        self._weights = [_mix32(j + 1) for j in range(self.n + 1)]
        self._bucketed = [self.vocab ** length >= MIN_POOL for length in range(1, self.n + 1)]
        self._on_device: Dict[torch.device, Tuple[torch.Tensor, ...]] = {}

    def build_model(self, model_cfg) -> nn.Module:
        self.arch = model_cfg.arch
        if self.arch == "thinker":
            return Thinker(ThinkerConfig.from_model_config(
                model_cfg, vocab_size=self.vocab_size, input_len=self.n, output_len=self.n))
        return GPT(GPTConfig.from_model_config(model_cfg, vocab_size=self.vocab_size,
                                               block_size=self.seq_len))

    # --- the length distribution ---------------------------------------------------------
    def _cdf(self, accuracy: List[float]) -> torch.Tensor:
        """The CDF over lengths 1..N in units of 2**-16 (int64, the last = 1) for the
        per-length ``accuracy`` of :attr:`lengths` (dynamic; the others are uniform)."""
        weights = [self.cfg.curriculum_floor + 1.0 - a if self.dynamic else 1.0
                   for a in accuracy]
        probs = [0.0] * self.n
        for length, w in zip(self.lengths, weights):
            probs[length - 1] = w / sum(weights)
        total, cdf = 0.0, []
        for p in probs:
            total += p
            cdf.append(min(round(total * CDF_ONE), CDF_ONE))
        cdf[-1] = CDF_ONE
        return torch.tensor(cdf, dtype=torch.int64)

    def distribution(self) -> torch.Tensor:
        """P(length = l) for l in 1..N that the batches draw from now (the quantised CDF's)."""
        return torch.diff(self.cdf, prepend=self.cdf.new_zeros(1)).double() / CDF_ONE

    # --- data ------------------------------------------------------------------------
    @torch.compiler.disable  # created once per device, outside any compiled graph
    def _on(self, device: torch.device) -> Tuple[torch.Tensor, ...]:
        """(length CDF, held-out hash weights, lengths with a bucket) as device tensors made
        at the first eager call (a captured step can copy nothing from the host); the CDF
        is updated in place."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = (self.cdf.to(device),
                                       torch.tensor(self._weights, device=device),
                                       torch.tensor(self._bucketed, device=device))
        return self._on_device[device]

    def _live(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.arange(self.n, device=lengths.device) < lengths[..., None]

    def _held_out(self, symbols: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rows (symbols (..., N), lengths (...)) in the held-out bucket."""
        _, weights, bucketed = self._on(symbols.device)
        key = (symbols * self._live(lengths) * weights[:-1]).sum(-1) + lengths * weights[-1]
        return (_mix32(key & 0xFFFFFFFF) % HELD_OUT_MOD == 0) & bucketed[lengths - 1]

    def encode(self, symbols: torch.Tensor, lengths: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows (symbols (B, N), lengths (B,)) -> (inputs with PAD past each length,
        targets with IGNORE past it), both (B, N)."""
        pos = torch.arange(self.n, device=symbols.device).expand_as(symbols)
        n = lengths[:, None]
        if self.cfg.mode == "copy":
            source = pos
        elif self.cfg.mode == "flip":
            source = (n - 1 - pos).clamp(min=0)
        else:
            source = (pos - self.cfg.shift) % n
        live = self._live(lengths)
        return (torch.where(live, symbols, self.pad),
                torch.where(live, symbols.gather(1, source), IGNORE))

    def _layout(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.arch == "thinker":
            return {"inputs": x, "targets": y}
        outputs = torch.where(y == IGNORE, self.pad, y)
        inputs = torch.cat([x, torch.full_like(x[:, :1], self.sep), outputs[:, :-1]], dim=1)
        return {"inputs": inputs, "targets": torch.cat([torch.full_like(x, IGNORE), y], dim=1)}

    def batch(self, step: torch.Tensor, batch_size: int, device: torch.device,
              seed: int = 0) -> Dict[str, torch.Tensor]:
        step = torch.as_tensor(step, device=device)
        cdf = self._on(device)[0]
        symbols = counter_uniform(seed, 0, step, (REDRAWS, batch_size, self.n), self.vocab,
                                  device)
        draw = counter_uniform(seed, 1, step, (REDRAWS, batch_size), CDF_ONE, device)
        lengths = torch.searchsorted(cdf, draw, right=True) + 1
        held = self._held_out(symbols, lengths)  # (REDRAWS, B)
        first = (~held).to(torch.int8).argmax(0)  # the first draw outside the bucket
        symbols = symbols.gather(0, first.view(1, -1, 1).expand(1, -1, self.n))[0]
        lengths = lengths.gather(0, first.view(1, -1))[0]
        x, y = self.encode(symbols, lengths)
        return self._layout(x, torch.where(held.all(0)[:, None], IGNORE, y))

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> LossOutput:
        out = model(batch["inputs"])
        logits = out if self.arch == "thinker" else out[0]
        targets = batch["targets"]
        total = cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        return LossOutput(total, (targets != IGNORE).sum())

    # --- evaluation --------------------------------------------------------------------
    def held_out_rows(self, length: int, n_samples: int, device: torch.device) -> torch.Tensor:
        """``n_samples`` rows of symbols (n_samples, N) of ``length`` from the held-out bucket
        (any rows at a length without one); fewer distinct rows than asked are repeated."""
        lengths = torch.full((EVAL_DRAWS * n_samples,), length, device=device)
        found, drawn = [], 0
        for attempt in range(EVAL_ATTEMPTS):  # host syncs: evaluation runs outside the step
            step = torch.tensor(length * EVAL_ATTEMPTS + attempt, device=device)
            symbols = counter_uniform(EVAL_SEED, 2, step, (lengths.shape[0], self.n),
                                      self.vocab, device)
            if not self._bucketed[length - 1]:
                return symbols[:n_samples]
            found.append(symbols[self._held_out(symbols, lengths)])
            drawn += int(found[-1].shape[0])
            if drawn >= n_samples:
                break
        rows = torch.cat(found)
        repeat = -(-n_samples // rows.shape[0])
        return rows.repeat(repeat, 1)[:n_samples]

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Greedy outputs (B, N) for padded input rows ``x`` (B, N)."""
        if self.arch == "thinker":
            return model(x).argmax(-1)
        # greedy through per-layer KV caches: each new token attends over the cache instead
        # of recomputing the whole prefix
        return generate(model, torch.cat([x, torch.full_like(x[:, :1], self.sep)], 1), self.n)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, n_samples: int, device: torch.device) -> Dict[str, float]:
        """Exact match and token accuracy on ``n_samples`` held-out rows of length N;
        dynamic: also on rows at every shorter length it draws (``n_samples`` in all), the
        accuracies its next update reads."""
        shorter = self.lengths[:-1] if self.dynamic else []
        counts = [n_samples] + [-(-n_samples // len(self.lengths))] * len(shorter)
        at = [self.n] + shorter
        symbols = torch.cat([self.held_out_rows(length, count, device)
                             for length, count in zip(at, counts)])
        lengths = torch.repeat_interleave(torch.tensor(at, device=device),
                                          torch.tensor(counts, device=device))
        x, y = self.encode(symbols, lengths)
        was_training = model.training
        model.eval()
        predicted = self.predict(model, x)
        model.train(was_training)
        live = y != IGNORE
        hit = (predicted == y) & live
        exact = (hit == live).all(1).float().split(counts)
        full = slice(0, n_samples)
        values = torch.stack([hit[full].sum() / live[full].sum(), *[e.mean() for e in exact]])
        token_accuracy, *accuracy = values.tolist()
        mean_length = float((self.distribution() * torch.arange(1, self.n + 1)).sum())
        metrics = {"accuracy": accuracy[0], "token_accuracy": token_accuracy,
                   "mean_length": mean_length}
        if self.dynamic:
            self._measured = accuracy[1:] + accuracy[:1]  # in the order of self.lengths
            metrics["level"] = float(self._level_of(self._measured))
        return metrics

    # --- curriculum ----------------------------------------------------------------------
    def _level_of(self, accuracy: List[float]) -> int:
        level = self.cfg.min_length - 1
        for length, a in zip(self.lengths, accuracy):
            if a < self.cfg.curriculum_threshold:
                break
            level = length
        return level

    def _set(self, accuracy: List[float], level: int, cdf: torch.Tensor) -> None:
        self.length_accuracy, self.level, self.cdf = list(accuracy), level, cdf
        for tensors in self._on_device.values():
            tensors[0].copy_(cdf)

    def update(self, accuracy: List[float]) -> Optional[str]:
        """Take the held-out exact match at each of :attr:`lengths`: reweigh the lengths
        and set the level; a description when the level changed."""
        if len(accuracy) != len(self.lengths):
            raise ValueError(f"expected an accuracy for each of the {len(self.lengths)} "
                             f"lengths, got {len(accuracy)}")
        before, level = self.level, self._level_of(accuracy)
        self._set(accuracy, level, self._cdf(accuracy))
        if level == before:
            return None
        if level < self.cfg.min_length:
            return f"curriculum: length {self.cfg.min_length} is unsolved again"
        return f"curriculum: lengths {self.cfg.min_length}-{level} of {self.n} solved"

    def curriculum(self, metrics: Dict[str, float]) -> Optional[str]:
        """Dynamic: :meth:`update` with the per-length accuracies the evaluation just run
        measured (kept by the task: one metric per length would flood the log line)."""
        if not self.dynamic or self._measured is None:
            return None
        accuracy, self._measured = self._measured, None
        return self.update(accuracy)

    @property
    def curriculum_done(self) -> bool:
        return self.level == self.n

    def state_dict(self) -> Dict[str, Any]:
        return {"level": self.level, "length_accuracy": self.length_accuracy,
                "length_cdf": self.cdf.tolist()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        accuracy = [float(a) for a in state["length_accuracy"]]
        cdf = torch.tensor(state["length_cdf"], dtype=torch.int64)
        if len(accuracy) != len(self.lengths) or cdf.shape != (self.n,):
            raise ValueError(f"the checkpoint's copy task draws {len(accuracy)} lengths of "
                             f"{cdf.shape[0]}; this one draws {len(self.lengths)} of "
                             f"task.length={self.n}")
        self._set(accuracy, int(state["level"]), cdf)
