"""Does the autotuner's timer decide the attention kernels' tiles? Triton's default timer
(eager do_bench, L2 flushed before each call) against graph replays (do_bench_cudagraph,
no host time in the measurement), each tuning from scratch a few times.

    python3 benches/attention_tuning_timer.py --out DIR [--shapes NAME ...] [--trials N]

Per trial: every autotuner's cache and fastlab's remembered picks are cleared, the timer is
installed on the forward, dK/dV and dQ autotuners, one fwd+bwd tunes them, and then
fastlab's fwd+bwd and backward are timed eagerly (do_bench medians, as in
attention_passes.py), cuDNN's once per shape. Records the picks and every candidate's
timing under both timers. Writes DIR/attention_tuning_timer.json.
"""
import json
import os
import sys

import torch
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastlab.kernels.attention as kernels  # noqa: E402
from benches.attention_passes import (PROVIDERS, SHAPES, bench_args, check,  # noqa: E402
                                      make_inputs, reference, run_meta, time_provider,
                                      tuned_configs, warm_up)

TUNERS = {"fwd": kernels._fwd_tuned, "dkdv": kernels._dkdv_tuned, "dq": kernels._dq_tuned}


def graph_timer(kernel_call, quantiles):
    return do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)


def eager_timer(kernel_call, quantiles):
    return do_bench(kernel_call, quantiles=quantiles)


def retune(timer):
    """Forget every pick and install ``timer`` on the three autotuners."""
    kernels.forget_tuning()
    for tuner in TUNERS.values():
        tuner.cache.clear()
        tuner.__dict__["do_bench"] = timer  # do_bench is a cached property


def timings(tuner) -> dict:
    found = getattr(tuner, "configs_timings", None) or {}
    return {f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}":
            (t[0] if isinstance(t, (list, tuple)) else t) for c, t in found.items()}


def main():
    args = bench_args(__doc__, lambda p: p.add_argument(
        "--trials", type=int, default=3, help="tunings per timer and shape"))
    names = args.shapes or ["B16-H16-S1024-D64", "GPT2-B16-H12-S1024-D64-qkv"]
    meta = run_meta("do_bench medians (ms) after tuning with each timer")
    print(meta, flush=True)
    warm_up()
    rows = []
    for name, b, h, s, d, layout, dtype in (x for x in SHAPES if x[0] in names):
        q, k, v, grad = make_inputs(b, h, s, d, layout, dtype)
        ref = reference(q, k, v, grad)
        base = time_provider(PROVIDERS["sdpa cudnn"], q, k, v, grad)
        rows.append(dict(shape=name, provider="sdpa cudnn", fwd_ms=base[0],
                         fwd_bwd_ms=base[1], bwd_ms=base[2]))
        print(f"== {name}: cuDNN fwd {base[0]:.3f} fwd+bwd {base[1]:.3f} bwd {base[2]:.3f} ms",
              flush=True)
        for label, timer in (("eager", eager_timer), ("graph", graph_timer)) * args.trials:
            retune(timer)
            _, ok = check(PROVIDERS["fastlab"], q, k, v, grad, ref)
            per = {n: timings(t) for n, t in TUNERS.items()}
            fwd, full, bwd = time_provider(PROVIDERS["fastlab"], q, k, v, grad)
            rows.append(dict(shape=name, timer=label, ok=ok, fwd_ms=fwd, fwd_bwd_ms=full,
                             bwd_ms=bwd, picks=tuned_configs(), candidates=per))
            print(f"  {label}: fwd {fwd:.3f} ({base[0] / fwd:.3f}x) fwd+bwd {full:.3f} "
                  f"({base[1] / full:.3f}x) bwd {bwd:.3f} ({base[2] / bwd:.3f}x) ok {ok}",
                  flush=True)
            for n, table in per.items():
                print(f"    {n}: " + ", ".join(f"{c} {t * 1e3:.1f}us" for c, t in
                                               sorted(table.items(), key=lambda x: x[1])),
                      flush=True)
        with open(os.path.join(args.out, "attention_tuning_timer.json"), "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
