"""Where the time goes: phase timers, GPU sampling off the training thread, MFU.

Phase times use CUDA events recorded in the stream and read only when the trainer syncs
anyway (at a log step), so timing adds no host sync. NVML is sampled in a daemon thread:
an inline query per step stalls training.
"""
import threading
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

# Dense bf16/fp16 tensor-core peak FLOP/s by GPU name fragment (vendor datasheets); fp32
# runs are compared against the tf32 peak. Unknown GPUs report no MFU rather than a guess.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 494e12},
    "H100 PCIe": {"bf16": 756e12, "fp32": 378e12},
    "H100": {"bf16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp32": 183e12},
    "A10G": {"bf16": 125e12, "fp32": 62.5e12},
    "RTX 4090": {"bf16": 165e12, "fp32": 82.6e12},
}


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = "fp32" if precision == "fp32" else "bf16"
    for fragment, peaks in PEAK_FLOPS.items():  # ordered: "H100 PCIe" before "H100"
        if fragment in name:
            return peaks[kind]
    return None


class PhaseTimer:
    """Per-step durations of named phases (data, forward, backward, optimizer)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: List[Tuple[str, object, object]] = []
        self._totals: Dict[str, float] = defaultdict(float)
        self._counts: Dict[str, int] = defaultdict(int)

    def start(self, name: str):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return name, ev
        return name, time.perf_counter()

    def stop(self, token) -> None:
        name, begin = token
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((name, begin, end))
        else:
            self._add(name, 1e3 * (time.perf_counter() - begin))

    def _add(self, name: str, ms: float) -> None:
        self._totals[name] += ms
        self._counts[name] += 1

    def collect(self) -> Dict[str, float]:
        """Mean ms per phase since the last call. Call where the host has synced already."""
        for name, begin, end in self._pending:
            self._add(name, begin.elapsed_time(end))
        self._pending.clear()
        out = {k: self._totals[k] / self._counts[k] for k in self._totals}
        self._totals.clear()
        self._counts.clear()
        return out


class GPUSampler:
    """Samples utilisation, memory and power with nvidia-ml-py in a background thread."""

    def __init__(self, device: torch.device, period_s: float = 0.5):
        self.samples: List[Dict[str, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # no NVML library or no permission: telemetry without GPU stats
            return
        self._period = period_s
        self._thread = threading.Thread(target=self._run, name="fastlab-nvml", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nvml, h = self._nvml, self._handle
        while not self._stop.wait(self._period):
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(h)
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                sample = {"gpu_util": float(util.gpu), "gpu_mem_gb": mem.used / 1e9,
                          "gpu_power_w": nvml.nvmlDeviceGetPowerUsage(h) / 1e3}
            except Exception:
                return
            with self._lock:
                self.samples.append(sample)

    def drain(self) -> Dict[str, float]:
        """Means of the samples taken since the last call (empty without NVML)."""
        with self._lock:
            samples, self.samples = self.samples, []
        if not samples:
            return {}
        return {k: sum(s[k] for s in samples) / len(samples) for k in samples[0]}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
