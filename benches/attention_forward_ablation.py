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
Writes DIR/attention_forward_ablation.json after every shape (rows as the probe's).
"""
import os
import sys

import torch
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benches.attention_hopper_probe import _head_ptrs, _online, forward_bench  # noqa: E402
from benches.attention_hopper_probe import tile_fn  # noqa: E402
from benches.attention_passes import fastlab_fn, sdpa_fn  # noqa: E402
from benches.attention_passes import bench_start  # noqa: E402
from fastlab.kernels.attention import _block_order, _seq_chunk, _visible  # noqa: E402

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
            H, S, qk_scale, SEQ_CHUNK,
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
    start_m = pid_m * BLOCK_M
    b, h, offs_m, offs_n, offs_d, q_ptrs, k_ptrs, v_ptrs = _head_ptrs(
        Q, K, V, bh, H, pid_m, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
        stride_ks, stride_vb, stride_vh, stride_vs, HEAD_DIM, BLOCK_M, BLOCK_N)
    row_ok = offs_m < S
    if MASKS:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs)
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
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + bh.to(tl.int64) * S + offs_m, lse, mask=row_ok)
    else:
        tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty))
        tl.store(LSE + bh.to(tl.int64) * S + offs_m, (m_i + tl.log2(l_i)) * _LN2)


def ablate_fn(bm, bn, warps, stages, advance, order, masks):
    grid = {0: lambda n_m, n_bh: (n_m, n_bh), 1: lambda n_m, n_bh: (n_m * n_bh,),
            2: lambda n_m, n_bh: (n_bh, n_m)}[order]

    def chunk(q):
        b, h, s, d = q.shape
        return (_seq_chunk(b * h, 2 * s * d * q.element_size()),)
    return tile_fn(_ablate, bm, bn, warps, stages, grid, chunk, ADVANCE=advance, ORDER=order,
                   MASKS=masks)


#: (ADVANCE, ORDER, MASKS): the probe, each of fastlab's choices alone, all of them
SWITCHES = [(0, 0, 0), (1, 0, 0), (2, 0, 0), (0, 1, 0), (0, 2, 0), (0, 0, 1), (2, 1, 1),
            (1, 1, 1)]
TILES = {64: [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3)],
         128: [(128, 128, 8, 3), (128, 64, 8, 3)]}


def main():
    args, meta = bench_start(__doc__, "causal bf16 forward, do_bench_cudagraph medians (ms); "
                             "TFLOP/s 4*B*H*S^2*D/2")

    def providers(d):
        return ([("fastlab tuned", fastlab_fn),
                 ("sdpa cudnn", sdpa_fn(SDPBackend.CUDNN_ATTENTION))]
                + [(f"{tile} adv{a} order{o} masks{m}", ablate_fn(*tile, a, o, m))
                   for tile in TILES[d] for a, o, m in SWITCHES])
    forward_bench(args, meta, providers, lambda fn: do_bench_cudagraph(fn, rep=50),
                  "attention_forward_ablation.json")


if __name__ == "__main__":
    main()
