"""Host cost of the layers of one small attention training step, each timed alone.

    python3 -m benches.host_overhead [B H S D dtype]

On short sequences the GPU finishes a step's kernels in tens of microseconds, so what a
step costs is host time: the autograd engine, Python autograd.Function glue, Triton's
launcher. Each line times back-to-back calls of one layer (synchronised at the end only),
so it is the host time per call wherever that exceeds the GPU time.
"""
import sys
import time

import torch

from fastlab.kernels.attention import attention_backward, attention_forward
from fastlab.ops.attention import attention


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _per_call_us(fn, iters=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def main(argv):
    b, h, s, d = (int(a) for a in argv[:4]) if argv else (64, 4, 256, 16)
    dtype = getattr(torch, argv[4]) if len(argv) > 4 else torch.bfloat16
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    grad_out = torch.randn_like(q)
    scale = d ** -0.5
    out, lse = attention_forward(q, k, v, None, True, scale)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    x = torch.randn(16, device="cuda", requires_grad=True)
    rows = {
        "empty autograd.grad (Python Function)": lambda: torch.autograd.grad(
            _Identity.apply(x), x, x),
        "empty autograd.grad (C++ op)": lambda: torch.autograd.grad(x * 1, x, x),
        "forward kernel launch": lambda: attention_forward(q, k, v, None, True, scale),
        "backward kernel launches": lambda: attention_backward(
            grad_out, None, q, k, v, out, lse, None, True, scale),
        "fastlab forward (no grad)": lambda: attention(q.detach(), k.detach(), v.detach(),
                                                       causal=True),
        "fastlab forward + backward": lambda: torch.autograd.grad(
            attention(q, k, v, causal=True), (q, k, v), grad_out),
        "sdpa forward (no grad)": lambda: sdpa(q.detach(), k.detach(), v.detach(),
                                               is_causal=True),
        "sdpa forward + backward": lambda: torch.autograd.grad(
            sdpa(q, k, v, is_causal=True), (q, k, v), grad_out),
    }
    print(f"B{b} H{h} S{s} D{d} {dtype}: host us per call")
    for name, fn in rows.items():
        print(f"  {_per_call_us(fn):9.1f}  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
