"""Where the time of one attention training step goes, per kernel, for a few shapes.

    python3 -m benches.profile_attention [--cprofile] [B H S D dtype] ...

For each shape: the synchronising CUDA calls one forward + backward step makes (torch's
sync debug mode), the time to enqueue 20 steps and the time until they finish (close to
each other: the step is host-bound), the CUDA time of each kernel from the PyTorch
profiler, and the same for SDPA's default backend next to it. ``--cprofile`` adds the
Python functions that take the host time of fastlab's step (cProfile, by own time).
``--varlen`` adds, per shape, the packed call on the same tokens (every sequence S long)
and on pairs of lengths (a, S - a), half the padded batch, as bench_attention times them.
"""
import cProfile
import pstats
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from fastlab.ops.attention import attention, attention_varlen

DEFAULT = [(64, 4, 256, 16, "bfloat16"), (64, 4, 256, 16, "float32"),
           (1024, 8, 64, 4, "bfloat16"), (8, 16, 2048, 64, "bfloat16")]


def _step(fn, q, k, v, grad_out):
    return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)


def _report(name, fn, q, k, v, grad_out, iters=20):
    for _ in range(3):
        _step(fn, q, k, v, grad_out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(1)
    with warnings.catch_warnings(record=True) as syncs:
        warnings.simplefilter("always")
        _step(fn, q, k, v, grad_out)
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    start = time.perf_counter()
    for _ in range(iters):
        _step(fn, q, k, v, grad_out)
    enqueue_ms = (time.perf_counter() - start) * 1e3 / iters
    torch.cuda.synchronize()
    host_ms = (time.perf_counter() - start) * 1e3 / iters
    # launch-bound check: the same calls without waiting between them
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            _step(fn, q, k, v, grad_out)
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        cuda_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if cuda_us > 0 and event.count >= iters:
            rows.append((cuda_us / iters, event.count // iters, event.key[:70]))
    rows.sort(reverse=True)
    gpu_ms = sum(r[0] for r in rows) / 1e3
    print(f"  {name:8s} enqueue {enqueue_ms:7.3f} ms/step, done {host_ms:7.3f} ms/step, "
          f"kernels {gpu_ms:7.3f} ms/step, {len(syncs)} synchronising calls")
    for w in syncs[:3]:
        print(f"      sync: {str(w.message)[:120]} ({w.filename}:{w.lineno})")
    for us, count, key in rows[:8]:
        print(f"      {us:9.1f} us x{count}  {key}")


def _host_profile(fn, q, k, v, grad_out, iters=50):
    """The Python functions behind the host time of ``iters`` steps, by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iters):
        _step(fn, q, k, v, grad_out)
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


def main(argv):
    use_cprofile, use_varlen = "--cprofile" in argv, "--varlen" in argv
    argv = [a for a in argv if a not in ("--cprofile", "--varlen")]
    shapes = DEFAULT
    if argv:
        shapes = [(int(argv[i]), int(argv[i + 1]), int(argv[i + 2]), int(argv[i + 3]),
                   argv[i + 4]) for i in range(0, len(argv), 5)]
    for b, h, s, d, dtype in shapes:
        dt = getattr(torch, dtype)
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dt, generator=gen)
                   .requires_grad_() for _ in range(3))
        grad_out = torch.randn(b, h, s, d, device="cuda", dtype=dt, generator=gen)
        print(f"B{b} H{h} S{s} D{d} {dtype} causal")
        _report("fastlab", lambda a, b_, c: attention(a, b_, c, causal=True), q, k, v,
                grad_out)
        _report("sdpa", lambda a, b_, c: torch.nn.functional.scaled_dot_product_attention(
            a, b_, c, is_causal=True), q, k, v, grad_out)
        if use_cprofile:
            _host_profile(lambda a, b_, c: attention(a, b_, c, causal=True), q, k, v,
                          grad_out)
        if use_varlen:
            _varlen(b, h, s, d, dt, use_cprofile)


def _varlen(b, h, s, d, dt, use_cprofile):
    from benches.bench_attention import _pair_lengths

    for name, lengths in (("varlen-full", [s] * b), ("varlen-half", _pair_lengths(b, s))):
        cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
        gen = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (torch.randn(sum(lengths), h, d, device="cuda", dtype=dt, generator=gen)
                   .requires_grad_() for _ in range(3))
        grad_out = torch.randn_like(q)

        def fn(a, b_, c):
            return attention_varlen(a, b_, c, cu, cu, s, s, causal=True)

        _report(name, fn, q, k, v, grad_out)
        if use_cprofile:
            _host_profile(fn, q, k, v, grad_out)


if __name__ == "__main__":
    main(sys.argv[1:])
