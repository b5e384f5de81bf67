"""One optimizer step, whole: batch, forward and loss, backward, unscale and clip, the skip
flag and the update; eagerly or replayed from one CUDA graph.

The step lives on the device from end to end. The step counter, the learning rate (from
the schedule, times the guard's back-off), the loss scale, the spike window and the log
window's sums are device tensors updated by the step itself, so the host only launches it
(or replays its graph) and never waits on it between log steps.

- Precision: bf16 or fp16 autocast, or fp32. fp16 scales the loss by :class:`LossScaler`,
  a dynamic scale kept on the device.
- Loss and accumulation: the task returns summed losses and their counts. Each
  micro-batch backpropagates its sum times a constant (1 / nominal count, so gradients have
  the magnitude of a mean's); the step's true count, summed over micro-batches and ranks,
  is folded into the gradient scale the update divides by. So every token weighs the same
  whatever the accumulation, the world size or the padding of each micro-batch.
- The skip protocol: one 0-dim device flag, set when the loss is non-finite or the guard
  calls it a spike. The update takes it with the gradient scale: fastlab's AdamW through
  ``step(grad_scale=..., found_inf=...)``, which also skips on a non-finite gradient norm;
  torch's fused AdamW (FSDP2's sharded parameters) after this module unscales and clips,
  through torch's amp-scaling protocol, the one torch's own grad scaler uses.
- CUDA graphs: after ``WARMUP_STEPS`` eager steps (which compile, autotune and build the
  optimizer's state and tables) the step is captured once and replayed. The gradients are
  freed before the capture, so the captured backward allocates them in the graph's pool and
  writes them, as an eager step with freed gradients does; kept outside it they would cost
  a zero-fill and an accumulating add per parameter every step. The optimizer's tables
  learn their new addresses after the capture (``AdamW.finish_capture``). Evaluation, checkpoints and rollbacks run outside it and
  write in place, so replays go on without capturing again; ``invalidate()`` captures
  anew after a change the graph cannot see (a task's curriculum, say).
"""
import contextlib
import functools
from typing import Callable, Dict, List, Optional

import torch

from fastlab.optim import AdamW
from fastlab.optim.schedules import lr_multiplier
from fastlab.train import distributed

#: eager steps before capture: the first compiles, autotunes and creates the optimizer's
#: state, the next two confirm that nothing recompiles
WARMUP_STEPS = 3


def build_optimizer(model: torch.nn.Module, cfg, sharded: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay only on matrices (dim >= 2), never on norms and biases.

    fastlab's AdamW works on plain tensors, clipping inside its update (with clipping off it
    still computes the norm, for the log and the skip); FSDP2's sharded (DTensor) parameters
    use torch's fused AdamW, unscaled and clipped by the stepper.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if sharded:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 fused=True)
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 max_grad_norm=cfg.max_grad_norm or float("inf"))


class LossScaler:
    """Dynamic fp16 loss scale on the device: halved at every overflow, doubled after
    ``growth_interval`` steps without one."""

    def __init__(self, device: torch.device, init_scale: float = 2.0 ** 16,
                 growth_interval: int = 2000):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.good_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.growth_interval = growth_interval

    def update(self, overflow: torch.Tensor) -> None:
        self.good_steps.copy_(torch.where(overflow, 0, self.good_steps + 1))
        grow = self.good_steps >= self.growth_interval
        self.scale.copy_(torch.where(overflow, self.scale * 0.5,
                                     torch.where(grow, self.scale * 2.0, self.scale)))
        self.good_steps.masked_fill_(grow, 0)

    def state_dict(self) -> Dict[str, float]:
        return {"scale": float(self.scale), "good_steps": int(self.good_steps)}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.scale.fill_(state["scale"])
        self.good_steps.fill_(state["good_steps"])


class WindowSums:
    """Device sums over a log window: loss and its count, gradient norm, lr, and each
    sub-loss with its count; read with one host sync at the log step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.fixed = torch.zeros(4, dtype=torch.float64, device=device)
        self.parts: Dict[str, torch.Tensor] = {}

    def add(self, loss, count, grad_norm, lr, parts: Dict[str, tuple]) -> None:
        f64 = lambda *v: torch.stack([t.double().reshape(()) for t in v])  # noqa: E731
        self.fixed += f64(loss, count, grad_norm, lr)
        for name, (value, n) in parts.items():
            # first seen in an eager step: a captured step only adds to existing sums
            if name not in self.parts:
                self.parts[name] = torch.zeros(2, dtype=torch.float64, device=self.device)
            self.parts[name] += f64(value, torch.as_tensor(n))

    def read(self, steps: int) -> Dict[str, float]:
        """Means over the window (one host sync), then zero the sums."""
        values = torch.cat([self.fixed, *self.parts.values()]).tolist()
        self.fixed.zero_()
        for t in self.parts.values():
            t.zero_()
        loss, count, grad_norm, lr = values[:4]
        out = {"loss": loss / max(count, 1.0), "lr": lr / steps, "grad_norm": grad_norm / steps}
        for i, name in enumerate(self.parts):
            part, part_count = values[4 + 2 * i: 6 + 2 * i]
            out[name] = part / max(part_count, 1.0)
        return out


def _split(batch: Dict[str, torch.Tensor], n: int) -> List[Dict[str, torch.Tensor]]:
    chunks = {k: v.chunk(n) for k, v in batch.items()}
    return [{k: chunks[k][i] for k in batch} for i in range(n)]


class Stepper:
    """Runs training steps of ``task`` on ``model`` (see the module docstring)."""

    def __init__(self, task, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg,
                 device: torch.device, precision: str, dist, guard, *, compile_on: bool,
                 compile_mode: Optional[str] = None,
                 graphs: bool, timer=None, batch_hook: Optional[Callable] = None):
        if graphs and batch_hook is not None:
            raise ValueError("a batch hook runs on the host: it needs train.cuda_graphs=off")
        self.task, self.model, self.optimizer = task, model, optimizer
        self.cfg, self.device, self.dist, self.guard = cfg, device, dist, guard
        self.batch_hook = batch_hook
        self.timer = timer
        self.capturing = False
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = LossScaler(device) if precision == "fp16" else None
        self.fused_update = isinstance(optimizer, AdamW)
        self.step_t = torch.zeros((), dtype=torch.int64, device=device)
        self.lr = torch.zeros(1, dtype=torch.float32, device=device)
        self.lr_at = lr_multiplier(cfg.optim.schedule, cfg.optim.warmup_steps, cfg.train.steps,
                                   cfg.optim.min_lr_ratio)
        self.bind_groups()
        self.window = WindowSums(device)
        loss_fn = functools.partial(task.loss, model)
        # the trainer captures its own CUDA graph: the compiler's mode must not add one
        self.loss_fn = torch.compile(loss_fn, mode=compile_mode) if compile_on else loss_fn
        self.batch_fn = torch.compile(task.batch) if compile_on else task.batch
        per_rank = cfg.train.batch_size // (dist.world * cfg.train.grad_accum)
        #: 1 / the nominal count of a micro-batch: gradients the size of a mean's
        self.backward_scale = 1.0 / (per_rank * (task.seq_len or 1))
        self.graphs = graphs
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.eager_steps = 0

    def bind_groups(self) -> None:
        """Point every param group's lr at the device lr; keep torch's AdamW fused (the
        path that takes the skip flag) also when loaded state came from another optimizer."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
            if not self.fused_update:
                group["fused"], group["foreach"] = True, None

    def set_step(self, step: int) -> None:
        self.step_t.fill_(step)

    def invalidate(self) -> None:
        """Capture the step again (after warm-up) before the next replay."""
        self.graph, self.eager_steps = None, 0

    # --- running --------------------------------------------------------------------------
    def run(self, step: int) -> None:
        """Run step ``step`` (the host's count; the device counter holds the same)."""
        if self.graph is None and self.graphs and self.eager_steps >= WARMUP_STEPS:
            self.graph, self.capturing = torch.cuda.CUDAGraph(), True
            # the captured backward allocates and writes the gradients (see the docstring)
            self.optimizer.zero_grad(set_to_none=True)
            try:
                with torch.cuda.graph(self.graph):
                    self._step(step)
            except BaseException:
                self.graph = None
                raise
            finally:
                self.capturing = False
            finish = getattr(self.optimizer, "finish_capture", None)
            if finish is not None:
                finish()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step(step)
            self.eager_steps += 1

    @contextlib.contextmanager
    def _phase(self, name: str):
        """Time a phase of an eager step (a captured step is timed as a whole by the log)."""
        if self.timer is None or self.capturing:
            yield
            return
        token = self.timer.start(name)
        yield
        self.timer.stop(token)

    def _step(self, step: int) -> None:
        cfg, dist = self.cfg, self.dist
        with torch.no_grad():
            self.lr.copy_(cfg.optim.lr * self.lr_at(self.step_t) * self.guard.lr_scale)
        with self._phase("data"):
            batch = self.batch_fn(self.step_t, cfg.train.batch_size, self.device,
                                  cfg.train.seed)
            if self.batch_hook is not None:
                batch = self.batch_hook(step, batch)
            batch = distributed.shard_batch(batch, dist)
        # freed: the backward writes them (in a capture, into the graph's pool)
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.backward_scale if self.scaler is None else \
            self.scaler.scale * self.backward_scale
        with self._phase("forward_backward"):
            total, count, parts = self._forward_backward(batch, scale)
        total = distributed.all_reduce_sum(total.float(), dist)
        count = distributed.all_reduce_sum(count.float(), dist)
        mean = total / count.clamp(min=1)
        bad = self.guard.check(mean) if cfg.guard.enabled else ~torch.isfinite(mean)
        # DDP and FSDP average gradients over ranks: the scale of a sum is count / world
        grad_scale = count.clamp(min=1) * (scale / dist.world)
        with self._phase("optimizer"):
            norm, skipped = self._update(grad_scale, bad)
        self.guard.count_skipped(skipped, bad)
        if self.scaler is not None:
            self.scaler.update(~torch.isfinite(norm))
        self.window.add(total, count, norm, self.lr, parts)
        self.step_t += 1

    def _forward_backward(self, batch: Dict[str, torch.Tensor], scale):
        """Loss and backward of every micro-batch; the summed loss, count and sub-losses."""
        total = count = None
        parts: Dict[str, list] = {}
        micro = _split(batch, self.cfg.train.grad_accum)
        for i, mb in enumerate(micro):
            with distributed.maybe_no_sync(self.model, self.dist, i < len(micro) - 1):
                with torch.autocast(self.device.type, dtype=self.autocast,
                                    enabled=self.autocast is not None):
                    out = self.loss_fn(mb)
                (out.total * scale).backward()
            total = out.total.detach() if total is None else total + out.total.detach()
            count = out.count if count is None else count + out.count
            for name, part in out.parts.items():
                value, n = part if isinstance(part, tuple) else (part, out.count)
                old = parts.get(name)
                parts[name] = [value.detach(), n] if old is None else \
                    [old[0] + value.detach(), old[1] + n]
        return total, count, {k: tuple(v) for k, v in parts.items()}

    def _update(self, grad_scale: torch.Tensor, bad: torch.Tensor):
        """The optimizer step, skipped on the device when ``bad``; (norm, skipped flag)."""
        if self.fused_update:
            self.optimizer.step(grad_scale=grad_scale.reshape(()), found_inf=bad.float())
            return self.optimizer.last_grad_norm, self.optimizer.last_step_skipped
        params = [p for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None]
        grads = [p.grad for p in params]
        torch._foreach_div_(grads, grad_scale.reshape(()))
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if self.cfg.optim.max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.max_grad_norm, norm)
        skipped = (bad | ~torch.isfinite(norm)).float()
        # torch's amp-scaling protocol (as torch.amp.GradScaler.step drives it): the fused
        # step reads found_inf from the optimizer for the length of the call
        self.optimizer.grad_scale, self.optimizer.found_inf = None, skipped
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale, self.optimizer.found_inf
        return norm, skipped

    # --- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        return {"scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
