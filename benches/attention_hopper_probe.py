"""Probe for a Hopper attention forward: device-side tensor descriptors (TMA) and Triton's
warp specialisation, timed beside fastlab's current forward and SDPA cuDNN / flash.

    python3 benches/attention_hopper_probe.py --out DIR

The probe kernel is the plain causal (or full) forward on square sequences whose length is
a multiple of the query tile: one 2-D descriptor per (batch, head) slice of Q, K, V, O
(rows S, columns D, the sequence stride as given: the GPT-2 views work in place), the
off-diagonal key blocks in one unmasked loop and the diagonal ones in a masked loop, each
a ``tl.range`` with ``warp_specialize`` on or off. Every variant is checked against SDPA's
output first; one that fails to compile or is out of tolerance is reported, not timed.
Writes DIR/attention_hopper_probe.json after every shape.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benches.attention_passes import SHAPES, fastlab_fn, make_inputs, sdpa_fn  # noqa: E402
from benches.attention_passes import bench_start  # noqa: E402

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _online(acc, l_i, m_i, s, v):
    """One key block of the online softmax: scores ``s`` already scaled to base 2."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _probe_fwd(Q, K, V, O, LSE,
               stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
               stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
               H, S, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr):
    n_m = tl.num_programs(0)
    pid_m = n_m - 1 - tl.program_id(0)  # the longest rows first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    dtype = Q.dtype.element_ty
    qd = tl.make_tensor_descriptor(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh,
                                   shape=[S, HEAD_DIM], strides=[stride_qs, 1],
                                   block_shape=[BLOCK_M, HEAD_DIM])
    kd = tl.make_tensor_descriptor(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh,
                                   shape=[S, HEAD_DIM], strides=[stride_ks, 1],
                                   block_shape=[BLOCK_N, HEAD_DIM])
    vd = tl.make_tensor_descriptor(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh,
                                   shape=[S, HEAD_DIM], strides=[stride_vs, 1],
                                   block_shape=[BLOCK_N, HEAD_DIM])
    od = tl.make_tensor_descriptor(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh,
                                   shape=[S, HEAD_DIM], strides=[stride_os, 1],
                                   block_shape=[BLOCK_M, HEAD_DIM])
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = qd.load([start_m, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = start_m if CAUSAL else S
    for start_n in tl.range(0, hi, BLOCK_N, num_stages=STAGES, warp_specialize=WS):
        k = kd.load([start_n, 0])
        qk = tl.dot(q, k.T)
        v = vd.load([start_n, 0])
        acc, l_i, m_i = _online(acc, l_i, m_i, qk * qk_scale, v)
    if CAUSAL:
        for start_n in tl.range(start_m, start_m + BLOCK_M, BLOCK_N, num_stages=STAGES,
                                warp_specialize=WS):
            k = kd.load([start_n, 0])
            qk = tl.dot(q, k.T)
            s = tl.where(offs_m[:, None] >= start_n + offs_n[None, :], qk * qk_scale,
                         float("-inf"))
            v = vd.load([start_n, 0])
            acc, l_i, m_i = _online(acc, l_i, m_i, s, v)
    od.store([start_m, 0], (acc / l_i[:, None]).to(dtype))
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, (m_i + tl.log2(l_i)) * _LN2)


@triton.jit
def _head_ptrs(Q, K, V, bh, H, pid_m, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
               stride_ks, stride_vb, stride_vh, stride_vs, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(b, h, query rows, key columns of the first block, head dims, pointer tiles of Q's
    rows and of K's and V's first key block) of query block ``pid_m`` of sequence ``bh``."""
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + offs_m[:, None] * stride_qs + offs_d[None, :])
    k_ptrs = (K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
              + offs_n[:, None] * stride_ks + offs_d[None, :])
    v_ptrs = (V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
              + offs_n[:, None] * stride_vs + offs_d[None, :])
    return b, h, offs_m, offs_n, offs_d, q_ptrs, k_ptrs, v_ptrs


@triton.jit
def _probe_rot(Q, K, V, O, LSE,
               stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
               stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
               H, S, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               ROTATE: tl.constexpr):
    """Pointer loads; with ROTATE the scores of key block j + 1 are issued before the
    softmax of block j, so that the matmul can run while the softmax does."""
    n_m = tl.num_programs(0)
    pid_m = n_m - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    dtype = Q.dtype.element_ty
    start_m = pid_m * BLOCK_M
    b, h, offs_m, offs_n, offs_d, q_ptrs, k_ptrs, v_ptrs = _head_ptrs(
        Q, K, V, bh, H, pid_m, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
        stride_ks, stride_vb, stride_vh, stride_vs, HEAD_DIM, BLOCK_M, BLOCK_N)
    q = tl.load(q_ptrs)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = start_m
    if ROTATE:
        if hi > 0:
            qk = tl.dot(q, tl.trans(tl.load(k_ptrs)))
            for start_n in range(0, hi - BLOCK_N, BLOCK_N):
                k = tl.load(k_ptrs + (start_n + BLOCK_N) * stride_ks)
                qk_next = tl.dot(q, tl.trans(k))
                v = tl.load(v_ptrs + start_n * stride_vs)
                acc, l_i, m_i = _online(acc, l_i, m_i, qk * qk_scale, v)
                qk = qk_next
            v = tl.load(v_ptrs + (hi - BLOCK_N) * stride_vs)
            acc, l_i, m_i = _online(acc, l_i, m_i, qk * qk_scale, v)
    else:
        for start_n in range(0, hi, BLOCK_N):
            k = tl.load(k_ptrs + start_n * stride_ks)
            qk = tl.dot(q, tl.trans(k))
            v = tl.load(v_ptrs + start_n * stride_vs)
            acc, l_i, m_i = _online(acc, l_i, m_i, qk * qk_scale, v)
    for start_n in range(start_m, start_m + BLOCK_M, BLOCK_N):
        k = tl.load(k_ptrs + start_n * stride_ks)
        qk = tl.dot(q, tl.trans(k))
        s = tl.where(offs_m[:, None] >= start_n + offs_n[None, :], qk * qk_scale,
                     float("-inf"))
        v = tl.load(v_ptrs + start_n * stride_vs)
        acc, l_i, m_i = _online(acc, l_i, m_i, s, v)
    tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
             + offs_m[:, None] * stride_os + offs_d[None, :], (acc / l_i[:, None]).to(dtype))
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, (m_i + tl.log2(l_i)) * _LN2)


def tile_fn(kernel, bm, bn, warps, stages, grid=lambda n_m, n_bh: (n_m, n_bh),
            extra=lambda q: (), **constexprs):
    """fn(q, k, v) -> O of a probe-style kernel: arguments Q, K, V, O, LSE, the first three
    strides of each, H, S, qk_scale, then ``extra(q)``; ``grid(query blocks, B * H)``."""
    if bn > bm or bm % bn:
        # the diagonal loop reads whole key tiles from the query block's first row
        raise ValueError(f"{kernel.fn.__name__}: BLOCK_N ({bn}) must divide BLOCK_M ({bm})")

    def run(q, k, v):
        b, h, s, d = q.shape
        if s % bm:
            raise ValueError(f"{kernel.fn.__name__}: sequence length {s} must be a multiple "
                             f"of {bm}")
        o = torch.empty(b, s, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)
        lse = torch.empty(b, h, s, device=q.device, dtype=torch.float32)
        kernel[grid(s // bm, b * h)](
            q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *o.stride()[:3], h, s, d ** -0.5 * LOG2E, *extra(q), HEAD_DIM=d, BLOCK_M=bm,
            BLOCK_N=bn, num_warps=warps, num_stages=stages, **constexprs)
        return o
    return run


def probe_fn(kernel, bm, bn, warps, stages, flag):
    """The descriptor kernel with warp_specialize = flag, or the pointer one with ROTATE."""
    extra = (dict(WS=flag, STAGES=stages, CAUSAL=True) if kernel is _probe_fwd
             else dict(ROTATE=flag))
    return tile_fn(kernel, bm, bn, warps, stages, **extra)


#: (kernel, BLOCK_M, BLOCK_N, warps, stages, flag); the descriptor kernel's flag is
#: warp_specialize, the pointer kernel's is ROTATE
VARIANTS = [(_probe_rot, bm, bn, w, s, rot) for rot in (False, True)
            for bm, bn, w, s in [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4),
                                 (128, 64, 4, 3), (64, 64, 4, 3)]]


def forward_bench(args, meta, providers, timer, json_name):
    """Check every provider's causal forward against SDPA's math output on the first four
    training shapes, then time it with ``timer(fn) -> ms``; writes DIR/json_name after
    every shape. ``providers(head_dim)`` gives the (label, fn) pairs of a shape."""
    results = []
    for name, b, h, s, d, layout, dtype in SHAPES[:4]:
        if args.shapes and name not in args.shapes:
            continue
        q, k, v, _ = make_inputs(b, h, s, d, layout, dtype)
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(*(t[:1].float() for t in (q, k, v)),
                                                 is_causal=True)
        flops = 4.0 * b * h * s * s * d * 0.5
        print(f"== {name}", flush=True)
        for label, fn in providers(d):
            row = dict(shape=name, provider=label)
            try:
                t0 = time.time()
                with torch.no_grad():
                    out = fn(q, k, v)
                    torch.cuda.synchronize()
                    row["first_call_s"] = time.time() - t0
                    err = float((out[:1].float() - ref).abs().max())
                    row.update(error=err, ok=err <= 3e-2)
                    if row["ok"]:
                        ms = timer(lambda: fn(q, k, v))
                        row.update(fwd_ms=ms, fwd_tflops=flops / ms * 1e-9)
            except Exception as exc:
                row.update(ok=False, exception=f"{type(exc).__name__}: {exc}"[-600:])
            results.append(row)
            if "fwd_ms" in row:
                print(f"  {label:40s} {row['fwd_tflops']:6.1f} TFLOP/s ({row['fwd_ms']:.3f} ms)"
                      f" err {row['error']:.1e} first {row['first_call_s']:.1f}s", flush=True)
            else:
                print(f"  {label:40s} not timed: {row.get('exception') or row.get('error')}",
                      flush=True)
        with open(os.path.join(args.out, json_name), "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)


def main():
    args, meta = bench_start(__doc__, "causal bf16 forward, do_bench medians (ms); "
                             "TFLOP/s 4*B*H*S^2*D/2")
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                 device="cuda"))
    providers = [("fastlab", fastlab_fn), ("sdpa cudnn", sdpa_fn(SDPBackend.CUDNN_ATTENTION)),
                 ("sdpa flash", sdpa_fn(SDPBackend.FLASH_ATTENTION))]
    for kernel, bm, bn, w, s, flag in VARIANTS:
        kind = "tma ws" if kernel is _probe_fwd else "ptr rotate"
        providers.append((f"{kind}{int(flag)} {bm}x{bn} w{w} s{s}",
                          probe_fn(kernel, bm, bn, w, s, flag)))
    forward_bench(args, meta, lambda d: providers,
                  lambda fn: do_bench(fn, warmup=10, rep=60), "attention_hopper_probe.json")


if __name__ == "__main__":
    main()
