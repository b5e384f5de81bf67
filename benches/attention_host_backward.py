"""Where the host time of an eager attention fwd+bwd goes, on a GPU machine, against cuDNN.

    python3 benches/attention_host_backward.py --out DIR [--shapes NAME]

One shape of attention_passes.py (default B16-H16-S1024-D64, bf16 causal, the shape whose
eager fwd+bwd trailed its graph replay; GPT2-B16-H12-S1024-D64-qkv reads views). Each
call is timed while the GPU is held busy by a sleep kernel, so calls only queue: the host's
time alone (a call that waits for the GPU shows up as the sleep's length). Timers wrapped
around the layers of fastlab's backward split its host time: the autograd call as a
whole, the backward custom op (dispatch and launcher), the kernel launcher, and the
kernel launches (through _launch, or from a launch plan). fastlab runs twice: with its
launch plans and with them turned off (every call takes the full launch path).
Writes DIR/attention_host_backward.json.
"""
import json
import os
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastlab.kernels.attention as kernels  # noqa: E402
import fastlab.ops.attention  # noqa: E402,F401
from benches.attention_passes import (SHAPES, bench_args, make_inputs, run_meta,  # noqa: E402
                                      warm_up)
from fastlab.ops._dispatch import backend  # noqa: E402

SPENT = defaultdict(float)
CALLS = defaultdict(int)


def timed(label, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - start
            CALLS[label] += 1
    return wrapper


def enqueue(fn, calls: int = 100):
    """Microseconds per call (best of three rounds) while a GPU sleep runs ahead, and the
    per-layer split of the best round: (microseconds per call of a layer, its calls)."""
    fn()
    torch.cuda.synchronize()
    best, split = float("inf"), {}
    for _ in range(3):
        SPENT.clear()
        CALLS.clear()
        torch.cuda._sleep(1_500_000_000)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        took = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
        if took < best:
            best = took
            split = {k: (SPENT[k] / max(CALLS[k], 1) * 1e6, CALLS[k]) for k in SPENT}
    return best, split


def main():
    args = bench_args(__doc__)
    ops_attention = sys.modules["fastlab.ops.attention"]  # the package exports the function
    meta = run_meta("host microseconds per call, GPU held busy by torch.cuda._sleep")
    print(meta, flush=True)
    warm_up()
    if len(args.shapes or ()) > 1:
        raise SystemExit(f"{os.path.basename(__file__)}: error: --shapes: one name, got "
                         f"{len(args.shapes)}")
    shape_name = (args.shapes or ["B16-H16-S1024-D64"])[0]
    shape = next(s for s in SHAPES if s[0] == shape_name)
    meta["shape"] = shape_name
    q, k, v, grad = make_inputs(*shape[1:])
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def fastlab():
        with backend("kernel"):
            return ops_attention.attention(*leaves, causal=True)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(*leaves, is_causal=True)

    # the layers of fastlab's backward, outermost first
    ops_attention._attention_bwd = timed("backward custom op", ops_attention._attention_bwd)
    kernels.attention_backward = timed("kernel launcher", kernels.attention_backward)
    kernels._launch = timed("one kernel launch (_launch)", kernels._launch)
    kernels._DirectLaunch.__call__ = timed("one planned kernel launch",
                                           kernels._DirectLaunch.__call__)
    remember = kernels._remember
    kernels.attention_forward = timed("forward launcher", kernels.attention_forward)

    rows = []
    for name, fn in (("fastlab", fastlab), ("fastlab-no-plans", fastlab), ("cudnn", cudnn)):
        kernels._PLANS.clear()
        kernels._remember = remember if name != "fastlab-no-plans" else lambda key, plan: None

        def fwd():
            with torch.no_grad():
                fn()

        out_box = {}

        def fwd_graph():
            out_box["out"] = fn()

        def bwd():
            out_box["out"].backward(grad)
            for leaf in leaves:
                leaf.grad = None

        def fwd_bwd():
            fn().backward(grad)
            for leaf in leaves:
                leaf.grad = None

        fwd_bwd()
        row = dict(provider=name, shape=meta["shape"])
        row["fwd_us"], row["fwd_split"] = enqueue(fwd)
        row["fwd_bwd_us"], row["fwd_bwd_split"] = enqueue(fwd_bwd)
        # the backward alone: a fresh graph per call, its forward outside the timing
        total, parts = 0.0, defaultdict(float)
        for _ in range(3):
            torch.cuda.synchronize()
            torch.cuda._sleep(1_500_000_000)
            took = []
            for _ in range(50):
                fwd_graph()
                SPENT.clear()
                start = time.perf_counter()
                bwd()
                took.append(time.perf_counter() - start)
                for key, val in SPENT.items():
                    parts[key] += val
            took.sort()
            total += took[len(took) // 2]
            torch.cuda.synchronize()
        row["bwd_us_median"] = total / 3 * 1e6
        row["bwd_split"] = {key: val / 150 * 1e6 for key, val in parts.items()}
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    path = ("attention_host_backward.json" if shape_name == "B16-H16-S1024-D64"
            else f"attention_host_backward_{shape_name}.json")
    with open(os.path.join(args.out, path), "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
