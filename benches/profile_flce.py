"""Where the time of the fused linear cross-entropy goes, per kernel, and what the weight
gradient's running sum costs in each chunk.

    python3 -m benches.profile_flce [--json PATH]

Shape: N=16384 H=4096 V=128256 bf16, forward + backward (the bench's case). Part one: the
CUDA time per step of each kernel (PyTorch profiler) for the default mode, 8192-row chunks,
the low-memory mode and torch.compile of matmul + F.cross_entropy. Part two: one chunk's
weight-gradient product ``G^T @ X`` (G: rows x V, X: rows x H) timed alone, written fresh
and added into a running sum (bf16 and fp32), at the chunk sizes of both modes: the
difference is the read of the sum and its rounding, paid once a chunk.
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benches._harness import time_ms
from fastlab.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

N, H, V = 16384, 4096, 128256


def _kernels(step, iters=3):
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if us > 0:
            rows.append(dict(kernel=event.key[:90], ms_per_step=us / iters / 1e3,
                             calls_per_step=event.count / iters))
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows


def _grad_weight_pass(rows, acc_dtype):
    g = torch.randn(rows, V, device="cuda").to(torch.bfloat16)
    x = torch.randn(rows, H, device="cuda").to(torch.bfloat16)
    out = {}
    fresh = torch.empty(V, H, device="cuda", dtype=acc_dtype)
    if acc_dtype == torch.bfloat16:
        out["write_ms"] = time_ms(lambda: torch.mm(g.T, x, out=fresh))[0]
        out["add_ms"] = time_ms(lambda: fresh.addmm_(g.T, x))[0]
    else:
        out["write_ms"] = time_ms(lambda: torch.mm(g.T, x, out_dtype=torch.float32,
                                                   out=fresh))[0]
        out["add_ms"] = time_ms(lambda: torch.addmm(fresh, g.T, x, out_dtype=torch.float32,
                                                    out=fresh))[0]
    flops = 2.0 * rows * V * H
    out["tflops_write"] = flops / out["write_ms"] / 1e9
    out["tflops_add"] = flops / out["add_ms"] / 1e9
    out["sum_bytes"] = 2 * V * H * fresh.element_size()
    return out


def main(argv):
    path = argv[argv.index("--json") + 1] if "--json" in argv else None
    h = (torch.randn(N, H, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(V, H, device="cuda") * H ** -0.5).to(torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, V, (N,), device="cuda")
    compiled = torch.compile(lambda a, b, c: F.cross_entropy((a @ b.T).float(), c))
    variants = {
        "fastlab": lambda: fused_linear_cross_entropy(h, w, t),
        "fastlab-chunk8192": lambda: fused_linear_cross_entropy(h, w, t, chunk_size=8192),
        "fastlab-low-memory": lambda: fused_linear_cross_entropy(h, w, t, low_memory=True),
        "torch_compile": lambda: compiled(h, w, t),
    }
    report = dict(shape=dict(N=N, H=H, V=V, dtype="bfloat16"),
                  gpu=torch.cuda.get_device_name(), torch=torch.__version__, kernels={},
                  grad_weight_pass={})
    for name, fn in variants.items():
        rows = _kernels(lambda: torch.autograd.grad(fn(), (h, w)))
        report["kernels"][name] = rows
        total = sum(r["ms_per_step"] for r in rows)
        print(f"{name}: kernels {total:.2f} ms/step")
        for r in rows[:8]:
            print(f"    {r['ms_per_step']:8.3f} ms x{r['calls_per_step']:g}  {r['kernel']}")
    for rows, dtype in ((768, torch.bfloat16), (1024, torch.bfloat16), (4096, torch.float32),
                        (8192, torch.float32)):
        key = f"rows{rows}-{str(dtype).replace('torch.', '')}"
        report["grad_weight_pass"][key] = r = _grad_weight_pass(rows, dtype)
        print(f"grad_weight {key}: write {r['write_ms']:.3f} ms ({r['tflops_write']:.0f} "
              f"TFLOP/s), add {r['add_ms']:.3f} ms ({r['tflops_add']:.0f} TFLOP/s)")
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
