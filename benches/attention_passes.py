"""Attention forward, backward and both on a GPU: fastlab's kernels against SDPA's cuDNN and
flash backends (bf16, causal), each pass timed on its own.

    python3 benches/attention_passes.py --out DIR [--shapes NAME ...]

Shapes: the three training shapes of the attention targets, GPT-2's (q, k, v as views of a
(B, S, 3, H, D) projection) and the small-head shapes of the research logs. Each provider
is first checked against float32 SDPA on the first batch row (output and the three
gradients); one out of tolerance is reported and not timed. Then the forward (no
autograd), fwd+bwd (gradients reset between repetitions) and the backward alone (the
same graph's backward, retained) are timed as triton.testing.do_bench medians. TFLOP/s
count 4 * B * H * S^2 * D forward flops, halved for causal; the backward 2.5 times that.
The GPU runs a few seconds of matmuls first so that no provider is timed at idle clocks.
Writes DIR/attention_passes.json.
"""
import argparse
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlab.ops._dispatch import backend  # noqa: E402
import fastlab.kernels.attention as kernels  # noqa: E402
from fastlab.ops.attention import attention  # noqa: E402

#: (name, B, H, S, D, layout, dtype); layout "qkv": views of one (B, S, 3, H, D) tensor
SHAPES = [("B4-H16-S4096-D128", 4, 16, 4096, 128, "bhsd", torch.bfloat16),
          ("B8-H16-S2048-D64", 8, 16, 2048, 64, "bhsd", torch.bfloat16),
          ("B16-H16-S1024-D64", 16, 16, 1024, 64, "bhsd", torch.bfloat16),
          ("GPT2-B16-H12-S1024-D64-qkv", 16, 12, 1024, 64, "qkv", torch.bfloat16),
          ("B64-H4-S256-D16-bf16", 64, 4, 256, 16, "bhsd", torch.bfloat16),
          ("B1024-H8-S64-D4-bf16", 1024, 8, 64, 4, "bhsd", torch.bfloat16)]
OUT_TOL, GRAD_REL_TOL = 3e-2, 3e-2


def make_inputs(b, h, s, d, layout, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    if layout == "qkv":
        qkv = torch.randn(b, s, 3, h, d, device="cuda", generator=gen).to(dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", generator=gen).to(dtype)
                   for _ in range(3))
    return q, k, v, torch.randn(b, h, s, d, device="cuda", generator=gen).to(dtype)


def fastlab_fn(q, k, v):
    with backend("kernel"):
        return attention(q, k, v, causal=True)


def sdpa_fn(which):
    def run(q, k, v):
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


PROVIDERS = {"fastlab": fastlab_fn,
             "sdpa cudnn": sdpa_fn(SDPBackend.CUDNN_ATTENTION),
             "sdpa flash": sdpa_fn(SDPBackend.FLASH_ATTENTION)}


def reference(q, k, v, grad):
    x = [t[:1].detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*x, is_causal=True)
    out.backward(grad[:1].float())
    return out.detach(), [t.grad for t in x]


def check(fn, q, k, v, grad, ref):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    errs = [float((out[:1].float() - ref[0]).abs().max())]
    ok = errs[0] <= OUT_TOL
    for leaf, want in zip(leaves, ref[1]):
        err = float((leaf.grad[:1].float() - want).abs().max())
        errs.append(err)
        ok = ok and err <= GRAD_REL_TOL * float(want.abs().max()) and bool(
            leaf.grad.isfinite().all())
    return errs, bool(ok)


def time_provider(fn, q, k, v, grad):
    with torch.no_grad():
        fwd = do_bench(lambda: fn(q, k, v), warmup=10, rep=50)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step():
        fn(*leaves).backward(grad)
    full = do_bench(step, warmup=10, rep=50, grad_to_none=leaves)
    out = fn(*leaves)
    bwd = do_bench(lambda: out.backward(grad, retain_graph=True), warmup=10, rep=50,
                   grad_to_none=leaves)
    return fwd, full, bwd


def tuned_configs() -> dict:
    """The configurations fastlab's autotuner picked so far, per kernel and key."""
    found = {}
    for (kernel, key), (all_kwargs, _) in kernels._BEST.items():
        found[f"{kernel.fn.__name__} {key[2:]}"] = {
            n: all_kwargs[n] for n in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
            if n in all_kwargs}
    return found


def run_meta(note: str) -> dict:
    """The GPU and versions a result was measured with, and how it was timed."""
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(), note=note)


def bench_args(doc: str, options=None):
    """--out DIR (created) and --shapes NAME ... (names of SHAPES; default: all), and the
    flags ``options(parser)`` adds for one bench."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="names of the shapes to run (default: all)")
    if options is not None:
        options(parser)
    args = parser.parse_args()
    known = [s[0] for s in SHAPES]
    unknown = [n for n in args.shapes or () if n not in known]
    if unknown:
        parser.error(f"--shapes: unknown names {unknown}; known: {known}")
    os.makedirs(args.out, exist_ok=True)
    return args


def bench_start(doc: str, note: str, options=None):
    """The parsed arguments (see bench_args) and the run's record (see run_meta), printed,
    once the GPU has been warmed up."""
    args = bench_args(doc, options)
    meta = run_meta(note)
    print(meta, flush=True)
    warm_up()
    return args, meta


def warm_up(seconds: float = 3.0):
    """Matmuls until ``seconds`` have passed: clocks up before the first timing."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(20):
            a @ a
        end.record()
        end.synchronize()
        if start.elapsed_time(end) > seconds * 1e3:
            return


def main():
    args = bench_args(__doc__)
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes]
    meta = run_meta("do_bench medians (ms); TFLOP/s: 4*B*H*S^2*D/2 fwd, 2.5x bwd")
    print(meta, flush=True)
    warm_up()
    results = []
    for name, b, h, s, d, layout, dtype in shapes:
        q, k, v, grad = make_inputs(b, h, s, d, layout, dtype)
        ref = reference(q, k, v, grad)
        fwd_flops = 4.0 * b * h * s * s * d * 0.5
        print(f"== {name}", flush=True)
        for label, fn in PROVIDERS.items():
            row = dict(shape=name, provider=label)
            try:
                errs, ok = check(fn, q, k, v, grad, ref)
                row.update(errors=errs, ok=ok)
                if ok:
                    fwd, full, bwd = time_provider(fn, q, k, v, grad)
                    row.update(fwd_ms=fwd, fwd_bwd_ms=full, bwd_ms=bwd,
                               fwd_tflops=fwd_flops / fwd * 1e-9,
                               fwd_bwd_tflops=3.5 * fwd_flops / full * 1e-9,
                               bwd_tflops=2.5 * fwd_flops / bwd * 1e-9)
            except Exception as exc:  # a backend that does not run this shape
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
            results.append(row)
            if "fwd_ms" in row:
                print(f"  {label:18s} fwd {row['fwd_tflops']:6.1f} ({row['fwd_ms']:.3f} ms)"
                      f"  fwd+bwd {row['fwd_bwd_tflops']:6.1f} ({row['fwd_bwd_ms']:.3f} ms)"
                      f"  bwd {row['bwd_tflops']:6.1f} ({row['bwd_ms']:.3f} ms)"
                      f"  err {' '.join('%.1e' % e for e in row['errors'])}", flush=True)
            else:
                print(f"  {label:18s} not timed: {row.get('error') or row.get('errors')}",
                      flush=True)
        tuned = tuned_configs()
        print(f"  tuned: {tuned}", flush=True)
        results.append(dict(shape=name, provider="fastlab tuned configs", configs=tuned))
        with open(os.path.join(args.out, "attention_passes.json"), "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    print("== ratios to cuDNN", flush=True)
    for name, *_ in shapes:
        rows = {r["provider"]: r for r in results if r["shape"] == name and "fwd_ms" in r}
        if "sdpa cudnn" not in rows:
            continue
        base = rows["sdpa cudnn"]
        for label in ("fastlab", "sdpa flash"):
            if label in rows:
                r = rows[label]
                print(f"  {name:28s} {label:18s} fwd {base['fwd_ms'] / r['fwd_ms']:.3f}x"
                      f"  fwd+bwd {base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.3f}x"
                      f"  bwd {base['bwd_ms'] / r['bwd_ms']:.3f}x", flush=True)


if __name__ == "__main__":
    main()
