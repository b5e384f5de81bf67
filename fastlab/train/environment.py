"""Where a run executes: device, precision, seeds and RNG state, signals, the profiler."""
import contextlib
import os
import random
import signal
from typing import Any, Dict, Optional

import numpy as np
import torch

from fastlab.tasks.base import ConfigError


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r}; expected auto, cpu, cuda "
                          "or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name} but this machine has no usable CUDA "
                              "device (train.device=cpu or auto runs on the CPU)")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name}: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(device: torch.device, processes: int = 1) -> int:
    """Intra-op threads for one of ``processes`` runs sharing this machine: 1 for a CUDA
    run (the host only launches work), else an equal share of the cores, at most 4.
    Threads beyond a run's share compete with the other runs' threads: on a 2-core CPU
    shared with other work a small step took 5x longer on 2 threads than on 1, while
    alone it was 1.45x faster on 2 (see the README)."""
    if device.type == "cuda":
        return 1
    return max(1, min(4, available_cores() // processes))


def set_threads(threads: int, device: torch.device) -> int:
    """``train.threads`` (0: :func:`default_threads`); returns the count set."""
    threads = threads or default_threads(device)
    torch.set_num_threads(threads)
    return threads


def pick_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ConfigError("train.precision=fp16 needs a CUDA device")
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def seed_everything(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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


class StopRequest:
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


def profiler(enabled: bool, run_dir: str):
    """A torch profiler over steps 8-12 (past start-up) writing into ``run_dir/profile``."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if torch.cuda.is_available() else [])
    # one trace: a trace every 12 steps would fill the disk
    window = schedule(wait=5, warmup=2, active=5, repeat=1)
    return profile(activities=activities, schedule=window,
                   on_trace_ready=tensorboard_trace_handler(os.path.join(run_dir, "profile")))
