"""GPU time of attention without host time: fastlab's forward at fixed tile configurations
beside the probe kernel of attention_hopper_probe.py at the same ones, and fwd+bwd of
fastlab (autotuned) against SDPA cuDNN and flash, all replayed from CUDA graphs.

    python3 benches/attention_configs.py --out DIR [--shapes NAME ...]

Eager timings of short kernels measure the host when it is slower than the GPU; graph
replays (triton.testing.do_bench_cudagraph medians) measure the GPU alone, which is what a
training step captured in a graph pays. Writes DIR/attention_configs.json.
"""
import json
import os
import sys

import torch
import triton
from torch.nn.attention import SDPBackend
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastlab.kernels.attention as kernels  # noqa: E402
from benches.attention_hopper_probe import _probe_rot, probe_fn  # noqa: E402
from benches.attention_passes import SHAPES, fastlab_fn as fastlab, make_inputs  # noqa: E402
from benches.attention_passes import bench_start, sdpa_fn as sdpa  # noqa: E402

CONFIGS = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
           (64, 64, 4, 2), (64, 32, 4, 3), (64, 128, 4, 3)]


def forced(bm, bn, warps, stages):
    """fastlab's forward with its tuning replaced by one configuration."""
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps,
                           num_stages=stages)

    def run(q, k, v):
        for key in [key for key in kernels._BEST if key[0] is kernels._fwd_kernel]:
            kernels._BEST[key] = (dict(config.all_kwargs()), dict(config.kwargs))
        kernels.forget_compiled()
        return fastlab(q, k, v)
    return run


def graph_ms(fn):
    return do_bench_cudagraph(fn, rep=50)


def main():
    args, meta = bench_start(__doc__, "bf16 causal; do_bench_cudagraph medians (ms); "
                             "TFLOP/s 4*B*H*S^2*D/2 fwd, 3.5x that fwd+bwd")
    results = []
    for name, b, h, s, d, layout, dtype in SHAPES[:4]:
        if args.shapes and name not in args.shapes:
            continue
        q, k, v, grad = make_inputs(b, h, s, d, layout, dtype)
        flops = 4.0 * b * h * s * s * d * 0.5
        print(f"== {name}", flush=True)
        with torch.no_grad():
            fastlab(q, k, v)  # autotune first, so that forced() finds the key
            rows = [("fastlab tuned", fastlab)]
            rows += [(f"fastlab {c}", forced(*c)) for c in CONFIGS]
            rows += [(f"probe {c}", probe_fn(_probe_rot, *c, False)) for c in CONFIGS
                     if c[0] % c[1] == 0]
            rows += [("sdpa cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)),
                     ("sdpa flash", sdpa(SDPBackend.FLASH_ATTENTION))]
            for label, fn in rows:
                row = dict(shape=name, provider=label, pass_="fwd")
                try:
                    fn(q, k, v)  # compile outside the graph
                    if label.startswith("fastlab ("):
                        fn = fastlab  # the forced configuration stays in _BEST
                    row["ms"] = graph_ms(lambda: fn(q, k, v))
                    row["tflops"] = flops / row["ms"] * 1e-9
                    print(f"  fwd {label:28s} {row['tflops']:6.1f} ({row['ms']:.3f} ms)",
                          flush=True)
                except Exception as exc:
                    row["exception"] = f"{type(exc).__name__}: {exc}"[-300:]
                    print(f"  fwd {label:28s} failed: {row['exception'][-120:]}", flush=True)
                results.append(row)
        # back to the tuned forward for fwd+bwd
        kernels.forget_tuning()
        for label, fn in (("fastlab", fastlab), ("sdpa cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)),
                          ("sdpa flash", sdpa(SDPBackend.FLASH_ATTENTION))):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def step():
                for t in leaves:
                    t.grad = None
                fn(*leaves).backward(grad)
            step()
            row = dict(shape=name, provider=label, pass_="fwd+bwd")
            row["ms"] = graph_ms(step)
            row["tflops"] = 3.5 * flops / row["ms"] * 1e-9
            print(f"  fwd+bwd {label:24s} {row['tflops']:6.1f} ({row['ms']:.3f} ms)",
                  flush=True)
            results.append(row)
        with open(os.path.join(args.out, "attention_configs.json"), "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
