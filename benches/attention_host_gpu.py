"""Host time of one attention forward on a GPU machine, against cuDNN through SDPA.

    python3 benches/attention_host_gpu.py

B16 H16 S1024 D64 bf16 causal (no autograd). "enqueue" is the wall time per call while the
GPU is held busy by a sleep kernel, so the calls only queue: the host's time alone. The
same call is then timed by triton.testing.do_bench (eager, twice) and do_bench_cudagraph
(graph replays, the GPU alone): where enqueue exceeds the GPU time, eager timings measure
the host.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlab.ops._dispatch import backend  # noqa: E402
from fastlab.ops.attention import attention  # noqa: E402


def enqueue_us(fn, calls: int = 200, rounds: int = 3, sleep_cycles: int = 800_000_000) -> float:
    """Best of ``rounds``: microseconds per call while a GPU sleep of ``sleep_cycles`` clock
    cycles (~0.4 s by default) runs ahead."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda._sleep(sleep_cycles)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def main():
    q, k, v = (torch.randn(16, 16, 1024, 64, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))

    def fastlab_fwd():
        with backend("kernel"):
            return attention(q, k, v, causal=True)

    def cudnn_fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with torch.no_grad():
        for name, fn in (("fastlab", fastlab_fwd), ("cudnn", cudnn_fwd)):
            fn()
            eager = [do_bench(fn, warmup=10, rep=50) for _ in range(2)]
            graph = do_bench_cudagraph(fn, rep=50)
            print(f"{name}: enqueue {enqueue_us(fn):.1f} us; eager do_bench "
                  f"{eager[0] * 1e3:.1f} / {eager[1] * 1e3:.1f} us; graph {graph * 1e3:.1f} us",
                  flush=True)


if __name__ == "__main__":
    main()
