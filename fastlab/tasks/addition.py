"""n-digit addition in any base, every number written least significant digit first.

``a+b=s`` with a, b of ``n_digits`` digits in ``base``: reversed, the sum's k-th digit
follows the carry it depends on and sits at a fixed distance from the k-th digits of a and
b, which a small causal model finds quickly. The sum has ``n_digits + 1`` digits (the last
is the final carry).

Targets (``task.target``): ``sum``, every digit of the sum; ``digit``, only the sum's digit
``task.digit`` (0 the least significant, negative counting from the most significant as
in Python indexing, -1 the final carry) as a classification.

Layouts, by the model the task builds (``model.arch``):

- ``gpt``, sum: one causal sequence ``a + b = s``; the loss covers the answer digits and
  evaluation decodes them greedily after the prompt.
- ``gpt``, digit: the prompt ``a + b =`` alone; the logits of its last position classify
  the digit (targets (B, 1)).
- ``thinker``: the prompt ``a + b =`` in (B, 2n + 2), the logits of every answer digit out
  at once (B, n + 1, V), or of the one digit (B, 1, V); the loss covers every output and
  evaluation takes the most likely token of each.

Data: every digit of every operand is drawn on the device from a counter-based hash of
(seed, step, row, column), so there is no finite pool to repeat and any step's batch can be
recomputed, also inside a CUDA graph. A pair (a, b) whose hash falls in the held-out bucket
(one in ``HELD_OUT_MOD``) is never trained on: a drawn pair that lands there is redrawn,
up to ``REDRAWS`` times, and a row still held out after that (a chance of 20**-6) has its
targets ignored. Evaluation draws only from that bucket and decodes greedily, so exact
match measures generalisation (for the digit target, exact match is the accuracy of the
one digit).

Curriculum (``curriculum_start``): operands start with fewer digits and gain one each time
the held-out exact match reaches ``curriculum_threshold``. The sequence layout stays that
of ``n_digits`` (short operands have leading zeros), so batch shapes never change; the
level lives in a device tensor the batch reads, so a captured step follows it.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from fastlab.models.gpt import GPT, GPTConfig
from fastlab.models.thinker import Thinker, ThinkerConfig
from fastlab.ops.cross_entropy import cross_entropy
from fastlab.tasks.base import (ConfigError, LossOutput, Task, TaskConfig, _mix32,
                                 check_option, counter_uniform)

IGNORE = -100
#: one pair in HELD_OUT_MOD lands in the held-out bucket
HELD_OUT_MOD = 20
#: draws per training row before giving up on finding a pair outside the bucket
REDRAWS = 6
#: the seed of the evaluation draws, apart from every training seed's streams
EVAL_SEED = 0x5EED
MAX_DIGITS = 64
TARGETS = ("sum", "digit")


@dataclass
class AdditionConfig(TaskConfig):
    name: str = "addition"
    #: digits of each operand
    n_digits: int = 3
    #: the base of every number (2 to 36); the vocabulary is its digits, "+" and "="
    base: int = 10
    #: curriculum: start with operands of this many digits (0: none) and add one digit
    #: each time the held-out exact match reaches curriculum_threshold
    curriculum_start: int = 0
    #: the held-out exact match, in (0, 1], at which the curriculum adds a digit
    curriculum_threshold: float = 0.9
    #: sum: every digit of the sum; digit: only the sum's digit task.digit, classified
    target: str = "sum"
    #: the digit of the sum for task.target=digit: 0 the least significant, negative
    #: counting from the most significant (-1: the final carry), as Python indexes
    digit: int = 0

    def __post_init__(self):
        check_option(1 <= self.n_digits <= MAX_DIGITS,
                     f"task.n_digits must be in [1, {MAX_DIGITS}], got {self.n_digits}")
        check_option(2 <= self.base <= 36, f"task.base must be in [2, 36], got {self.base}")
        check_option(0 <= self.curriculum_start <= self.n_digits,
                     f"task.curriculum_start must be in [0, task.n_digits={self.n_digits}], "
                     f"got {self.curriculum_start}")
        check_option(0 < self.curriculum_threshold <= 1,
                     "task.curriculum_threshold must be in (0, 1], got "
                     f"{self.curriculum_threshold}")
        check_option(self.target in TARGETS,
                     f"task.target must be one of {TARGETS}, got {self.target!r}")
        n_sum = self.n_digits + 1
        check_option(-n_sum <= self.digit < n_sum,
                     f"task.digit must be in [{-n_sum}, {n_sum - 1}] (the sum of "
                     f"task.n_digits={self.n_digits} digits has {n_sum}), got {self.digit}")
        check_option(self.target == "digit" or self.digit == 0,
                     f"task.digit={self.digit} needs task.target=digit, got task.target="
                     f"{self.target!r}")


class Addition(Task):
    name = "addition"
    Config = AdditionConfig
    metric = "exact_match"

    def __init__(self, cfg: AdditionConfig):
        super().__init__(cfg)
        self.n, self.base = cfg.n_digits, cfg.base
        self.plus, self.equals = self.base, self.base + 1
        self.vocab_size = self.base + 2
        #: digits of the operands drawn now: n_digits unless a curriculum is running
        self.level = cfg.curriculum_start or cfg.n_digits
        self.prompt_len = 2 * self.n + 2
        self.answer_len = self.n + 1
        self.digit_target = cfg.target == "digit"
        #: the position of task.digit among the answer's digits (least significant first)
        self.digit = cfg.digit % self.answer_len
        #: the outputs a model predicts per problem: every answer digit, or the one digit
        self.output_len = 1 if self.digit_target else self.answer_len
        #: set by build_model: the batch layout follows the model
        self.arch = "gpt"
        self.seq_len = self._seq_len()
        # per-column weights of the held-out hash: operand a's columns, then b's
        self._weights = [_mix32(j + 1) for j in range(2 * self.n)]
        self._level_on: Dict[torch.device, torch.Tensor] = {}
        self._weights_on: Dict[torch.device, torch.Tensor] = {}

    @property
    def _prompt_only(self) -> bool:
        """The model predicts its outputs from the prompt alone (the thinker, and the GPT
        for the digit target) instead of continuing the sequence ``a + b = s``."""
        return self.arch == "thinker" or self.digit_target

    def _seq_len(self) -> int:
        """Tokens per problem: the thinker's input and outputs, or the GPT's sequence."""
        if self.arch == "thinker":
            return self.prompt_len + self.output_len
        return self.prompt_len if self.digit_target else self.prompt_len + self.answer_len - 1

    def build_model(self, model_cfg) -> nn.Module:
        self.arch = model_cfg.arch
        self.seq_len = self._seq_len()
        if self.arch == "thinker":
            return Thinker(ThinkerConfig.from_model_config(
                model_cfg, vocab_size=self.vocab_size, input_len=self.prompt_len,
                output_len=self.output_len))
        return GPT(GPTConfig.from_model_config(model_cfg, vocab_size=self.vocab_size,
                                               block_size=self.seq_len))

    # --- data ------------------------------------------------------------------------
    @torch.compiler.disable  # created once per device, outside any compiled graph
    def _on(self, device: torch.device):
        """(curriculum level, held-out hash weights) as device tensors made at the first
        eager call (a captured step can copy nothing from the host); the level is updated
        in place."""
        device = torch.device(device)
        if device not in self._level_on:
            self._level_on[device] = torch.tensor(self.level, device=device)
            self._weights_on[device] = torch.tensor(self._weights, device=device)
        return self._level_on[device], self._weights_on[device]

    def _draw(self, seed: int, stream: int, step: torch.Tensor, shape, device) -> torch.Tensor:
        """Operand digits (*shape, 2, n), zero past the current level."""
        digits = counter_uniform(seed, stream, step, (*shape, 2, self.n), self.base, device)
        live = torch.arange(self.n, device=device) < self._on(device)[0]
        return digits * live

    def _held_out(self, digits: torch.Tensor) -> torch.Tensor:
        weights = self._on(digits.device)[1]
        key = (digits.flatten(-2) * weights).sum(-1) & 0xFFFFFFFF
        return _mix32(key) % HELD_OUT_MOD == 0

    def encode(self, digits: torch.Tensor) -> torch.Tensor:
        """(B, 2, n) operand digits -> (B, 3n + 3) tokens ``a + b = s``, digits reversed."""
        a, b = digits[:, 0], digits[:, 1]
        carry = torch.zeros_like(a[:, 0])
        total = []
        for j in range(self.n):
            s = a[:, j] + b[:, j] + carry
            total.append(s % self.base)
            carry = s // self.base
        col = lambda v: torch.full_like(a[:, :1], v)  # noqa: E731
        return torch.cat([a, col(self.plus), b, col(self.equals), *[t[:, None] for t in total],
                          carry[:, None]], dim=1)

    # --- text, for python -m fastlab.sample: numbers as written, most significant first --
    _SYMBOLS = "0123456789abcdefghijklmnopqrstuvwxyz"

    def _text_form(self) -> None:
        if self._prompt_only:
            raise ConfigError("sampling continues the sequence a + b = s: it needs "
                              "task.target=sum and model.arch=gpt")

    def encode_text(self, text: str) -> torch.Tensor:
        """``"12+34="`` (digits of task.base, at most task.n_digits each) -> prompt ids."""
        self._text_form()
        a, plus, rest = text.strip().lower().partition("+")
        b, equals, tail = rest.partition("=")
        digits = self._SYMBOLS[:self.base]
        ok = plus and equals and not tail and a and b and all(
            len(x) <= self.n and all(c in digits for c in x) for x in (a, b))
        if not ok:
            raise ConfigError(f"prompt {text!r}: expected A+B= with at most {self.n} digits "
                              f"of base {self.base} ({digits}) in each number")
        rev = lambda x: [digits.index(c) for c in reversed(x.rjust(self.n, "0"))]  # noqa: E731
        return torch.tensor(rev(a) + [self.plus] + rev(b) + [self.equals])

    def decode_text(self, ids: torch.Tensor) -> str:
        """Prompt ids -> ``"12+34="``; answer ids (least significant first) -> ``"46"``."""
        ids = [int(i) for i in ids]
        number = lambda xs: "".join(  # noqa: E731
            self._SYMBOLS[x] if x < self.base else "?" for x in reversed(xs)).lstrip("0") or "0"
        if len(ids) == self.prompt_len:
            return f"{number(ids[:self.n])}+{number(ids[self.n + 1:2 * self.n + 1])}="
        return number(ids)

    def example_prompts(self, n: int, device: torch.device):
        self._text_form()
        seq = self.encode(self.held_out_problems(n, device))
        answers = [self.decode_text(row) for row in seq[:, self.prompt_len:].cpu()]
        return seq[:, :self.prompt_len], answers

    def batch(self, step: torch.Tensor, batch_size: int, device: torch.device,
              seed: int = 0) -> Dict[str, torch.Tensor]:
        step = torch.as_tensor(step, device=device)
        draws = self._draw(seed, 0, step, (REDRAWS, batch_size), device)
        held = self._held_out(draws)  # (REDRAWS, B)
        first = (~held).to(torch.int8).argmax(0)  # the first draw outside the bucket
        pick = draws.gather(0, first.view(1, -1, 1, 1).expand(1, -1, 2, self.n))[0]
        seq = self.encode(pick)
        if self._prompt_only:
            inputs, targets = seq[:, : self.prompt_len], self._outputs(seq)
        else:
            inputs, targets = seq[:, :-1], seq[:, 1:].clone()
            targets[:, : self.prompt_len - 1] = IGNORE
        targets = torch.where(held.all(0)[:, None], IGNORE, targets)
        return {"inputs": inputs, "targets": targets}

    def _outputs(self, seq: torch.Tensor) -> torch.Tensor:
        """What a model predicts from the prompt of ``seq``: (B, output_len) digits."""
        answer = seq[:, self.prompt_len:]
        return answer[:, self.digit:self.digit + 1] if self.digit_target else answer

    def _logits(self, model: nn.Module, prompt: torch.Tensor) -> torch.Tensor:
        """(B, output_len, V) logits of the outputs, from the prompt alone (the thinker, or
        the GPT's last prompt position for the digit target)."""
        if self.arch == "thinker":
            return model(prompt)
        last = torch.full_like(prompt[:, 0], self.prompt_len - 1)
        return model(prompt, logits_at=last)[0]

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> LossOutput:
        if self._prompt_only:
            logits = self._logits(model, batch["inputs"])
        else:
            logits, _ = model(batch["inputs"])
        targets = batch["targets"]
        total = cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        return LossOutput(total, (targets != IGNORE).sum())

    # --- evaluation --------------------------------------------------------------------
    def held_out_problems(self, n_samples: int, device: torch.device) -> torch.Tensor:
        """``n_samples`` operand digit pairs (n_samples, 2, n) from the held-out bucket at
        the current level; fewer distinct pairs than asked for are repeated."""
        found, drawn = [], 0
        for attempt in range(16):  # host syncs: evaluation runs outside the training step
            step = torch.tensor(attempt, device=device)
            draws = self._draw(EVAL_SEED, 1, step, (64 * n_samples,), device)
            found.append(draws[self._held_out(draws)])
            drawn += int(found[-1].shape[0])
            if drawn >= n_samples:
                break
        pairs = torch.cat(found)
        if pairs.shape[0] == 0:
            raise ValueError(f"no held-out problem found at {self.level} digit(s) in base "
                             f"{self.base}: too few pairs exist for a held-out set")
        repeat = -(-n_samples // pairs.shape[0])
        return pairs.repeat(repeat, 1, 1)[:n_samples]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, n_samples: int, device: torch.device) -> Dict[str, float]:
        seq = self.encode(self.held_out_problems(n_samples, device))
        prompt, answer = seq[:, : self.prompt_len], self._outputs(seq)
        was_training = model.training
        model.eval()
        if self._prompt_only:
            out = self._logits(model, prompt).argmax(-1)
        else:
            out = model.greedy_complete(prompt, self.answer_len)
        model.train(was_training)
        correct = (out == answer).float()
        exact, digit = torch.stack([correct.all(1).float().mean(), correct.mean()]).tolist()
        if self.digit_target:
            return {"exact_match": exact, "accuracy": exact, "digits": float(self.level)}
        return {"exact_match": exact, "digit_accuracy": digit, "digits": float(self.level)}

    # --- curriculum ----------------------------------------------------------------------
    def _set_level(self, level: int) -> None:
        self.level = level
        for tensor in self._level_on.values():
            tensor.fill_(level)

    def curriculum(self, metrics: Dict[str, float]) -> Optional[str]:
        if self.level < self.n and metrics.get("exact_match", 0.0) >= self.cfg.curriculum_threshold:
            self._set_level(self.level + 1)
            return f"curriculum: operands now have {self.level} of {self.n} digits"
        return None

    @property
    def curriculum_done(self) -> bool:
        return self.level == self.n

    def state_dict(self) -> Dict[str, Any]:
        return {"level": self.level}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._set_level(int(state.get("level", self.n)))
