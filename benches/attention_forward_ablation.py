"""Which part of fastlab's forward structure costs time: the plain probe forward of
attention_hopper_probe.py with fastlab's choices switched on one at a time.

    python3 benches/attention_forward_ablation.py --out DIR [--shapes NAME ...]

Switches of the kernel ``_ablate`` (causal, square sequences, S a multiple of BLOCK_M):
  ADVANCE  0: K/V pointer tiles fixed, each block at ``start_n * stride`` (int32)
           1: pointer tiles carried through the loop and advanced (fastlab)
           2: fixed tiles, offset ``start_n * stride`` in int64
  ORDER    0: 2-D grid, query blocks of one sequence together, longest first
           1: 1-D grid in fastlab's ``_block_order`` (chunks of sequences sharing L2,
              longest block first across a chunk)
           2: 2-D grid, sequences fastest: each query block across all sequences
  MASKS    0: no masks outside the causal one
           1: fastlab's masks: query rows and key columns against the lengths on the
              loads, the stores and the diagonal block, rows that saw no key guarded
Every variant is checked against SDPA's math output, then timed from CUDA graph replays
(do_bench_cudagraph) beside fastlab's autotuned forward and SDPA cuDNN.
Writes DIR/attention_forward_ablation.json after every shape.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benches.attention_hopper_probe import _online  # noqa: E402
from benches.attention_passes import SHAPES, fastlab_fn, make_inputs, sdpa_fn  # noqa: E402
from benches.attention_passes import bench_args, run_meta, warm_up  # noqa: E402
from fastlab.kernels.attention import _block_order, _seq_chunk, _visible  # noqa: E402

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _kv_tile(ptrs, start_n, stride, cols, S, ADVANCE: tl.constexpr, MASKS: tl.constexpr):
    if ADVANCE == 1:
        p = ptrs
    elif ADVANCE == 2:
        p = ptrs + tl.cast(start_n, tl.int64) * stride
    else:
        p = ptrs + start_n * stride
    if MASKS:
        x = tl.load(p, mask=(cols < S)[:, None], other=0.0)
    else:
        x = tl.load(p)
    return x


@triton.jit
def _ablate(Q, K, V, O, LSE,
            stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
            stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
            H, S, SEQ_CHUNK, qk_scale,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            ADVANCE: tl.constexpr, ORDER: tl.constexpr, MASKS: tl.constexpr):
    if ORDER == 0:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
    elif ORDER == 1:
        pid_m, bh = _block_order(tl.cdiv(S, BLOCK_M), SEQ_CHUNK, True)
    else:
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
        bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    dtype = Q.dtype.element_ty
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + offs_m[:, None] * stride_qs + offs_d[None, :])
    if MASKS:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs)
    k_ptrs = (K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
              + offs_n[:, None] * stride_ks + offs_d[None, :])
    v_ptrs = (V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
              + offs_n[:, None] * stride_vs + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, start_m, BLOCK_N):
        k = _kv_tile(k_ptrs, start_n, stride_ks, start_n + offs_n, S, ADVANCE, False)
        qk = tl.dot(q, tl.trans(k))
        v = _kv_tile(v_ptrs, start_n, stride_vs, start_n + offs_n, S, ADVANCE, False)
        acc, l_i, m_i = _online(acc, l_i, m_i, qk * qk_scale, v)
        if ADVANCE == 1:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
    for start_n in range(start_m, start_m + BLOCK_M, BLOCK_N):
        cols = start_n + offs_n
        k = _kv_tile(k_ptrs, start_n, stride_ks, cols, S, ADVANCE, MASKS)
        qk = tl.dot(q, tl.trans(k))
        if MASKS:
            ok = _visible(offs_m, cols, S, 0, 0, 0, True, False, False)
            s = tl.where(ok, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _kv_tile(v_ptrs, start_n, stride_vs, cols, S, ADVANCE, MASKS)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        else:
            s = tl.where(offs_m[:, None] >= cols[None, :], qk * qk_scale, float("-inf"))
            v = _kv_tile(v_ptrs, start_n, stride_vs, cols, S, ADVANCE, MASKS)
            acc, l_i, m_i = _online(acc, l_i, m_i, s, v)
        if ADVANCE == 1:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
    o_ptrs = (O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None] * stride_os + offs_d[None, :])
    if MASKS:
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(dtype), mask=row_ok[:, None])
        tl.store(LSE + bh.to(tl.int64) * S + offs_m, lse, mask=row_ok)
    else:
        tl.store(o_ptrs, (acc / l_i[:, None]).to(dtype))
        tl.store(LSE + bh.to(tl.int64) * S + offs_m, (m_i + tl.log2(l_i)) * _LN2)


def ablate_fn(bm, bn, warps, stages, advance, order, masks):
    if bn > bm or bm % bn:
        raise ValueError(f"ablation: BLOCK_N ({bn}) must divide BLOCK_M ({bm})")

    def run(q, k, v):
        b, h, s, d = q.shape
        if s % bm:
            raise ValueError(f"ablation: sequence length {s} must be a multiple of {bm}")
        o = torch.empty(b, s, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)
        lse = torch.empty(b, h, s, device=q.device, dtype=torch.float32)
        n_m = s // bm
        grid = {0: (n_m, b * h), 1: (n_m * b * h,), 2: (b * h, n_m)}[order]
        chunk = _seq_chunk(b * h, 2 * s * d * q.element_size())
        _ablate[grid](
            q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1),
            o.stride(2), h, s, chunk, d ** -0.5 * LOG2E, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
            ADVANCE=advance, ORDER=order, MASKS=masks, num_warps=warps, num_stages=stages)
        return o
    return run


#: (ADVANCE, ORDER, MASKS): the probe, each of fastlab's choices alone, all of them
SWITCHES = [(0, 0, 0), (1, 0, 0), (2, 0, 0), (0, 1, 0), (0, 2, 0), (0, 0, 1), (2, 1, 1),
            (1, 1, 1)]
TILES = {64: [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3)],
         128: [(128, 128, 8, 3), (128, 64, 8, 3)]}


def main():
    args = bench_args(__doc__)
    meta = run_meta("causal bf16 forward, do_bench_cudagraph medians (ms); "
                    "TFLOP/s 4*B*H*S^2*D/2")
    print(meta, flush=True)
    warm_up()
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
        providers = [("fastlab tuned", fastlab_fn),
                     ("sdpa cudnn", sdpa_fn(SDPBackend.CUDNN_ATTENTION))]
        providers += [(f"{tile} adv{a} order{o} masks{m}", ablate_fn(*tile, a, o, m))
                      for tile in TILES[d] for a, o, m in SWITCHES]
        for label, fn in providers:
            row = dict(shape=name, provider=label)
            try:
                with torch.no_grad():
                    out = fn(q, k, v)
                    torch.cuda.synchronize()
                    row["error"] = err = float((out[:1].float() - ref).abs().max())
                    row["ok"] = err <= 3e-2
                    if row["ok"]:
                        row["ms"] = do_bench_cudagraph(lambda: fn(q, k, v), rep=50)
                        row["tflops"] = flops / row["ms"] * 1e-9
            except Exception as exc:
                row.update(ok=False, exception=f"{type(exc).__name__}: {exc}"[-400:])
            results.append(row)
            if "tflops" in row:
                print(f"  {label:40s} {row['tflops']:6.1f} ({row['ms']:.3f} ms)", flush=True)
            else:
                print(f"  {label:40s} not timed: {row.get('exception') or row.get('error')}",
                      flush=True)
        with open(os.path.join(args.out, "attention_forward_ablation.json"), "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
