"""Host time of attention's Python layers alone, on the CPU: the kernel launches stubbed.

    python3 -m benches.attention_host_python [B H S D]

The op runs its kernel path (argument checks, the autograd Function, layout and launch
arguments, the launch cache's key, output allocation) on CPU tensors with compiled kernels
that do nothing, so what is timed is everything a GPU step's host side does except
Triton's launches and the CUDA allocator. Best of 5 x 1000 fwd + bwd steps, dense
(B, H, S, D) and packed (every sequence S long; offsets on the CPU, so their values are
checked), bf16, causal, each with the launch plans and with them turned off.
"""
import sys
import time

import torch


class _AnyConfig(dict):
    def get(self, key, default=None):
        return ({"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                {"BLOCK_M": 64, "BLOCK_N": 64})


class _NoKernel:
    def __getitem__(self, grid):
        return lambda *args: None


class _AnyCompiled(dict):
    def get(self, key, default=None):
        return _NoKernel(), ()


def _stub_launches(kernels):
    """Every launch finds a tuned configuration and a compiled kernel that does nothing, so
    ``_launch`` runs its whole direct-launch path (specialization key included) but the
    launch itself."""
    kernels.INTERPRETING = False
    kernels._BEST = _AnyConfig()
    kernels._COMPILED = _AnyCompiled()


def main(argv):
    import fastlab.kernels.attention  # noqa: F401  (the modules, not the functions)
    import fastlab.ops.attention  # noqa: F401

    ops = sys.modules["fastlab.ops.attention"]
    kernels = sys.modules["fastlab.kernels.attention"]
    ops._kernel_wanted = lambda *tensors: True
    _stub_launches(kernels)
    b, h, s, d = (int(a) for a in argv[:4]) if argv else (4, 4, 64, 64)
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    g = torch.randn_like(q)
    qp, kp, vp = (torch.randn(b * s, h, d, dtype=torch.bfloat16).requires_grad_()
                  for _ in range(3))
    gp = torch.randn_like(qp)
    cu = torch.arange(0, b * s + 1, s, dtype=torch.int32)

    def dense():
        return torch.autograd.grad(ops.attention(q, k, v, causal=True), (q, k, v), g)

    def packed():
        return torch.autograd.grad(ops.attention_varlen(qp, kp, vp, cu, cu, s, s, causal=True),
                                   (qp, kp, vp), gp)

    print(f"B{b} H{h} S{s} D{d} bf16 causal, {torch.get_num_threads()} threads")
    remember = kernels._remember
    for name, fn, plans in (("dense", dense, True), ("dense, plans off", dense, False),
                            ("varlen", packed, True), ("varlen, plans off", packed, False)):
        kernels._PLANS.clear()
        kernels._remember = remember if plans else (lambda key, plan: None)
        for _ in range(50):
            fn()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(1000):
                fn()
            best = min(best, (time.perf_counter() - start) / 1000 * 1e6)
        print(f"  {name}: {best:.1f} us per fwd + bwd step")


if __name__ == "__main__":
    main(sys.argv[1:])
