"""Whether host work costs more on autograd's device thread than on the main thread.

    python3 benches/attention_host_thread.py --out DIR

The eager attention backward runs on the thread autograd keeps for the GPU; its launches
timed there cost several times what the forward's cost on the main thread. This bench runs
the same pieces of host work on both threads while a sleep kernel holds the GPU (so calls
only queue): a pure-Python loop, tensor metadata reads, the current device and stream, a
small allocation, a tiny PyTorch kernel, and fastlab's planned attention forward launch
(B16 H16 S1024 D64 bf16 causal). On the device thread the work runs inside the backward
of an autograd Function. Microseconds per repetition, best of five rounds after one
untimed call.
Writes DIR/attention_host_thread.json.
"""
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastlab.kernels.attention as kernels  # noqa: E402
from benches.attention_host_gpu import enqueue_us  # noqa: E402
from benches.attention_passes import bench_start, make_inputs  # noqa: E402
from fastlab.ops._dispatch import backend  # noqa: E402
from fastlab.ops.attention import attention  # noqa: E402

REPS = 100


def pieces(q, k, v):
    """(name, callable) of the host work timed on each thread."""
    plan = next(p for key, p in kernels._PLANS.items() if key[0] == "fwd")
    launch, lse_shape = plan
    out = torch.empty_like(q)
    lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    tensors = (q, k, v, out, lse, lse, lse, lse, lse)
    driver = triton.runtime.driver.active
    small = torch.ones(8, device="cuda")

    def python_loop():
        total = 0
        for i in range(100):
            total += i
        return total

    return [
        ("python loop of 100 additions", python_loop),
        ("13 data_ptr reads", lambda: [t.data_ptr() for t in (*tensors, q, k, v, out)]),
        ("shape and stride of 3 tensors", lambda: [(t.shape, t.stride()) for t in (q, k, v)]),
        ("current device and stream", lambda: driver.get_current_stream(
            driver.get_current_device())),
        ("empty_like of q", lambda: torch.empty_like(q)),
        ("a tiny PyTorch kernel (add_)", lambda: small.add_(1.0)),
        ("planned attention forward launch", lambda: launch(tensors, 0)),
        ("attention forward call (no grad)", lambda: attention(q, k, v, causal=True)),
    ]


def time_all(work) -> dict:
    """Microseconds per repetition of each piece, best of five rounds, the GPU held."""
    return {name: enqueue_us(fn, REPS, rounds=5, sleep_cycles=200_000_000)
            for name, fn in work}


class _OnDeviceThread(torch.autograd.Function):
    """Runs ``work`` in its backward, on autograd's device thread."""

    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        import threading

        box = ctx.box
        box["thread"] = threading.current_thread().name
        with torch.no_grad(), backend("kernel"):
            box["times"] = time_all(box["work"])
        return grad, None


def main():
    args, meta = bench_start(__doc__, "host microseconds per repetition, GPU held by a sleep")
    q, k, v, _ = make_inputs(16, 16, 1024, 64, "bhsd", torch.bfloat16)
    with torch.no_grad(), backend("kernel"):
        for _ in range(4):  # tune, compile, launch directly, plan
            attention(q, k, v, causal=True)
    torch.cuda.synchronize()
    work = pieces(q, k, v)
    with torch.no_grad(), backend("kernel"):
        main_times = time_all(work)
    x = torch.ones(4, device="cuda", requires_grad=True)
    box = dict(work=work)
    _OnDeviceThread.apply(x, box).sum().backward()
    torch.cuda.synchronize()
    rows = [dict(piece=name, main_us=main_times[name], device_thread_us=box["times"][name],
                 ratio=box["times"][name] / main_times[name]) for name, _ in work]
    for row in rows:
        print(f"  {row['piece']:38s} main {row['main_us']:8.2f} us   device thread "
              f"{row['device_thread_us']:8.2f} us   x{row['ratio']:.2f}", flush=True)
    meta["device_thread"] = box["thread"]
    with open(os.path.join(args.out, "attention_host_thread.json"), "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
