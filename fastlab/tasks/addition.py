"""n-digit addition with every number written least significant digit first: ``a+b=s``.

Reversed, the sum's k-th digit follows the carry it depends on, and it sits at a fixed
distance from the k-th digits of a and b, which a small causal model finds quickly. Problems
whose (a, b) hash into the held-out bucket are never drawn for training; evaluation draws
only from that bucket and decodes greedily, so exact match measures generalisation.

Curriculum (``curriculum_start``): operands start with fewer digits and gain one each time
the held-out exact match reaches ``curriculum_threshold``. The sequence layout stays that
of ``n_digits`` (short operands have leading zeros), so batch shapes never change.
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from fastlab.models.gpt import GPT, GPTConfig
from fastlab.tasks.base import Task, step_generator

PLUS, EQUALS = 10, 11
VOCAB = 12
IGNORE = -100
#: one problem in HELD_OUT_MOD lands in the held-out bucket
HELD_OUT_MOD = 20


def _held_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * 7919 + b * 104729) % HELD_OUT_MOD == 0


def _digits(x: torch.Tensor, n: int) -> torch.Tensor:
    """The n digits of each x, least significant first."""
    powers = 10 ** torch.arange(n, device=x.device)
    return (x[:, None] // powers) % 10


class Addition(Task):
    name = "addition"
    metric = "exact_match"

    def __init__(self, n_digits: int = 3, curriculum_start: int = 0,
                 curriculum_threshold: float = 0.9):
        if n_digits < 1 or n_digits > 18:
            raise ValueError(f"n_digits must be in [1, 18], got {n_digits}")
        if not 0 <= curriculum_start <= n_digits:
            raise ValueError(f"curriculum_start must be in [0, n_digits={n_digits}], "
                             f"got {curriculum_start}")
        self.n = n_digits
        #: digits of the operands drawn now: n_digits unless a curriculum is running
        self.level = curriculum_start or n_digits
        self.threshold = curriculum_threshold
        self.prompt_len = 2 * n_digits + 2
        self.answer_len = n_digits + 1
        self.seq_len = self.prompt_len + self.answer_len - 1

    def build_model(self, model_cfg) -> nn.Module:
        return GPT(GPTConfig(vocab_size=VOCAB, block_size=self.seq_len, n_layer=model_cfg.n_layer,
                             n_head=model_cfg.n_head, d_model=model_cfg.d_model,
                             dropout=model_cfg.dropout))

    def _draw(self, n: int, g: torch.Generator, device, held_out: bool):
        high = 10 ** self.level
        a = torch.randint(0, high, (4 * n,), generator=g, device=device)
        b = torch.randint(0, high, (4 * n,), generator=g, device=device)
        keep = _held_out(a, b) == held_out
        if held_out:  # 1 in HELD_OUT_MOD kept: draw until n, bounded by construction
            while int(keep.sum()) < n:
                a2 = torch.randint(0, high, (64 * n,), generator=g, device=device)
                b2 = torch.randint(0, high, (64 * n,), generator=g, device=device)
                a, b = torch.cat([a, a2]), torch.cat([b, b2])
                keep = _held_out(a, b)
        idx = keep.nonzero().squeeze(1)[:n]
        return a[idx], b[idx]

    def encode(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n, dev = self.n, a.device
        col = lambda v: torch.full((a.shape[0], 1), v, device=dev, dtype=torch.long)  # noqa: E731
        return torch.cat([_digits(a, n), col(PLUS), _digits(b, n), col(EQUALS),
                          _digits(a + b, n + 1)], dim=1)

    def batch(self, step: int, batch_size: int, device: torch.device, seed: int = 0
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        g = step_generator(seed, step, torch.device("cpu"))
        a, b = self._draw(batch_size, g, "cpu", held_out=False)
        seq = self.encode(a, b)
        inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
        targets[:, : self.prompt_len - 1] = IGNORE
        return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, n_samples: int, device: torch.device) -> Dict[str, float]:
        g = step_generator(12345, 0, torch.device("cpu"))
        a, b = self._draw(n_samples, g, "cpu", held_out=True)
        seq = self.encode(a, b).to(device)
        prompt, answer = seq[:, : self.prompt_len], seq[:, self.prompt_len:]
        was_training = model.training
        model.eval()
        out = model.greedy_complete(prompt, self.answer_len)
        model.train(was_training)
        correct_digits = (out == answer).float()
        return {"exact_match": correct_digits.all(1).float().mean().item(),
                "digit_accuracy": correct_digits.mean().item(), "digits": float(self.level)}

    def curriculum(self, metrics: Dict[str, float]) -> Optional[str]:
        if self.level < self.n and metrics.get("exact_match", 0.0) >= self.threshold:
            self.level += 1
            return f"curriculum: operands now have {self.level} of {self.n} digits"
        return None

    @property
    def curriculum_done(self) -> bool:
        return self.level == self.n

    def state_dict(self) -> Dict[str, Any]:
        return {"level": self.level}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.level = int(state.get("level", self.n))
