"""The training loop. Read it top to bottom: set-up, resume, the loop, the end of run.

Each concern has its own module and ``train()`` only wires them: the task (data, loss,
evaluation), the stepper (one whole step on the device, eager or from a CUDA graph), the
guard (spikes, snapshot, rollback), checkpoint, logger and telemetry. The host syncs only
at log, eval and checkpoint steps (each is marked); a plain step queues its work or
replays its graph and moves on.
"""
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from fastlab.tasks import build_task
from fastlab.tasks.base import ConfigError
from fastlab.train import checkpoint, distributed, environment, rundir
from fastlab.train.config import Config, save_config
from fastlab.train.guard import SpikeGuard
from fastlab.train.logger import RunLogger, write_json
from fastlab.train.stepper import Stepper, build_optimizer
from fastlab.train.telemetry import GPUSampler, PhaseTimer, peak_flops


def run_dir_for(cfg: Config) -> str:
    if cfg.log.name:
        return os.path.join(cfg.log.out_dir, cfg.log.name)
    stamp = f"{cfg.task.name.replace(':', '.')}-{time.strftime('%Y%m%d-%H%M%S')}"
    return rundir.free_name(os.path.join(cfg.log.out_dir, stamp))


def use_graphs(cfg: Config, device: torch.device, dist) -> bool:
    """``train.cuda_graphs``: auto captures every single-process CUDA run (see the
    README's measurements: at the sizes this trainer serves the step is launch-bound)."""
    if cfg.train.cuda_graphs == "off":
        return False
    if device.type != "cuda" or dist.active:
        if cfg.train.cuda_graphs == "on":
            where = "under torchrun" if dist.active else f"on {device}"
            raise ConfigError(f"train.cuda_graphs=on needs a single-process CUDA run, got one "
                              f"{where}")
        return False
    # a profile traces eager steps (each phase's launches visible), or with
    # train.cuda_graphs=on the replays of the captured step (its kernels and their gaps)
    return not cfg.log.profile or cfg.train.cuda_graphs == "on"


#: options that may differ between the starts of one run without being reported
_QUIET = {"checkpoint.resume", "log.overwrite", "log.progress", "train.init_from"}


def _finite_weights(state: Dict[str, Any]) -> bool:
    """Whether every floating tensor of a model state dict is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in state.values()
             if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _open_run(cfg: Config, run_dir: str, model: torch.nn.Module):
    """Decide, before anything is written, how this start uses ``run_dir``: fresh, moved
    aside first, resumed from its newest good checkpoint, or restarted from step 0 (a
    run killed before its first checkpoint). Returns (saved state or None, its path,
    files skipped and why, whether a run was there). Refuses, with the way out:
    a fresh start in a directory that holds a run, a resume whose every checkpoint is
    damaged, a resume with a changed model shape."""
    exists = rundir.existing_run(run_dir)
    if not exists or cfg.log.overwrite:
        return None, None, [], exists
    if not cfg.checkpoint.resume:
        raise ConfigError(
            f"{run_dir} already holds a run; continue it with checkpoint.resume=true, pick "
            f"another log.name, or pass log.overwrite=true to move it to {run_dir}.old-K "
            "(nothing is deleted)")
    current = distributed.unwrap(model).state_dict()

    def check(state):
        mismatched = rundir.shape_mismatches(state["model"], current)
        if mismatched:
            changes = rundir.config_changes(state.get("config", {}), cfg.to_dict())
            raise ConfigError(
                f"cannot resume {run_dir} with a model of another shape: "
                f"{'; '.join(mismatched[:4])}{' ...' if len(mismatched) > 4 else ''} "
                f"(config changes: {', '.join(changes) or 'none'}); nothing was written. "
                "Use another log.name, or train.init_from to start from its weights")
        if not _finite_weights(state["model"]):
            raise checkpoint.CheckpointError(f"{state.get('step', '?')}: the weights hold "
                                             "NaN or infinity")

    path, saved, problems = checkpoint.load_latest(run_dir, check)
    if saved is None and problems:
        raise ConfigError(
            f"no checkpoint of {run_dir} can be used: {'; '.join(problems)}. Nothing was "
            "changed; log.overwrite=true moves the run aside and starts afresh")
    return saved, path, problems, exists


def _init_from(path: str, model: torch.nn.Module) -> str:
    """Load the weights of ``train.init_from`` (a checkpoint, or a run directory's best.pt
    or newest good checkpoint) into ``model``; returns the file used."""
    if os.path.isdir(path):
        best = os.path.join(path, "best.pt")
        file, state, problems = ((best, checkpoint.load(best), []) if os.path.exists(best)
                                 else checkpoint.load_latest(path))
        if state is None:
            raise ConfigError(f"train.init_from={path}: no usable checkpoint "
                              f"({'; '.join(problems) or 'none found'})")
    else:
        file = path
        try:
            state = checkpoint.load(path)
        except checkpoint.CheckpointError as exc:
            raise ConfigError(f"train.init_from: {exc}") from None
    mismatched = rundir.shape_mismatches(state["model"], model.state_dict())
    if mismatched:
        raise ConfigError(f"train.init_from={file}: the model differs in shape: "
                          f"{'; '.join(mismatched[:4])}")
    model.load_state_dict(state["model"])
    return file


def _finished(run_dir: str, saved, cfg: Config) -> Optional[Dict[str, Any]]:
    """The saved summary of a run already trained to ``train.steps``, else None."""
    if saved is None or saved["step"] < cfg.train.steps:
        return None
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def train(cfg: Config, run_dir: Optional[str] = None, batch_hook=None) -> Dict[str, Any]:
    """Train ``cfg`` and return the summary written to ``summary.json``.

    ``batch_hook(step, batch) -> batch`` lets tests change a step's batch (eager steps only).
    """
    # --- set-up -------------------------------------------------------------------
    dist = distributed.init()
    device = environment.pick_device(cfg.train.device, dist.local_rank)
    threads = environment.set_threads(cfg.train.threads, device)
    precision = environment.pick_precision(cfg.train.precision, device)
    environment.seed_everything(cfg.train.seed, device)
    if cfg.train.batch_size % (dist.world * cfg.train.grad_accum) != 0:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by "
                          f"world size x train.grad_accum ({dist.world} x "
                          f"{cfg.train.grad_accum})")
    task = build_task(cfg.task)
    model = distributed.wrap(task.build_model(cfg.model).to(device), dist, cfg.train.dist, device)
    raw_model = distributed.unwrap(model)
    optimizer = build_optimizer(model, cfg.optim, sharded=dist.mode == "fsdp")
    guard = SpikeGuard(cfg.guard, device)
    graphs = use_graphs(cfg, device, dist)
    run_dir = run_dir or run_dir_for(cfg)
    is_main = dist.rank == 0

    # --- the run directory and resume: every check passes before anything is written --
    saved, saved_path, skipped_files, existed = _open_run(cfg, run_dir, model)
    done = _finished(run_dir, saved, cfg)
    if done is not None:
        if is_main:
            print(f"{run_dir} finished at step {saved['step']} (train.steps="
                  f"{cfg.train.steps}); nothing to do: raise train.steps to train on",
                  file=sys.stderr)
        distributed.shutdown(dist)
        return done
    # a checkpoint's weights to start from, checked before the directory changes too
    initialised = _init_from(cfg.train.init_from, raw_model) \
        if cfg.train.init_from and not saved else None
    distributed.barrier(dist)  # every rank has looked at the directory before it changes
    changes = ([c for c in rundir.config_changes(saved.get("config", {}), cfg.to_dict())
                if c.split(" ", 1)[0] not in _QUIET] if saved else [])
    moved = None
    if is_main:
        if existed and cfg.log.overwrite:
            moved = rundir.move_aside(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.json"))
        rundir.append_config_history(run_dir, saved["step"] if saved else 0, cfg.to_dict(),
                                     changes)
        rundir.write_status(run_dir, "running", saved["step"] if saved else 0)
    distributed.barrier(dist)

    step, best, tokens_seen, elapsed = 0, None, 0, 0.0
    if saved:
        distributed.load_model_state(model, saved["model"])
        distributed.load_optimizer_state(model, optimizer, saved["optimizer"])
        guard.load_state_dict(saved["guard"])
        task.load_state_dict(saved["task"])
        environment.set_rng_state(saved["rng"])
        step, best, tokens_seen = saved["step"], saved["best"], saved["tokens"]
        elapsed = saved.get("elapsed", 0.0)
    timer = PhaseTimer(device)
    stepper = Stepper(task, model, optimizer, cfg, device, precision, dist, guard,
                      compile_on=cfg.train.compile in ("on", "max-autotune") or (
                          cfg.train.compile == "auto" and device.type == "cuda"),
                      compile_mode=("max-autotune-no-cudagraphs"
                                    if cfg.train.compile == "max-autotune" else None),
                      graphs=graphs, timer=timer, batch_hook=batch_hook)
    stepper.set_step(step)
    if saved:
        stepper.load_state_dict(saved["stepper"])
    # a restart without a checkpoint drops every record of the run it replaces
    resume_step = step if saved else (-1 if existed and not moved else None)
    log = RunLogger(run_dir, cfg.train.steps, enabled=is_main, progress=cfg.log.progress,
                    resume_step=resume_step, elapsed=elapsed, start_step=step)
    if moved:
        log.event(step, f"the run that was in {run_dir} was moved to {moved}")
    for problem in skipped_files:
        log.event(step, f"skipped checkpoint {problem}")
    if saved:
        log.event(step, f"resumed from {os.path.basename(saved_path)}")
        if changes:
            log.event(step, "config changed on resume: " + ", ".join(changes),
                      changes=changes)
        guard.take_snapshot(step, _rollback_tensors(model, optimizer))
    elif resume_step == -1:
        log.event(step, "restarted from step 0: the run here had no checkpoint")
    if initialised:
        log.event(step, f"weights initialised from {initialised}")
    if threads != torch.get_num_threads():
        log.event(step, f"torch runs {torch.get_num_threads()} threads, not {threads}")
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
                "tokens": tokens_seen, "task": task.state_dict(), "config": cfg.to_dict(),
                "elapsed": log.elapsed()}

    def save(snapshot: Dict[str, Any], path: Optional[str] = None) -> bool:
        """Write a step checkpoint (or ``path``) unless the weights went non-finite: such
        a file would replace a good one (rank 0 only)."""
        if not _finite_weights(snapshot["model"]):
            log.event(step, "checkpoint not written: the weights hold NaN or infinity")
            return False
        if path:
            checkpoint.atomic_save(snapshot, path)
        else:
            checkpoint.save_step(snapshot, run_dir, step, cfg.checkpoint.keep)
        return True

    try:
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
                    # the host runs steps ahead of the GPU: without a sync, kernels of steps
                    # queued before the profiler's window ran inside it and were counted
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
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
                        guard.forget()
                    if score is not None and (best is None or score > best):
                        best = score
                        snapshot = state()  # a collective under FSDP: every rank takes part
                        if is_main:
                            save(snapshot, os.path.join(run_dir, "best.pt"))
                    metrics.update(ev)
                    target = cfg.eval.target
                    if target is not None and score is not None and score >= target:
                        stopped_by = f"reached {task.metric} >= {cfg.eval.target}"
                        break
                    window_t0 += time.perf_counter() - eval_t0  # evaluation is no training time

                # a signal may reach one rank first: ranks agree at log steps (a collective)
                stop_now = (distributed.any_flag(stop.signal is not None, dist, device)
                            if log_now or not dist.active else False)
                if step % cfg.checkpoint.every == 0 or stop_now:
                    snapshot = state()
                    if is_main:
                        save(snapshot)
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
                save(snapshot)
        summary = {"steps": step, "stopped_by": stopped_by, "device": str(device),
                   "precision": precision, "cuda_graphs": graphs, "world_size": dist.world,
                   "tokens": tokens_seen, "params": sum(p.numel() for p in raw_model.parameters()),
                   "best": best, "final": final, "last_train": metrics,
                   "rollbacks": guard.rollbacks, "wall_s": round(log.elapsed(), 2),
                   "threads": threads}
        if is_main:
            write_json(os.path.join(run_dir, "summary.json"), summary)
            rundir.write_status(run_dir, "stopped" if stopped_by and stopped_by.startswith("signal")
                                else "finished", step, stopped_by=stopped_by)
            log.show(step, {"loss": metrics.get("loss", float("nan")), **final}, final=True)
        log.close()
        sampler.close()
        distributed.shutdown(dist)
        return summary
    except Exception as exc:
        if is_main:  # report and sweep show the run as failed, with the reason
            rundir.write_status(run_dir, "failed", step, error=f"{type(exc).__name__}: {exc}")
        raise


#: what the progress line shows, in this order while it fits, and under which label
SHOWN = {"loss": "loss", "lr": "lr", "steps_s": "it/s", "samples_s": "samples/s",
         "gpu_util": "gpu%", "gpu_mem_gb": "memGB", "gpu_power_w": "W", "mfu": "mfu",
         "tok_s": "tok/s", "ms_data": "data_ms", "ms_forward_backward": "fwd_bwd_ms",
         "ms_optimizer": "optim_ms"}


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
    if stepper.device.type == "cuda":  # the allocator's count: no device sync
        metrics["mem_peak_gb"] = torch.cuda.max_memory_allocated(stepper.device) / 1e9
    metrics.update(sampler.drain())
    if counts["spikes"]:
        metrics["spikes"] = counts["spikes"]
        log.event(step, f"{counts['spikes']} spike(s) skipped", spikes=counts["spikes"])
    if counts["skipped"]:
        metrics["skipped"] = counts["skipped"]
        log.event(step, f"{counts['skipped']} update(s) skipped by the optimizer: inf/NaN "
                        "gradients", skipped=counts["skipped"])
    log.log("train", step, metrics)
    log.show(step, {label: metrics[k] for k, label in SHOWN.items() if k in metrics})
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
