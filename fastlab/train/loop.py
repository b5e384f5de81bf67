"""The training loop. Read it top to bottom: set-up, resume, the step, then the end of run.

Host syncs happen only at log, eval and checkpoint steps (each is marked); a plain step
queues its work and moves on.
"""
import contextlib
import dataclasses
import os
import random
import signal
import time
from typing import Any, Dict, Optional

import numpy as np
import torch

from fastlab.ops.cross_entropy import cross_entropy
from fastlab.optim import AdamW
from fastlab.optim.schedules import lr_multiplier
from fastlab.tasks import build_task
from fastlab.train import checkpoint, distributed
from fastlab.train.config import Config, save_config
from fastlab.train.guard import SpikeGuard
from fastlab.train.logger import RunLogger, write_json
from fastlab.train.telemetry import GPUSampler, PhaseTimer, peak_flops


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def pick_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ValueError("train.precision=fp16 needs a CUDA device")
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_optimizer(model: torch.nn.Module, cfg, sharded: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay only on matrices (dim >= 2), never on norms and biases.

    fastlab's AdamW works on plain tensors; FSDP2's sharded (DTensor) parameters use torch's
    AdamW, clipped by the loop.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if sharded:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 max_grad_norm=cfg.max_grad_norm or None)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and exits."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run_dir_for(cfg: Config) -> str:
    name = cfg.log.name or f"{cfg.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return os.path.join(cfg.log.out_dir, name)


def train(cfg: Config, run_dir: Optional[str] = None,
          batch_hook=None) -> Dict[str, Any]:
    """Train ``cfg`` and return the summary written to ``summary.json``.

    ``batch_hook(step, inputs, targets) -> (inputs, targets)`` lets tests inject bad data.
    """
    # --- set-up -------------------------------------------------------------------
    dist = distributed.init()
    device = pick_device(cfg.train.device, dist.local_rank)
    precision = pick_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.train.batch_size % (dist.world * cfg.train.grad_accum) != 0:
        raise ValueError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by "
                         f"world size x train.grad_accum ({dist.world} x {cfg.train.grad_accum})")

    task_options = {k: v for k, v in dataclasses.asdict(cfg.task).items() if k != "name"}
    task = build_task(cfg.task.name, **task_options)
    model = task.build_model(cfg.model).to(device)
    model = distributed.wrap(model, dist, cfg.train.dist, device)
    sharded = dist.mode == "fsdp"
    optimizer = build_optimizer(model, cfg.optim, sharded)
    lr_at = lr_multiplier(cfg.optim.schedule, cfg.optim.warmup_steps, cfg.train.steps,
                          cfg.optim.min_lr_ratio)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    compile_on = cfg.train.compile == "on" or (cfg.train.compile == "auto"
                                                 and device.type == "cuda")
    if cfg.train.cuda_graphs and device.type != "cuda":
        raise ValueError(f"train.cuda_graphs=true needs a CUDA device, got {device}")
    # cuda_graphs needs compile on (the config refuses compile=off with it)
    mode = "reduce-overhead" if cfg.train.cuda_graphs else None
    forward = torch.compile(model, mode=mode) if compile_on else model
    raw_model = distributed.unwrap(model)
    guard = SpikeGuard(cfg.guard, device)

    run_dir = run_dir or run_dir_for(cfg)
    is_main = dist.rank == 0
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.json"))
    found = checkpoint.checkpoints(run_dir) if cfg.checkpoint.resume else []
    resume_step, latest = found[-1] if found else (None, None)
    # a resumed run first drops the records written after its checkpoint
    log = RunLogger(run_dir, cfg.train.steps, enabled=is_main, progress=cfg.log.progress,
                    resume_step=resume_step)
    timer = PhaseTimer(device)
    sampler = GPUSampler(device) if (cfg.log.nvml and is_main) else GPUSampler(torch.device("cpu"))
    seq_len = getattr(task, "seq_len", None)
    flops_per_token = (raw_model.flops_per_token(seq_len)
                       if hasattr(raw_model, "flops_per_token") and seq_len else None)
    peak = peak_flops(device, precision)

    def state() -> Dict[str, Any]:
        return {"model": distributed.model_state(model),
                "optimizer": distributed.optimizer_state(model, optimizer),
                "scaler": scaler.state_dict() if scaler else None,
                "guard": guard.state_dict(), "rng": rng_state(), "step": step,
                "best": best, "tokens": tokens_seen, "task": task.state_dict(),
                "config": cfg.to_dict()}

    # --- resume --------------------------------------------------------------------
    step, best, tokens_seen = 0, None, 0
    if latest:
        saved = checkpoint.load(latest)
        distributed.load_model_state(model, saved["model"])
        distributed.load_optimizer_state(model, optimizer, saved["optimizer"])
        if scaler and saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
        guard.load_state_dict(saved["guard"])
        set_rng_state(saved["rng"])
        step, best, tokens_seen = saved["step"], saved["best"], saved["tokens"]
        task.load_state_dict(saved.get("task", {}))
        log.event(step, f"resumed from {os.path.basename(latest)}")
    saved_step = step  # the newest step checkpoint's step: the end of run saves unless equal

    # --- the loop ------------------------------------------------------------------
    loss_sum = torch.zeros((), device=device)
    window_steps, window_t0 = 0, time.perf_counter()
    metrics: Dict[str, float] = {}
    last_eval: Dict[str, float] = {}
    stopped_by = None
    profiler = _profiler(cfg, run_dir) if is_main else contextlib.nullcontext()
    with _StopRequest() as stop, profiler as prof:
        while step < cfg.train.steps:
            lr = cfg.optim.lr * lr_at(step) * guard.lr_scale
            for group in optimizer.param_groups:
                group["lr"] = lr

            t = timer.start("data")
            # the global batch is a function of (seed, step): this rank takes its slice,
            # then splits it into micro-batches, so any world size or accumulation sees it all
            x, y = task.batch(step, cfg.train.batch_size, device, seed=cfg.train.seed)
            if batch_hook is not None:
                x, y = batch_hook(step, x, y)
            # token-weighted accumulation: every micro-batch divides by the tokens of the
            # whole accumulated batch over all ranks (every rank holds the global batch here,
            # so this needs no collective)
            n_tokens = (y != -100).sum()
            x, y = distributed.shard_batch(x, y, dist)
            micro = list(zip(x.chunk(cfg.train.grad_accum), y.chunk(cfg.train.grad_accum)))
            timer.stop(t)

            step_loss = torch.zeros((), device=device)
            bad = None
            for i, (x, y) in enumerate(micro):
                last = i == len(micro) - 1
                with distributed.maybe_no_sync(model, dist, not last):
                    t = timer.start("forward")
                    if cfg.train.cuda_graphs:
                        # the previous replay's outputs are consumed: let the graph reuse them
                        torch.compiler.cudagraph_mark_step_begin()
                    with torch.autocast(device.type, dtype=autocast_dtype,
                                        enabled=autocast_dtype is not None):
                        logits, _ = forward(x)
                    loss = cross_entropy(logits, y, reduction="sum") / n_tokens.clamp(min=1)
                    timer.stop(t)
                    step_loss = step_loss + distributed.all_reduce_sum(loss.detach(), dist)
                    scale = float(dist.world)  # DDP averages gradients over ranks
                    if last and cfg.guard.enabled:
                        bad = distributed.all_reduce_max(guard.check(step_loss), dist)
                        scale = torch.where(bad, float("nan"), scale)
                    t = timer.start("backward")
                    (scaler.scale(loss * scale) if scaler else loss * scale).backward()
                    timer.stop(t)

            # AdamW clips inside its update pass and skips the step for every parameter
            # when found_inf is set or the gradient norm is not finite
            t = timer.start("optimizer")
            skipped = bad
            if sharded and cfg.optim.max_grad_norm:
                if scaler:
                    scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                optimizer.last_grad_norm = norm
                # a finite loss can still give inf/NaN gradients: skip as fastlab's AdamW does
                skipped = ~norm.isfinite() if bad is None else bad | ~norm.isfinite()
            if scaler:  # the guard's NaN loss makes the scaler's found_inf true
                scaler.step(optimizer)
                scaler.update()
            elif sharded:
                # torch's AdamW on DTensors takes no found_inf: the skip is decided on the
                # host, one sync per step under FSDP (torch's fused AdamW would take it, but
                # measured no faster here: FSDP2 steps of this size are bound by host work)
                if skipped is None or not bool(skipped):
                    optimizer.step()
            else:
                if bad is not None:  # the grad-scaler protocol: skip the update on device
                    optimizer.found_inf = bad.float()
                optimizer.step()
                optimizer.__dict__.pop("found_inf", None)
            if not sharded:  # set by fastlab's AdamW, also under the grad scaler
                skipped = optimizer.last_step_skipped
            guard.count_skipped(skipped, bad)
            optimizer.zero_grad(set_to_none=True)
            timer.stop(t)
            loss_sum += step_loss
            tokens_seen += cfg.train.batch_size * (seq_len or 1)
            step += 1
            window_steps += 1
            if prof is not None:
                prof.step()

            # --- log step: the one regular host sync ---------------------------------
            if step % cfg.log.every == 0 or step == cfg.train.steps:
                mean_loss = float(loss_sum) / window_steps  # host sync
                loss_sum.zero_()
                spikes, skips = guard.poll(), guard.poll_skipped()
                elapsed = time.perf_counter() - window_t0
                samples_s = window_steps * cfg.train.batch_size / elapsed
                tok_s = samples_s * (seq_len or 1)
                metrics = {"loss": mean_loss, "lr": lr, "steps_s": window_steps / elapsed,
                           "samples_s": samples_s, "tok_s": tok_s}
                if flops_per_token and peak:
                    metrics["mfu"] = tok_s * flops_per_token / (peak * dist.world)
                grad_norm = getattr(optimizer, "last_grad_norm", None)
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                metrics.update({f"ms_{k}": v for k, v in timer.collect().items()})
                metrics.update(sampler.drain())
                if spikes:
                    metrics["spikes"] = spikes
                    log.event(step, f"{spikes} spike(s) skipped", spikes=spikes)
                if skips:
                    metrics["skipped"] = skips
                    log.event(step, f"{skips} update(s) skipped by the optimizer: inf/NaN "
                                    "gradients", skipped=skips)
                if cfg.guard.enabled:
                    _guard_snapshot_or_rollback(guard, cfg, spikes, step, model, optimizer, log)
                log.log("train", step, metrics)
                shown = ("loss", "steps_s", "samples_s", "tok_s", "mfu", "gpu_util", "gpu_mem_gb",
                         "gpu_power_w", "ms_data", "ms_forward", "ms_backward", "ms_optimizer")
                log.show(step, {k.removeprefix("ms_") + ("_ms" if k.startswith("ms_") else ""):
                                metrics[k] for k in shown if k in metrics})
                window_steps, window_t0 = 0, time.perf_counter()

            if step % cfg.eval.every == 0 or step == cfg.train.steps:
                ev = task.evaluate(raw_model, cfg.eval.samples, device)  # host sync
                last_eval = {"step": step, **ev}
                log.log("eval", step, ev)
                log.event(step, "eval " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
                # scores below the curriculum's last level are not comparable with the
                # target or with the best so far
                score = ev.get(task.metric) if task.curriculum_done else None
                change = task.curriculum(ev)
                if change:
                    log.event(step, change)
                improved = score is not None and (best is None or score > best)
                if improved:
                    best = score
                if improved:
                    snapshot = state()  # a collective under FSDP: every rank takes part
                    if is_main:
                        checkpoint.atomic_save(snapshot, os.path.join(run_dir, "best.pt"))
                metrics.update(ev)
                if cfg.eval.target is not None and score is not None and score >= cfg.eval.target:
                    stopped_by = f"reached {task.metric} >= {cfg.eval.target}"
                    break

            stop_now = distributed.any_flag(stop.signal is not None, dist, device)
            if step % cfg.checkpoint.every == 0 or stop_now:
                snapshot = state()
                if is_main:
                    checkpoint.save_step(snapshot, run_dir, step, cfg.checkpoint.keep)
                saved_step = step
                distributed.barrier(dist)
            if stop_now:
                stopped_by = f"signal {stop.signal or 'on another rank'}"
                log.event(step, f"stopping on {stopped_by}; checkpoint written")
                break

    # --- end of run ----------------------------------------------------------------
    final = {k: v for k, v in last_eval.items() if k != "step"}
    if last_eval.get("step") != step:
        final = task.evaluate(raw_model, cfg.eval.samples, device)
    if saved_step != step:  # a run stopped at the eval target is resumable too
        snapshot = state()
        if is_main:
            checkpoint.save_step(snapshot, run_dir, step, cfg.checkpoint.keep)
    summary = {"steps": step, "stopped_by": stopped_by, "device": str(device),
               "precision": precision, "world_size": dist.world, "tokens": tokens_seen,
               "params": sum(p.numel() for p in raw_model.parameters()),
               "best": best, "final": final, "last_train": metrics,
               "rollbacks": guard.rollbacks, "wall_s": round(time.time() - log.t0, 2)}
    if is_main:
        write_json(os.path.join(run_dir, "summary.json"), summary)
        log.show(step, {"loss": metrics.get("loss", float("nan")), **final}, final=True)
    log.close()
    sampler.close()
    distributed.shutdown(dist)
    return summary


def _guard_snapshot_or_rollback(guard, cfg, spikes, step, model, optimizer, log) -> None:
    if spikes >= cfg.guard.max_spikes and guard.snapshot is not None:
        model.load_state_dict(guard.snapshot["model"])
        optimizer.load_state_dict(guard.snapshot["optimizer"])
        guard.lr_scale *= cfg.guard.lr_backoff
        guard.rollbacks += 1
        log.event(step, f"rolled back to the snapshot of step {guard.snapshot_step}; lr x "
                        f"{guard.lr_scale:g}", rollback_to=guard.snapshot_step)
    elif spikes == 0 and (guard.snapshot is None or
                          step - guard.snapshot_step >= cfg.guard.snapshot_every):
        guard.take_snapshot(step, {"model": model.state_dict(),
                                   "optimizer": optimizer.state_dict()})


def _profiler(cfg: Config, run_dir: str):
    if not cfg.log.profile:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if torch.cuda.is_available() else [])
    # one trace of steps 8-12, past start-up: a trace every 12 steps would fill the disk
    window = schedule(wait=5, warmup=2, active=5, repeat=1)
    return profile(activities=activities, schedule=window,
                   on_trace_ready=tensorboard_trace_handler(os.path.join(run_dir, "profile")))
