"""Distillation of embeddings: a student encoder matches a frozen teacher's token embeddings.

Data are those of :mod:`fastlab.tasks.mlm` (the same text, rows, held-out part and
masking options): the teacher reads each row as it is, the student reads it with BERT's
masking applied, so at the selected ("masked") positions it has to infer what the teacher
sees. Every real token of a row (padding excluded, [CLS] and [SEP] included) is one
embedding row.

Teacher (``task.teacher``), frozen and in eval mode, called as ``teacher(tokens, kv_lens)``
-> (B, S, D_t):

- empty (the default): a BERT-style encoder of ``task.teacher_*`` trained with the mlm
  task on the same training text for ``task.teacher_steps`` steps, seeded apart from the
  run, when the run first needs it (its first step). Its weights go into the task state of
  every checkpoint of the run directory, so a resumed run reads them back instead of
  training it again. A teacher of a real experiment is better trained by its own mlm run
  and named by path.
- a path: an mlm run directory (its best.pt, else its newest good checkpoint) or one of its
  checkpoint files, read through :func:`fastlab.train.checkpoint.load`; its encoder's
  final hidden states are the embeddings.
- ``package.module:name``: a ``torch.nn.Module`` of one's own, or a callable returning one,
  with the interface above.

Student: the encoder of the ``model.*`` options (:class:`fastlab.models.encoder.Encoder`)
and a linear projection to the teacher's width D_t; "the student's embeddings" are the
projected ones.

Loss (``task.loss``): ``mse`` (squared error per element, summed over real tokens),
``cos`` (1 - cosine per real token), or ``softcca``, the Soft CCA loss
(:class:`fastlab.metrics.SoftCCALoss`: the distance of the standardised views plus
``task.softcca_lam`` times the decorrelation SDL whose running covariances forget by
``task.softcca_alpha``) over ``task.softcca_rows`` real tokens drawn per row. With
``train.grad_accum`` every micro-batch is one SDL update; the other losses are sums over
tokens and do not depend on it.

Logged every log step (the means over the window of training steps): ``mse``, ``nmse``
(MSE over the teacher's variance, 1 - R^2) and ``cosine`` over every real token, the same
over the tokens the student saw unmasked (``mse/mask``, ``nmse/mask``, ``cosine/mask``)
and ``mask_mean``, the share of real tokens that were unmasked. Evaluation reports the
same metrics on held-out rows, the CCA of the held-out rows (``cca/held_out``, the mean of
all D_t canonical correlations), and the CCA over a sliding window of the last 5 D_t and
10 D_t training steps (:class:`fastlab.metrics.WindowedCCA`): ``cca/5x`` and ``cca/10x``,
the mean of all D_t correlations, and ``cca_top{k}/5x``, ``cca_top{k}/10x``, the mean of
the largest ``task.cca_k``. ``task.cca_rows`` token rows of each step enter the window.

The window lives in device buffers written by the training step itself (slot = step mod
the window, rows by their index in the global batch), so it is graph-safe, does not depend
on the accumulation or the ranks' slices, and goes into checkpoints. Its memory:
10 D_t x cca_rows x D_t x 8 bytes (both views in float32): 21 MB at D_t = 128 and 32 rows.
"""
import dataclasses
import importlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from fastlab.metrics import (SoftCCALoss, WindowedCCA, cca, cosine, distill_metrics, mse,
                             normalized_mse)
from fastlab.models.encoder import IGNORE, Encoder, EncoderConfig, EncoderForMaskedLM
from fastlab.optim import AdamW
from fastlab.optim.schedules import lr_multiplier
from fastlab.tasks.base import ConfigError, LossOutput, check_option, counter_bits
from fastlab.tasks.mlm import EVAL_SEED, TOKENIZER, UNIT, MaskedLM, MLMConfig

LOSSES = ("mse", "cos", "softcca")
#: the CCA windows, in training steps per teacher dimension
WINDOW_FACTORS = (5, 10)
#: the seed of the teacher trained at set-up, apart from every run's
TEACHER_SEED = 0x7EAC
STREAM_SAMPLE = 4


@dataclass
class DistillConfig(MLMConfig):
    name: str = "distill"
    #: the frozen teacher: empty (train one of task.teacher_* at set-up), an mlm run
    #: directory or checkpoint file, or package.module:name of a torch module
    teacher: str = ""
    #: set-up teacher: its layers, >= 1
    teacher_layers: int = 4
    #: set-up teacher: its attention heads, >= 1, dividing task.teacher_d_model
    teacher_heads: int = 4
    #: set-up teacher: its width (the embeddings' dimension D_t)
    teacher_d_model: int = 128
    #: set-up teacher: mlm training steps (warm-up then linear decay), >= 1
    teacher_steps: int = 300
    #: set-up teacher: rows per step, >= 1
    teacher_batch_size: int = 32
    #: set-up teacher: peak learning rate, > 0
    teacher_lr: float = 1e-3
    #: mse, cos (1 - cosine) or softcca (Soft CCA: distance + lam x SDL)
    loss: str = "mse"
    #: softcca: forgetting factor of SDL's running covariances, in [0, 1]
    softcca_alpha: float = 0.9
    #: softcca: weight of the decorrelation terms, >= 0
    softcca_lam: float = 1.0
    #: softcca: real tokens drawn per row for the loss, >= 1
    softcca_rows: int = 16
    #: the CCA reported with the mean of all correlations also averages the top k, >= 1
    cca_k: int = 8
    #: token rows of each training step in the CCA window, >= 1
    cca_rows: int = 32

    def __post_init__(self):
        super().__post_init__()
        check_option(self.teacher_layers >= 1,
                     f"task.teacher_layers must be >= 1, got {self.teacher_layers}")
        check_option(self.teacher_heads >= 1 and self.teacher_d_model >= 1
                     and self.teacher_d_model % self.teacher_heads == 0,
                     f"task.teacher_d_model ({self.teacher_d_model}) must be a positive "
                     f"multiple of task.teacher_heads ({self.teacher_heads})")
        check_option(self.teacher_steps >= 1,
                     f"task.teacher_steps must be >= 1, got {self.teacher_steps}")
        check_option(self.teacher_batch_size >= 1,
                     f"task.teacher_batch_size must be >= 1, got {self.teacher_batch_size}")
        check_option(self.teacher_lr > 0, f"task.teacher_lr must be > 0, got {self.teacher_lr}")
        check_option(self.loss in LOSSES,
                     f"task.loss must be one of {LOSSES}, got {self.loss!r}")
        check_option(0 <= self.softcca_alpha <= 1,
                     f"task.softcca_alpha must be in [0, 1], got {self.softcca_alpha}")
        check_option(self.softcca_lam >= 0,
                     f"task.softcca_lam must be >= 0, got {self.softcca_lam}")
        check_option(self.softcca_rows >= 1,
                     f"task.softcca_rows must be >= 1, got {self.softcca_rows}")
        check_option(self.cca_k >= 1, f"task.cca_k must be >= 1, got {self.cca_k}")
        check_option(self.cca_rows >= 1, f"task.cca_rows must be >= 1, got {self.cca_rows}")


class Student(nn.Module):
    """An encoder, a projection to the teacher's width and, for the softcca loss, the
    loss's running covariances (buffers, so checkpoints carry them)."""

    def __init__(self, cfg: EncoderConfig, teacher_dim: int, softcca: Optional[SoftCCALoss]):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.proj = nn.Linear(cfg.d_model, teacher_dim)
        self.softcca = softcca

    def forward(self, idx: torch.Tensor, kv_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.proj(self.encoder(idx, kv_lens))

    def flops_per_token(self, seq_len: int) -> float:
        return self.encoder.flops_per_token(seq_len) + 6 * self.proj.weight.numel()


# --- the teacher -------------------------------------------------------------------------
def _mlm_checkpoint(path: str) -> str:
    """The checkpoint file of ``task.teacher``: a file, or a run directory's best.pt or
    newest good checkpoint."""
    from fastlab.train import checkpoint

    if not os.path.isdir(path):
        return path
    best = os.path.join(path, "best.pt")
    if os.path.isfile(best):
        return best
    found, _, problems = checkpoint.load_latest(path)
    if found is None:
        raise ConfigError(f"task.teacher={path}: no usable checkpoint"
                          + (f" ({'; '.join(problems)})" if problems else ""))
    return found


def _load_mlm_teacher(path: str) -> nn.Module:
    """The encoder of an mlm run's checkpoint."""
    from fastlab.train import checkpoint

    file = _mlm_checkpoint(path)
    try:
        state = checkpoint.load(file)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(f"task.teacher: {exc}") from None
    config = state.get("config", {})
    task = config.get("task", {})
    if task.get("name") != "mlm" or "model" not in config:
        raise ConfigError(f"task.teacher={file}: not a checkpoint of an mlm run (its task is "
                          f"{task.get('name')!r})")
    model_cfg = config["model"]
    cfg = EncoderConfig(vocab_size=TOKENIZER.vocab_size, max_len=task["seq_len"],
                        n_layer=model_cfg["n_layer"], n_head=model_cfg["n_head"],
                        d_model=model_cfg["d_model"], d_hid=model_cfg["d_hid"],
                        dropout=model_cfg["dropout"])
    model = EncoderForMaskedLM(cfg)
    model.load_state_dict(state["model"])
    return model.encoder


def _import_teacher(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task.teacher={spec!r}: cannot import it ({exc})") from None
    teacher = found if isinstance(found, nn.Module) else found()
    if not isinstance(teacher, nn.Module):
        raise ConfigError(f"task.teacher={spec!r} gave a {type(teacher).__name__}, not a "
                          f"torch.nn.Module")
    return teacher


def _freeze(teacher: nn.Module) -> nn.Module:
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class Distill(MaskedLM):
    name = "distill"
    Config = DistillConfig
    metric = "cosine"

    def __init__(self, cfg: DistillConfig, teacher: Optional[nn.Module] = None):
        super().__init__(cfg)
        self.teacher: Optional[nn.Module] = None
        self._teacher_device: Optional[torch.device] = None
        #: the set-up teacher's config (None for a teacher given by path or module)
        self.teacher_cfg: Optional[EncoderConfig] = None
        if teacher is not None:
            self.teacher = _freeze(teacher)
        elif not cfg.teacher:
            self.teacher_cfg = EncoderConfig(
                vocab_size=self.vocab_size, max_len=self.seq_len, n_layer=cfg.teacher_layers,
                n_head=cfg.teacher_heads, d_model=cfg.teacher_d_model, dropout=0.1)
        elif ":" in cfg.teacher and not os.path.exists(cfg.teacher):
            self.teacher = _freeze(_import_teacher(cfg.teacher))
        elif os.path.exists(cfg.teacher):
            self.teacher = _freeze(_load_mlm_teacher(cfg.teacher))
        else:
            raise ConfigError(f"task.teacher: no such run directory or checkpoint "
                              f"{cfg.teacher!r} (nor package.module:name)")
        self.teacher_dim = self._teacher_dim()
        check_option(cfg.cca_k <= self.teacher_dim,
                     f"task.cca_k must be at most the teacher's dimension {self.teacher_dim}, "
                     f"got {cfg.cca_k}")
        #: the CCA window's steps: the longest of WINDOW_FACTORS
        self.window = max(WINDOW_FACTORS) * self.teacher_dim
        self._rings: Dict[torch.device, Dict[str, torch.Tensor]] = {}
        self._saved_ring: Optional[Dict[str, torch.Tensor]] = None

    def _teacher_dim(self) -> int:
        if self.teacher_cfg is not None:
            return self.teacher_cfg.d_model
        row, kv_lens = self.rows("train", torch.tensor(0), 2, torch.device("cpu"), 0)
        device = next(iter(self.teacher.parameters()), torch.empty(0)).device
        with torch.no_grad():
            out = self.teacher(row.to(device), kv_lens.to(device))
        if out.dim() != 3 or out.shape[:2] != row.shape:
            raise ConfigError(f"task.teacher: teacher(tokens (B, S), kv_lens (B,)) must give "
                              f"(B, S, D) embeddings, got shape {tuple(out.shape)}")
        return int(out.shape[-1])

    def build_model(self, model_cfg) -> nn.Module:
        if model_cfg.arch == "thinker":
            raise ConfigError("task distill trains a BERT-style encoder: model.arch=thinker "
                              "does not apply (leave model.arch at its default)")
        cfg = self.cfg
        softcca = (SoftCCALoss(self.teacher_dim, alpha=cfg.softcca_alpha, lam=cfg.softcca_lam)
                   if cfg.loss == "softcca" else None)
        return Student(EncoderConfig.from_model_config(model_cfg, vocab_size=self.vocab_size,
                                                       max_len=self.seq_len),
                       self.teacher_dim, softcca)

    @torch.compiler.disable  # set-up work, once, outside any compiled graph
    def teacher_on(self, device: torch.device) -> nn.Module:
        """The frozen teacher on ``device``; the set-up teacher is trained on first use."""
        device = torch.device(device)
        if self.teacher is None:
            self.teacher = _freeze(self._train_teacher(device))
        if self._teacher_device != device:
            self.teacher.to(device)
            self._teacher_device = device
        return self.teacher

    def _train_teacher(self, device: torch.device) -> nn.Module:
        """The set-up teacher: mlm on the training rows, AdamW with warm-up (a tenth of the
        steps) and linear decay, fp32, seeded apart from the run's random state."""
        cfg, t0 = self.cfg, time.perf_counter()
        print(f"distill: training the teacher ({cfg.teacher_steps} mlm steps, "
              f"{self.teacher_cfg.n_layer} layers of width {self.teacher_cfg.d_model})",
              file=sys.stderr)
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            torch.manual_seed(TEACHER_SEED)
            model = EncoderForMaskedLM(self.teacher_cfg, cfg.mask_prob).to(device).train()
            params = list(model.parameters())
            optimizer = AdamW([{"params": [p for p in params if p.dim() >= 2]},
                               {"params": [p for p in params if p.dim() < 2],
                                "weight_decay": 0.0}],
                              lr=cfg.teacher_lr, betas=(0.9, 0.98), weight_decay=0.01,
                              max_grad_norm=1.0)
            schedule = lr_multiplier("linear", cfg.teacher_steps // 10, cfg.teacher_steps)
            for step in range(cfg.teacher_steps):
                for group in optimizer.param_groups:
                    group["lr"] = cfg.teacher_lr * schedule(step)
                b = self.draw("train", torch.tensor(step, device=device),
                              cfg.teacher_batch_size, device, TEACHER_SEED)
                count = (b["labels"] != IGNORE).sum().clamp(min=1)
                loss = model(b["inputs"], b["kv_lens"], b["positions"], b["labels"]) / count
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        print(f"distill: teacher trained in {time.perf_counter() - t0:.1f} s, last mlm loss "
              f"{float(loss.detach()):.3f}", file=sys.stderr)
        return model.encoder

    # --- data ------------------------------------------------------------------------
    def _distill_batch(self, masked_rows: Dict[str, torch.Tensor], step: torch.Tensor,
                       seed: int) -> Dict[str, torch.Tensor]:
        """The student's inputs, the teacher's (``clean``), ``kv_lens``, which positions
        were ``masked`` (B, S), ``sample`` (B, n): real positions drawn per row for Soft CCA
        and the CCA window, ``cca_index`` (B, m): the window row of the first m of them
        (``cca_rows`` for rows past the step's first ``cca_rows``), and the ``step``."""
        inputs, kv_lens = masked_rows["inputs"], masked_rows["kv_lens"]
        b, device = inputs.shape[0], inputs.device
        used = masked_rows["labels"] != IGNORE
        masked = torch.zeros_like(inputs, dtype=torch.bool).scatter(
            1, masked_rows["positions"], used)
        rows = self.cfg.cca_rows
        per_row = -(-rows // b)
        n_sample = max(per_row, self.cfg.softcca_rows if self.cfg.loss == "softcca" else 1)
        index = torch.arange(b * n_sample, device=device).view(b, n_sample)
        draw = counter_bits(seed, STREAM_SAMPLE, step, index) % UNIT
        sample = (draw * kv_lens[:, None]) >> 16  # uniform in [0, kv_len): real tokens
        cca_index = (index[:, :per_row] // n_sample * per_row
                     + torch.arange(per_row, device=device)).clamp(max=rows)
        return {"inputs": inputs, "clean": masked_rows["clean"], "kv_lens": kv_lens,
                "masked": masked, "sample": sample, "cca_index": cca_index,
                "step": step.expand(b)}

    def batch(self, step: torch.Tensor, batch_size: int, device: torch.device,
              seed: int = 0) -> Dict[str, torch.Tensor]:
        step = torch.as_tensor(step, device=device)
        return self._distill_batch(self.draw("train", step, batch_size, device, seed), step,
                                   seed)

    def held_out_batches(self, n_samples: int, device: torch.device):
        """Held-out rows, masked for the student, the same at every evaluation."""
        for i, rows in enumerate(super().held_out_batches(n_samples, device)):
            yield self._distill_batch(rows, torch.tensor(i, device=device), EVAL_SEED)

    # --- loss --------------------------------------------------------------------------
    def _embeddings(self, model: nn.Module, batch: Dict[str, torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student, teacher) embeddings (B, S, D_t) in float32 and the real tokens
        (B, S) bool."""
        teacher = self.teacher_on(batch["inputs"].device)
        with torch.no_grad():
            target = teacher(batch["clean"], batch["kv_lens"]).float()
        student = model(batch["inputs"], batch["kv_lens"]).float()
        real = torch.arange(student.shape[1], device=student.device) < batch["kv_lens"][:, None]
        return student, target, real

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> LossOutput:
        student, teacher, real = self._embeddings(model, batch)
        seen = real & ~batch["masked"]
        n_real, n_seen = real.sum(), seen.sum()
        sample = batch["sample"]
        picked = [x.gather(1, sample[..., None].expand(-1, -1, x.shape[-1]))
                  for x in (student, teacher)]
        parts: Dict[str, Any] = {}
        if self.cfg.loss == "softcca":
            views = [x[:, :self.cfg.softcca_rows] for x in picked]
            out = getattr(model, "module", model).softcca(*views)  # under DDP too
            # a fill, not a copy from the host: capturable in a CUDA graph
            n = student.new_full((), views[0].shape[0] * views[0].shape[1])
            total, count = out.loss * n, n
            parts["softcca/distance"] = (out.distance * n, n)
            parts["softcca/decorrelation"] = (out.decorrelation * n, n)
        elif self.cfg.loss == "cos":
            per_token = 1 - nn.functional.cosine_similarity(student, teacher, dim=-1)
            total, count = (per_token * real).sum(), n_real
        else:
            total, count = ((student - teacher).square().mean(-1) * real).sum(), n_real
        detached = student.detach()
        for suffix, mask, n in (("", real, n_real), ("/mask", seen, n_seen)):
            parts["mse" + suffix] = (mse(detached, teacher, mask) * n, n)
            parts["nmse" + suffix] = (normalized_mse(detached, teacher, mask) * n, n)
            parts["cosine" + suffix] = (cosine(detached, teacher, mask) * n, n)
        parts["mask_mean"] = (n_seen, n_real)
        if model.training:
            per_row = batch["cca_index"].shape[1]
            self._remember(picked[0][:, :per_row].detach(), picked[1][:, :per_row], batch)
        return LossOutput(total, count, parts)

    # --- the CCA window ------------------------------------------------------------------
    @torch.compiler.disable  # allocated once per device, outside any compiled graph
    def _ring(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """The window's buffers: rows (window, cca_rows + 1, D_t) of both views, their 0/1
        weights and the step each slot holds (-1: none). The last row of a slot takes the
        rows past a step's first ``cca_rows`` and is never counted."""
        device = torch.device(device)
        if device not in self._rings:
            shape = (self.window, self.cfg.cca_rows + 1, self.teacher_dim)
            ring = {"x": torch.zeros(shape, device=device), "y": torch.zeros(shape, device=device),
                    "weight": torch.zeros(shape[:2], device=device),
                    "step": torch.full((self.window,), -1, dtype=torch.int64, device=device)}
            if self._saved_ring is not None:
                for key, value in self._saved_ring.items():
                    ring[key].copy_(value)
            self._rings[device] = ring
        return self._rings[device]

    def _remember(self, student: torch.Tensor, teacher: torch.Tensor,
                  batch: Dict[str, torch.Tensor]) -> None:
        """Write this micro-batch's rows (B, m, D_t) of the step into the window: device
        ops only, the slot from the batch's step and the rows from its ``cca_index``."""
        ring = self._ring(student.device)
        index = batch["cca_index"].reshape(-1)
        slot = (batch["step"][0] % self.window).expand(index.shape[0])
        ring["x"].index_put_((slot, index), student.reshape(-1, self.teacher_dim))
        ring["y"].index_put_((slot, index), teacher.reshape(-1, self.teacher_dim))
        ring["weight"].index_put_((slot, index), (index < self.cfg.cca_rows).float())
        ring["step"].index_put_((slot[:1],), batch["step"][:1])

    def window_cca(self, device: torch.device) -> Dict[str, float]:
        """The CCA metrics of the training window (host syncs): for each of
        WINDOW_FACTORS, the steps of the last ``factor x D_t`` that are in the window."""
        ring = self._rings.get(torch.device(device)) or next(iter(self._rings.values()), None)
        if ring is None or not bool((ring["step"] >= 0).any()):
            return {}
        steps = ring["step"]
        last = int(steps.max())
        rows = self.cfg.cca_rows
        out: Dict[str, float] = {}
        for factor in WINDOW_FACTORS:
            in_window = (steps >= 0) & (steps > last - factor * self.teacher_dim)
            weight = ring["weight"] * in_window[:, None]
            for k, name in ((None, "cca"), (self.cfg.cca_k, f"cca_top{self.cfg.cca_k}")):
                window = WindowedCCA(self.teacher_dim, self.window, k)
                window.load_state_dict({"x": ring["x"][:, :rows], "y": ring["y"][:, :rows],
                                        "weight": weight[:, :rows], "next": 0,
                                        "filled": self.window})
                out[f"{name}/{factor}x"] = float(window.compute().mean())
            out[f"cca_steps/{factor}x"] = float(in_window.sum())
        return out

    # --- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, n_samples: int, device: torch.device) -> Dict[str, float]:
        """Every metric of the student against the teacher on held-out rows (all real
        tokens, and those unmasked), their CCA, and the training window's CCA."""
        was_training = model.training
        model.eval()
        students, teachers, seen = [], [], []
        for batch in self.held_out_batches(n_samples, device):
            student, teacher, real = self._embeddings(model, batch)
            students.append(student[real])  # host syncs: evaluation runs outside the step
            teachers.append(teacher[real])
            seen.append(~batch["masked"][real])
        model.train(was_training)
        student, teacher = torch.cat(students), torch.cat(teachers)
        metrics = {k: float(v) for k, v in
                   distill_metrics(student, teacher, torch.cat(seen)).items()}
        metrics["cca/held_out"] = float(cca(student, teacher).mean())
        return {**metrics, **self.window_cca(device)}

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, n_samples: int, device: torch.device
                        ) -> Dict[str, float]:
        """The training loss over held-out rows, never trained on."""
        was_training = model.training
        model.eval()
        total = count = 0.0
        for batch in self.held_out_batches(n_samples, device):
            out = self.loss(model, batch)
            total += float(out.total)
            count += float(out.count)
        model.train(was_training)
        return {"val_loss": total / max(count, 1.0)}

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The set-up teacher (so a resumed run never trains it again) and the window."""
        state: Dict[str, Any] = {}
        if self.teacher_cfg is not None and self.teacher is not None:
            state["teacher"] = {"config": dataclasses.asdict(self.teacher_cfg),
                                "model": self.teacher.state_dict()}
        if self._rings:
            state["cca_window"] = {k: v.cpu() for k, v in next(iter(self._rings.values())).items()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved = state.get("teacher")
        if saved is not None and self.teacher_cfg is not None:
            if EncoderConfig(**saved["config"]) != self.teacher_cfg:
                raise ConfigError(f"the checkpoint's set-up teacher is {saved['config']}, the "
                                  f"task.teacher_* options give {self.teacher_cfg}")
            teacher = Encoder(self.teacher_cfg)
            teacher.load_state_dict(saved["model"])
            self.teacher, self._teacher_device = _freeze(teacher), None
        window = state.get("cca_window")
        if window is not None:
            expected = (self.window, self.cfg.cca_rows + 1, self.teacher_dim)
            if tuple(window["x"].shape) != expected:
                raise ConfigError(f"the checkpoint's CCA window is {tuple(window['x'].shape)}, "
                                  f"task.cca_rows and the teacher give {expected}")
            self._saved_ring = window
            for ring in self._rings.values():
                for key, value in window.items():
                    ring[key].copy_(value)
