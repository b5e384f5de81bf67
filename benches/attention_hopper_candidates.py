"""Attention on an H200: every Hopper kernel candidate against the portable kernels, SDPA's
cuDNN and flash backends, on the training shapes (bf16, causal).

    python3 benches/attention_hopper_candidates.py --out DIR

For each shape, each provider is first checked against float32 SDPA on the first batch
row (forward output and the three gradients, max abs error printed); a provider out of
tolerance is reported and not timed. Then fwd (no autograd) and fwd+bwd (gradients reset
between repetitions) are timed with triton.testing.do_bench medians. TFLOP/s count
4 * B * H * S^2 * D forward flops, halved for causal; fwd+bwd counts 3.5 times that.
Hopper candidates: each forward configuration; each dK/dV and each dQ configuration
(the other kernel autotuned); dQ by atomics; rank-4 descriptors with the tuned tiles.
Any failing candidate (compile error, out of shared memory) is reported and skipped.
Writes DIR/attention_hopper_candidates.json. A time budget (--budget seconds) skips
what is left once spent, so the run ends in time on one GPU.
"""
import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlab.kernels import attention_hopper as hopper  # noqa: E402
from fastlab.ops._dispatch import backend  # noqa: E402
from fastlab.ops.attention import attention  # noqa: E402

#: (name, B, H, S, D, layout): layout "qkv" is q, k, v as views of a (B, S, 3, H, D)
#: projection, as GPT-2 makes them.
SHAPES = [("B4-H16-S4096-D128", 4, 16, 4096, 128, "bhsd"),
          ("B8-H16-S2048-D64", 8, 16, 2048, 64, "bhsd"),
          ("B16-H16-S1024-D64", 16, 16, 1024, 64, "bhsd"),
          ("GPT2-B16-H12-S1024-D64-qkv", 16, 12, 1024, 64, "qkv")]
DTYPE = torch.bfloat16
#: Max abs error against float32 allowed: O in bf16; gradients relative to their max.
OUT_TOL, GRAD_REL_TOL = 3e-2, 3e-2
#: Atomic-dQ candidates: the dK/dV tiles that suit it (a 64-row query step per atomic).
ATOMIC_DKDV = [(64, 128, 8, 2, False), (64, 128, 8, 2, True)]


def log(msg):
    print(msg, flush=True)


def make_inputs(b, h, s, d, layout):
    gen = torch.Generator(device="cuda").manual_seed(0)
    if layout == "qkv":
        qkv = torch.randn(b, s, 3, h, d, device="cuda", dtype=torch.float32, generator=gen)
        qkv = qkv.to(DTYPE)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", generator=gen).to(DTYPE)
                   for _ in range(3))
    grad = torch.randn(b, h, s, d, device="cuda", generator=gen).to(DTYPE)
    return q, k, v, grad


def fastlab_fn(q, k, v):
    with backend("kernel"):
        return attention(q, k, v, causal=True)


def sdpa_fn(which):
    def run(q, k, v):
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def reference(q, k, v, grad):
    """float32 SDPA on the first batch row: output and gradients."""
    x = [t[:1].detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*x, is_causal=True)
    out.backward(grad[:1].float())
    return out.detach(), [t.grad for t in x]


def check(fn, q, k, v, grad, ref):
    """Max abs errors (out, dq, dk, dv) on the first batch row, and whether all pass."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # same strides as given
    out = fn(*leaves)
    out.backward(grad)
    ref_out, ref_grads = ref
    errs = [float((out[:1].float() - ref_out).abs().max())]
    ok = errs[0] <= OUT_TOL
    for leaf, rg in zip(leaves, ref_grads):
        err = float((leaf.grad[:1].float() - rg).abs().max())
        errs.append(err)
        ok = ok and err <= GRAD_REL_TOL * float(rg.abs().max()) and leaf.grad.isfinite().all()
    return errs, bool(ok)


def time_modes(fn, q, k, v, grad, modes):
    """Median ms of each mode: 'fwd' without autograd, 'fwd+bwd' with gradients reset."""
    result = {}
    if "fwd" in modes:
        with torch.no_grad():
            result["fwd"] = do_bench(lambda: fn(q, k, v), warmup=10, rep=40)
    if "fwd+bwd" in modes:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def step():
            fn(*leaves).backward(grad)
        result["fwd+bwd"] = do_bench(step, warmup=10, rep=40, grad_to_none=leaves)
    return result


def configure(hopper_on=True, forced=None, atomic=False, flat=True):
    hopper.HOPPER = hopper_on
    hopper.FORCED.clear()
    hopper.FORCED.update(forced or {})
    hopper.DQ_ATOMIC = atomic
    hopper.FLAT_DESCRIPTORS = flat


def tuned_configs(s, d):
    """The configurations autotuning chose for this shape (flat descriptors, causal)."""
    bucket = triton.next_power_of_2(s)
    base = (DTYPE, bucket, bucket, d, True, True)
    found = {}
    for name, key in (("fwd", base), ("dkdv", base + (False,)), ("dq", base + (False,))):
        best = hopper._BEST.get((name, key))
        if best is not None:
            kw, launch = best
            found[name] = hopper.make_config(kw["BLOCK_M"], kw["BLOCK_N"], launch["num_warps"],
                                             launch["num_stages"], kw["WARP_SPEC"])
    return found


def label(c):
    return "%dx%d w%d s%d%s" % (*c[:4], " ws" if c[4] else "")


def providers():
    """(name, callable, setup kwargs, modes, group) in run order; group 'hopper' competes
    for best."""
    both = ("fwd", "fwd+bwd")
    rows = [("fallback (portable kernels)", fastlab_fn, dict(hopper_on=False), both, "ref"),
            ("hopper autotuned", fastlab_fn, {}, both, "hopper")]
    for c in hopper._FWD_CANDIDATES:
        rows.append(("hopper fwd " + label(c), fastlab_fn,
                     dict(forced={"fwd": hopper.make_config(*c)}), ("fwd",), "hopper"))
    for c in hopper._DKDV_CANDIDATES:
        rows.append(("hopper dkdv " + label(c) + " (dq tuned)", fastlab_fn,
                     dict(forced={"dkdv": hopper.make_config(*c)}), ("fwd+bwd",), "hopper"))
    for c in hopper._DQ_CANDIDATES:
        rows.append(("hopper dq " + label(c) + " (dkdv tuned)", fastlab_fn,
                     dict(forced={"dq": hopper.make_config(*c)}), ("fwd+bwd",), "hopper"))
    for c in ATOMIC_DKDV:
        rows.append(("hopper atomic-dq dkdv " + label(c), fastlab_fn,
                     dict(forced={"dkdv": hopper.make_config(*c)}, atomic=True),
                     ("fwd+bwd",), "hopper"))
    rows.append(("hopper rank-4 descriptors (tuned tiles)", fastlab_fn,
                 dict(forced=None, flat=False, tuned_tiles=True), both, "hopper"))
    rows.append(("sdpa cudnn", sdpa_fn(SDPBackend.CUDNN_ATTENTION), dict(hopper_on=False),
                 both, "peer"))
    rows.append(("sdpa flash", sdpa_fn(SDPBackend.FLASH_ATTENTION), dict(hopper_on=False),
                 both, "peer"))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the JSON results")
    parser.add_argument("--budget", type=float, default=220.0,
                        help="seconds after which remaining candidates are skipped")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    meta = dict(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                torch=torch.__version__, triton=triton.__version__, dtype=str(DTYPE),
                causal=True, flops="fwd 2*B*H*S^2*D (causal), fwd+bwd 3.5x")
    log(f"{meta['gpu']} torch {meta['torch']} triton {meta['triton']}")
    results = []
    for name, b, h, s, d, layout in SHAPES:
        fwd_flops = 4.0 * b * h * s * s * d * 0.5
        q, k, v, grad = make_inputs(b, h, s, d, layout)
        ref = reference(q, k, v, grad)
        log(f"\n== {name} ({layout})")
        for pname, fn, setup, modes, group in providers():
            row = dict(shape=name, provider=pname, group=group)
            if time.time() - start > args.budget:
                row["skipped"] = "time budget spent"
                log(f"  {pname:48s} skipped: time budget spent")
                results.append(row)
                continue
            setup = dict(setup)
            if setup.pop("tuned_tiles", False):
                setup["forced"] = tuned_configs(s, d)
            try:
                configure(**setup)
                t0 = time.time()
                errs, ok = check(fn, q, k, v, grad, ref)
                row["max_abs_err"] = dict(zip(("out", "dq", "dk", "dv"), errs))
                if not ok:
                    row["wrong"] = True
                    log(f"  {pname:48s} WRONG, not timed: errors out/dq/dk/dv "
                        + " ".join("%.2e" % e for e in errs))
                    results.append(row)
                    continue
                ms = time_modes(fn, q, k, v, grad, modes)
                for mode, t in ms.items():
                    flops = fwd_flops * (1.0 if mode == "fwd" else 3.5)
                    row[mode] = dict(ms=t, tflops=flops / t * 1e-9)
                log(f"  {pname:48s} " + "  ".join(
                    f"{m} {row[m]['tflops']:6.1f} TFLOP/s ({row[m]['ms']:.3f} ms)" for m in ms)
                    + "   err " + " ".join("%.1e" % e for e in errs)
                    + f"   [{time.time() - t0:.1f}s]")
            except Exception as exc:  # one failing candidate must not stop the sweep
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                log(f"  {pname:48s} FAILED: {row['error'][:300]}")
                traceback.print_exc(limit=2, file=sys.stdout)
            finally:
                configure()
                torch.cuda.empty_cache()
            results.append(row)
        del q, k, v, grad, ref
        torch.cuda.empty_cache()

    log("\n== Summary (TFLOP/s, ratio to cuDNN; targets fwd >= 0.90, fwd+bwd >= 0.85)")
    summary = {}
    for name, *_ in SHAPES:
        rows = [r for r in results if r["shape"] == name]
        cudnn = next((r for r in rows if r["provider"] == "sdpa cudnn"), {})
        for mode, target in (("fwd", 0.90), ("fwd+bwd", 0.85)):
            timed = [r for r in rows if mode in r]
            base = cudnn.get(mode, {}).get("tflops")
            for r in timed:
                if base:
                    r[mode]["ratio_to_cudnn"] = r[mode]["tflops"] / base
            best = max((r for r in timed if r["group"] == "hopper"),
                       key=lambda r: r[mode]["tflops"], default=None)
            fallback = next((r for r in timed if r["group"] == "ref"), None)
            line = f"  {name:28s} {mode:8s}"
            if base:
                line += f" cudnn {base:6.1f}"
            if fallback:
                line += f"  fallback {fallback[mode]['tflops']:6.1f}"
            if best:
                ratio = best[mode].get("ratio_to_cudnn")
                line += f"  best hopper {best[mode]['tflops']:6.1f}"
                if ratio:
                    line += f" ({ratio:.2f}x, {'meets' if ratio >= target else 'below'} target)"
                line += f"  <- {best['provider']}"
                summary[f"{name} {mode}"] = dict(provider=best["provider"],
                                                 tflops=best[mode]["tflops"], ratio=ratio)
            log(line)
    path = os.path.join(args.out, "attention_hopper_candidates.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, shapes=SHAPES, results=results, best=summary,
                       seconds=time.time() - start), f, indent=1, default=str)
    log(f"\nwrote {path} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
