"""The training loop. Read it top to bottom: set-up, resume, the loop, the end of run.

Each concern has its own module and ``train()`` only wires them: the task (data, loss,
evaluation), the stepper (one whole step on the device, eager or from a CUDA graph), the
guard (spikes, snapshot, rollback), checkpoint, logger and telemetry. The host syncs only
at log, eval and checkpoint steps (each is marked); a plain step queues its work or
replays its graph and moves on.
"""
import os
import time
from typing import Any, Dict, List, Optional

import torch

from fastlab.tasks import build_task
from fastlab.train import checkpoint, distributed, environment
from fastlab.train.config import Config, save_config
from fastlab.train.guard import SpikeGuard
from fastlab.train.logger import RunLogger, write_json
from fastlab.train.stepper import Stepper, build_optimizer
from fastlab.train.telemetry import GPUSampler, PhaseTimer, peak_flops


def run_dir_for(cfg: Config) -> str:
    name = cfg.log.name or f"{cfg.task.name.replace(':', '.')}-{time.strftime('%Y%m%d-%H%M%S')}"
    return os.path.join(cfg.log.out_dir, name)


def use_graphs(cfg: Config, device: torch.device, dist) -> bool:
    """``train.cuda_graphs``: auto captures every single-process CUDA run (see the
    README's measurements: at the sizes this trainer serves the step is launch-bound)."""
    if cfg.train.cuda_graphs == "off":
        return False
    if device.type != "cuda" or dist.active:
        if cfg.train.cuda_graphs == "on":
            where = "under torchrun" if dist.active else f"on {device}"
            raise ValueError(f"train.cuda_graphs=on needs a single-process CUDA run, got one "
                             f"{where}")
        return False
    if cfg.log.profile:
        if cfg.train.cuda_graphs == "on":
            raise ValueError("log.profile=true traces eager steps: it needs train.cuda_graphs "
                             "auto or off, got on")
        return False
    return True


def train(cfg: Config, run_dir: Optional[str] = None, batch_hook=None) -> Dict[str, Any]:
    """Train ``cfg`` and return the summary written to ``summary.json``.

    ``batch_hook(step, batch) -> batch`` lets tests change a step's batch (eager steps only).
    """
    # --- set-up -------------------------------------------------------------------
    dist = distributed.init()
    device = environment.pick_device(cfg.train.device, dist.local_rank)
    precision = environment.pick_precision(cfg.train.precision, device)
    environment.seed_everything(cfg.train.seed, device)
    if cfg.train.batch_size % (dist.world * cfg.train.grad_accum) != 0:
        raise ValueError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by "
                         f"world size x train.grad_accum ({dist.world} x {cfg.train.grad_accum})")
    task = build_task(cfg.task)
    model = distributed.wrap(task.build_model(cfg.model).to(device), dist, cfg.train.dist, device)
    raw_model = distributed.unwrap(model)
    optimizer = build_optimizer(model, cfg.optim, sharded=dist.mode == "fsdp")
    guard = SpikeGuard(cfg.guard, device)
    graphs = use_graphs(cfg, device, dist)
    run_dir = run_dir or run_dir_for(cfg)
    is_main = dist.rank == 0
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.json"))

    # --- resume --------------------------------------------------------------------
    found = checkpoint.checkpoints(run_dir) if cfg.checkpoint.resume else []
    saved = checkpoint.load(found[-1][1]) if found else None
    step, best, tokens_seen = 0, None, 0
    if saved:
        distributed.load_model_state(model, saved["model"])
        distributed.load_optimizer_state(model, optimizer, saved["optimizer"])
        guard.load_state_dict(saved["guard"])
        task.load_state_dict(saved["task"])
        environment.set_rng_state(saved["rng"])
        step, best, tokens_seen = saved["step"], saved["best"], saved["tokens"]
    timer = PhaseTimer(device)
    stepper = Stepper(task, model, optimizer, cfg, device, precision, dist, guard,
                      compile_on=cfg.train.compile == "on" or (cfg.train.compile == "auto"
                                                               and device.type == "cuda"),
                      graphs=graphs, timer=timer, batch_hook=batch_hook)
    stepper.set_step(step)
    if saved:
        stepper.load_state_dict(saved["stepper"])
    log = RunLogger(run_dir, cfg.train.steps, enabled=is_main, progress=cfg.log.progress,
                    resume_step=step if saved else None)
    if saved:
        log.event(step, f"resumed from {os.path.basename(found[-1][1])}")
        guard.take_snapshot(step, _rollback_tensors(model, optimizer))
    sampler = GPUSampler(device if (cfg.log.nvml and is_main) else torch.device("cpu"))
    seq_len = task.seq_len or 1
    flops = getattr(raw_model, "flops_per_token", None)
    flops_per_token = flops(seq_len) if flops and task.seq_len else None
    peak = peak_flops(device, precision)

    def state() -> Dict[str, Any]:
        return {"model": distributed.model_state(model),
                "optimizer": distributed.optimizer_state(model, optimizer),
                "stepper": stepper.state_dict(), "guard": guard.state_dict(),
                "rng": environment.rng_state(), "step": step, "best": best,
                "tokens": tokens_seen, "task": task.state_dict(), "config": cfg.to_dict()}

    # --- the loop ------------------------------------------------------------------
    saved_step, stopped_by = step, None
    metrics: Dict[str, float] = {}
    last_eval: Dict[str, float] = {}
    window_steps, window_t0 = 0, time.perf_counter()
    with environment.StopRequest() as stop, environment.profiler(
            cfg.log.profile and is_main, run_dir) as prof:
        while step < cfg.train.steps:
            stepper.run(step)
            step += 1
            tokens_seen += cfg.train.batch_size * seq_len
            window_steps += 1
            if prof is not None:
                prof.step()
            log_now = step % cfg.log.every == 0 or step == cfg.train.steps

            if log_now:  # the one regular host sync
                metrics = _log_step(stepper, guard, log, timer, sampler, step, window_steps,
                                    window_t0, cfg, seq_len, flops_per_token, peak, dist)
                _guard_snapshot_or_rollback(guard, cfg, metrics.get("spikes", 0), step, model,
                                            optimizer, log)
                window_steps, window_t0 = 0, time.perf_counter()

            if step % cfg.eval.every == 0 or step == cfg.train.steps:
                eval_t0 = time.perf_counter()
                ev = task.evaluate(raw_model, cfg.eval.samples, device)  # host sync
                last_eval = {"step": step, **ev}
                log.log("eval", step, ev)
                log.event(step, "eval " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
                # scores below the curriculum's last level compare with neither the target
                # nor the best so far
                score = ev.get(task.metric) if task.curriculum_done else None
                change = task.curriculum(ev)
                if change:  # a task may change state its captured step cannot see
                    log.event(step, change)
                    stepper.invalidate()
                if score is not None and (best is None or score > best):
                    best = score
                    snapshot = state()  # a collective under FSDP: every rank takes part
                    if is_main:
                        checkpoint.atomic_save(snapshot, os.path.join(run_dir, "best.pt"))
                metrics.update(ev)
                if cfg.eval.target is not None and score is not None and score >= cfg.eval.target:
                    stopped_by = f"reached {task.metric} >= {cfg.eval.target}"
                    break
                window_t0 += time.perf_counter() - eval_t0  # evaluation is no training time

            # a signal may reach one rank first: ranks agree at log steps (a collective)
            stop_now = (distributed.any_flag(stop.signal is not None, dist, device)
                        if log_now or not dist.active else False)
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
               "precision": precision, "cuda_graphs": graphs, "world_size": dist.world,
               "tokens": tokens_seen, "params": sum(p.numel() for p in raw_model.parameters()),
               "best": best, "final": final, "last_train": metrics,
               "rollbacks": guard.rollbacks, "wall_s": round(time.time() - log.t0, 2)}
    if is_main:
        write_json(os.path.join(run_dir, "summary.json"), summary)
        log.show(step, {"loss": metrics.get("loss", float("nan")), **final}, final=True)
    log.close()
    sampler.close()
    distributed.shutdown(dist)
    return summary


SHOWN = ("loss", "steps_s", "samples_s", "tok_s", "mfu", "gpu_util", "gpu_mem_gb",
         "gpu_power_w", "ms_data", "ms_forward_backward", "ms_optimizer")


def _log_step(stepper, guard, log, timer, sampler, step, window_steps, window_t0, cfg, seq_len,
              flops_per_token, peak, dist) -> Dict[str, float]:
    """Read the window's device sums (host sync), log them and show the progress line."""
    metrics = stepper.window.read(window_steps)
    # the host runs ahead of queued steps and replays: the window ends at the sync above
    elapsed = time.perf_counter() - window_t0
    counts = guard.poll()
    samples_s = window_steps * cfg.train.batch_size / elapsed
    metrics.update({"steps_s": window_steps / elapsed, "samples_s": samples_s,
                    "tok_s": samples_s * seq_len})
    if flops_per_token and peak:
        metrics["mfu"] = metrics["tok_s"] * flops_per_token / (peak * dist.world)
    metrics.update({f"ms_{k}": v for k, v in timer.collect().items()})
    metrics.update(sampler.drain())
    if counts["spikes"]:
        metrics["spikes"] = counts["spikes"]
        log.event(step, f"{counts['spikes']} spike(s) skipped", spikes=counts["spikes"])
    if counts["skipped"]:
        metrics["skipped"] = counts["skipped"]
        log.event(step, f"{counts['skipped']} update(s) skipped by the optimizer: inf/NaN "
                        "gradients", skipped=counts["skipped"])
    log.log("train", step, metrics)
    log.show(step, {k.removeprefix("ms_") + ("_ms" if k.startswith("ms_") else ""): metrics[k]
                    for k in SHOWN if k in metrics})
    return metrics


def _rollback_tensors(model, optimizer) -> List[torch.Tensor]:
    """Every tensor a rollback restores: parameters, buffers and the optimizer's state."""
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return tensors


def _guard_snapshot_or_rollback(guard, cfg, spikes, step, model, optimizer, log) -> None:
    if not cfg.guard.enabled:
        return
    if spikes >= cfg.guard.max_spikes and guard.snapshot is not None:
        guard.roll_back(_rollback_tensors(model, optimizer))
        log.event(step, f"rolled back to the snapshot of step {guard.snapshot_step}; lr x "
                        f"{float(guard.lr_scale):g}", rollback_to=guard.snapshot_step)
    elif spikes == 0 and (guard.snapshot is None or
                          step - guard.snapshot_step >= cfg.guard.snapshot_every):
        guard.take_snapshot(step, _rollback_tensors(model, optimizer))
