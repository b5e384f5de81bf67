"""Does one attention training step wait on the GPU, and how long does its host part take?

    python3 -m benches.attention_host_sync [B H S D]

For the dense call and the packed call on the same tokens (every sequence S long), bf16,
causal: the synchronising CUDA calls one fwd + bwd step makes (torch's sync debug mode),
then the time to enqueue 20 steps against the time until they finish. A step whose
enqueue time is close to its time to completion is host-bound.
"""
import sys
import time
import warnings

import torch

from fastlab.ops.attention import attention, attention_varlen


def _steps(b, h, s, d):
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    cu = torch.arange(0, b * s + 1, s, device="cuda", dtype=torch.int32)
    qv, kv, vv = (torch.randn(b * s, h, d, device="cuda", dtype=torch.bfloat16,
                              requires_grad=True) for _ in range(3))
    gv = torch.randn_like(qv)

    def dense():
        return torch.autograd.grad(attention(q, k, v, causal=True), (q, k, v), g)

    def packed():
        return torch.autograd.grad(attention_varlen(qv, kv, vv, cu, cu, s, s, causal=True),
                                   (qv, kv, vv), gv)

    return {"dense": dense, "varlen": packed}


def main(argv):
    b, h, s, d = (int(a) for a in argv[:4]) if argv else (16, 16, 1024, 64)
    print(f"B{b} H{h} S{s} D{d} bf16 causal")
    for name, fn in _steps(b, h, s, d).items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
            torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(0)
        print(f"  {name}: {len(caught)} synchronising calls")
        for w in caught[:3]:
            print(f"    {str(w.message)[:160]} ({w.filename}:{w.lineno})")
        start = time.perf_counter()
        for _ in range(20):
            fn()
        enqueued = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        print(f"  {name}: enqueue {(enqueued - start) / 20 * 1e3:.3f} ms/step, "
              f"to completion {(done - start) / 20 * 1e3:.3f} ms/step")


if __name__ == "__main__":
    main(sys.argv[1:])
