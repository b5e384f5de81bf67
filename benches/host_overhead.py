"""Host cost of the layers of one small training step of an op, each timed alone.

    python3 -m benches.host_overhead [B H S D dtype]          # attention
    python3 -m benches.host_overhead cross_entropy [N V]      # cross-entropy (+ profile)

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


def cross_entropy_rows(argv):
    """The cross-entropy step's layers, then where the host time of fwd + bwd goes."""
    import cProfile
    import pstats

    import torch.nn.functional as F

    from fastlab.kernels import cross_entropy as K
    from fastlab.ops.cross_entropy import cross_entropy

    n, v = (int(a) for a in argv[:2]) if argv else (64, 1024)
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, v, (n,), device="cuda")
    grad = torch.empty_like(x)
    scale, n_valid = K.count_valid(t, -100, True)
    rows_loss, rows_z = K.cross_entropy_forward(x.detach(), t, grad, scale, -100, 0.0, 0.0)
    one = torch.ones((), device="cuda")
    from fastlab.ops.cross_entropy import _CrossEntropy, _forward_impl, scale_grad_
    args = (-100, 0.0, 0.0, "mean", False)
    kept = _CrossEntropy.apply(x, t, *args, False)[0]
    small = torch.randn(16, device="cuda", requires_grad=True)
    rows = {
        "empty autograd.grad (Python Function)": lambda: torch.autograd.grad(
            _Identity.apply(small), small, small),
        "empty autograd.grad (C++ op)": lambda: torch.autograd.grad(small * 1, small, small),
        "_forward_impl (3 launches)": lambda: _forward_impl(x.detach(), t, grad, *args),
        "_CrossEntropy.apply forward (grad on)": lambda: _CrossEntropy.apply(x, t, *args,
                                                                              False),
        "backward alone (retain_graph)": lambda: torch.autograd.grad(kept, x,
                                                                     retain_graph=True),
        "scale_grad_ (factor 1)": lambda: scale_grad_(grad, one),
        "torch.empty like the logits": lambda: torch.empty(x.shape, dtype=x.dtype,
                                                          device=x.device),
        "count_valid launch": lambda: K.count_valid(t, -100, True),
        "cross_entropy_forward launch": lambda: K.cross_entropy_forward(
            x.detach(), t, grad, scale, -100, 0.0, 0.0),
        "reduce_rows launch": lambda: K.reduce_rows(rows_loss, rows_z, n_valid, True),
        "scale_rows_ launch": lambda: K.scale_rows_(grad, one),
        "fastlab forward (no grad)": lambda: cross_entropy(x.detach(), t),
        "fastlab forward + backward": lambda: torch.autograd.grad(cross_entropy(x, t), x),
        "F.cross_entropy fp32 forward + backward": lambda: torch.autograd.grad(
            F.cross_entropy(x.float(), t), x),
    }
    print(f"cross-entropy N{n} V{v} bf16: host us per call")
    for name, fn in rows.items():
        print(f"  {_per_call_us(fn):9.1f}  {name}")
    step = rows["fastlab forward + backward"]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # a thread waiting for the GIL gets it sooner
    print(f"  {_per_call_us(step):9.1f}  fastlab forward + backward, GIL switch interval 10 us")
    sys.setswitchinterval(interval)
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            step()
        torch.cuda.synchronize()
    print("fastlab forward + backward, 50 steps, torch profiler by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        step()
    profile.disable()
    torch.cuda.synchronize()
    print("fastlab forward + backward, 200 steps, by own time:")
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


def main(argv):
    if argv and argv[0] == "cross_entropy":
        return cross_entropy_rows(argv[1:])
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
    # the same two rows through Triton's own launch path instead of the compiled kernels
    from fastlab.kernels import attention as K
    K.DIRECT_LAUNCH = False
    try:
        for name in ("backward kernel launches", "fastlab forward + backward"):
            print(f"  {_per_call_us(rows[name]):9.1f}  {name}, Triton's launch path")
    finally:
        K.DIRECT_LAUNCH = True


if __name__ == "__main__":
    main(sys.argv[1:])
