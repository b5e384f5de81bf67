"""GPU timing and records for the bench suite.

Every op is timed by :func:`time_ms`, ``triton.testing.do_bench``'s method with CUDA events
(median with 20/80 percentiles over repetitions, L2 flushed before each one so a
cache-resident input is not what gets timed; no synchronisation between calls inside a
repetition), except for how the L2 is flushed. do_bench writes zeros over a 256 MB buffer,
which leaves the L2 holding dirty lines: the op timed next pays for writing them back to
HBM. ``time_ms`` flushes by reading that buffer instead, so every op starts on a clean L2
and moves only its own bytes. Measured on an H200 for the same segment-pool code: level
forwards of 0.085-0.12 ms took 1.5-4.4% longer after the zeroing flush, and their
forward + backward times, erratic after it (0.17 to 0.36 ms at D32 across runs), were
steady after the read (0.170 ms). ``FASTLAB_BENCH_FLUSH=zero`` restores do_bench's flush
(results from before this change were taken with it). Each record carries the op's physical
floor, computed from the bytes it must move and the flops it must do at this GPU's
*measured* copy bandwidth and matmul throughput, and the ratio of every peer timed in the
same run.
"""
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Record:
    op: str
    case: str
    mode: str
    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_extra_mem_gb: Optional[float]
    floor_bytes: float
    floor_flops: float
    floor_ms: float
    ratio_to_floor: float
    tflops: Optional[float]
    gbps: Optional[float]
    shape: Dict[str, object] = field(default_factory=dict)
    ratio_vs: Dict[str, float] = field(default_factory=dict)


_FLUSH_BYTES = 256 * 1024 * 1024  # as do_bench: several times any GPU's L2


def flush_mode() -> str:
    """How :func:`time_ms` flushes the L2: ``read`` (default) or ``zero`` (do_bench's)."""
    mode = os.environ.get("FASTLAB_BENCH_FLUSH", "read")
    if mode not in ("read", "zero"):
        raise ValueError(f"FASTLAB_BENCH_FLUSH must be 'read' or 'zero', got {mode!r}")
    return mode


def time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100,
            quantiles=(0.5, 0.2, 0.8)) -> List[float]:
    """Quantiles of ``fn``'s GPU time in ms, each repetition after an L2 flush (see above):
    warm-up and repetition counts from an estimate, as do_bench chooses them."""
    buffer = torch.zeros(_FLUSH_BYTES // 4, device="cuda", dtype=torch.int32)
    if flush_mode() == "zero":
        def flush():
            buffer.zero_()
    else:
        def flush():
            buffer.sum()  # reads every line; leaves none dirty
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup / estimate))):
        fn()
    n = max(1, int(rep / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = torch.tensor([a.elapsed_time(b) for a, b in zip(starts, ends)])
    return [float(v) for v in torch.quantile(times, torch.tensor(list(quantiles)))]


class Machine:
    """Measured capabilities of the current GPU: copy bandwidth and bf16 matmul throughput."""

    def __init__(self):
        dev = torch.cuda.current_device()
        self.name = torch.cuda.get_device_name(dev)
        n = 1 << 28  # 1 GiB of fp32: far beyond L2, so the copy streams from HBM
        src = torch.randn(n, device="cuda")
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), warmup=10, rep=50)[0]
        self.bandwidth = 2 * n * 4 / (ms * 1e-3)  # bytes/s, read + write
        del src, dst
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        ms = time_ms(lambda: a @ b, warmup=10, rep=50)[0]
        self.matmul_flops = 2 * 8192**3 / (ms * 1e-3)
        del a, b
        torch.cuda.empty_cache()

    def floor_ms(self, nbytes: float, flops: float) -> float:
        return 1e3 * max(nbytes / self.bandwidth, flops / self.matmul_flops)

    def describe(self) -> Dict[str, object]:
        import triton

        return {
            "gpu": self.name,
            "measured_bandwidth_gbps": self.bandwidth / 1e9,
            "measured_bf16_matmul_tflops": self.matmul_flops / 1e12,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "l2_flush": flush_mode(),
        }


class Recorder:
    """Collects records of one session and writes them, with peer ratios, as JSON."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.records: List[Record] = []

    def measure(self, op: str, case: str, mode: str, provider: str, fn: Callable[[], object],
                *, floor_bytes: float = 0.0, floor_flops: float = 0.0,
                flops: Optional[float] = None, shape: Optional[dict] = None,
                warmup: int = 25, rep: int = 100, calls: int = 1) -> Record:
        """Time ``fn`` and record it. ``flops`` (default ``floor_flops``) gives TFLOP/s.
        ``fn`` making ``calls`` calls of the op (a graph of several) records the time per call."""
        torch.cuda.empty_cache()  # what earlier cases left cached would fragment memory
        fn()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        med, p20, p80 = (t / calls for t in time_ms(fn, warmup=warmup, rep=rep))
        floor = self.machine.floor_ms(floor_bytes, floor_flops)
        work = floor_flops if flops is None else flops
        rec = Record(
            op=op, case=case, mode=mode, provider=provider, median_ms=med, p20_ms=p20,
            p80_ms=p80, peak_extra_mem_gb=peak, floor_bytes=floor_bytes,
            floor_flops=floor_flops, floor_ms=floor,
            ratio_to_floor=med / floor if floor > 0 else float("nan"),
            tflops=work / (med * 1e-3) / 1e12 if work else None,
            gbps=floor_bytes / (med * 1e-3) / 1e9 if floor_bytes else None,
            shape=dict(shape or {}, **({"calls_per_timing": calls} if calls > 1 else {})),
        )
        self.records.append(rec)
        return rec

    def _with_ratios(self) -> List[dict]:
        """Each record gains ``ratio_vs[peer] = peer_median / this_median`` for its case."""
        out = []
        for r in self.records:
            peers = [p for p in self.records if (p.op, p.case, p.mode) == (r.op, r.case, r.mode)
                     and p.provider != r.provider]
            r.ratio_vs = {p.provider: p.median_ms / r.median_ms for p in peers}
            out.append(asdict(r))
        return out

    def write(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "machine": self.machine.describe(), "records": self._with_ratios()}
        with open(path + ".tmp", "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(path + ".tmp", path)


def cuda_graph(fn: Callable[[], object], warmup: int = 3, calls: int = 1) -> Callable[[], None]:
    """``fn`` captured ``calls`` times in a row in one CUDA graph; the returned callable
    replays it.

    Replay launches the whole captured sequence at once, so its time is the GPU time of the
    kernels alone, without the per-kernel host launch cost: what a training step captured
    in a graph pays. Several calls in one graph also spread the graph's own launch (a few
    microseconds, as long as a small kernel) over them, as in a captured step where the op
    sits between others. ``fn`` must be warm (compiled, autotuned) and must not sync the
    host.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # autograd nodes remember the stream they were built on: a leaf first used eagerly on
    # the default stream makes the backward's final sync cross the capture boundary. Where
    # torch offers it, autograd redirects such stale streams to the capturing one.
    override = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
    current = getattr(torch._C, "_override_stale_capture_stream", None)
    previous = current() if current is not None else False
    if override is not None:
        override(True)
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    finally:
        if override is not None:
            override(previous)
    torch.cuda.synchronize()
    return graph.replay


def cuda_timer() -> float:
    """Timer for pytest-benchmark (``--benchmark-timer benches._harness.cuda_timer``): it
    synchronises, so each round's span covers the GPU work of its calls, and only there."""
    torch.cuda.synchronize()
    return time.perf_counter()
