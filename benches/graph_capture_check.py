"""Capture one attention training step in a CUDA graph, per dtype, and report what ran.

    TRITON_PRINT_AUTOTUNING=1 python3 -m benches.graph_capture_check [B H S D]

A step that works eagerly but fails to capture usually did something during capture that
a graph cannot hold (a host sync, a first-time kernel load, work on the legacy stream);
the autotuning log shows whether tuning ran inside the capture.
"""
import sys
import traceback

import torch

from benches._harness import cuda_graph
from fastlab.ops.attention import attention


def main(argv):
    b, h, s, d = (int(a) for a in argv) if argv else (64, 4, 256, 16)
    failed = 0
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad_out = torch.randn_like(q)

        def step():
            return torch.autograd.grad(attention(q, k, v, causal=True), (q, k, v), grad_out)

        step()
        torch.cuda.synchronize()
        print(f"{dtype}: eager step done; capturing", flush=True)
        try:
            replay = cuda_graph(step)
            replay()
            torch.cuda.synchronize()
            print(f"{dtype}: captured and replayed", flush=True)
        except Exception:  # report, and go on with the next dtype
            traceback.print_exc()
            print(f"{dtype}: capture FAILED", flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
