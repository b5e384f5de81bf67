"""Probe: a warp-specialised Hopper attention forward written in Gluon (Triton's explicit
layout and async-op language), against fastlab's portable forward and SDPA's cuDNN.

    python3 benches/attention_gluon_probe.py --out DIR [--shapes NAME ...]
        [--variants I ...] [--no-peers]

Why it exists: on sm90 Triton 3.6 does not warp-specialise ``tl.range`` loops (see
``results/h200-2026-12-03c``), and at B4 H16 S4096 D128 the portable forward stays at
0.82-0.84x cuDNN. Gluon states the pipeline outright:

* a producer partition of one warp issues the TMA loads: the query tile once, then K and
  V blocks into a ring of STAGES shared-memory slots, each slot guarded by a ``ready``
  mbarrier (bytes arrived) and a ``free`` one (the consumers are done with it);
* consumers run the online softmax: S = Q K^T by an async wgmma from shared memory, the
  base-2 softmax in the wgmma accumulator's layout, O += P V with P kept in registers as
  wgmma's A operand. SPLIT 1: one consumer partition of BLOCK_M / 16 warps; its
  warpgroups meet at a partition-wide barrier before each slot is released (the PTX shows
  ``bar.sync 0, 256``), so they run in step, as Triton's 8-warp programs do. SPLIT 2: two
  consumer partitions of one warpgroup and 64 rows each, each releasing the slot on its
  own (the slot's barrier counts two arrivals): nothing keeps them in step, so one's
  softmax can run under the other's matmuls. PIPE: FA3's order inside a warpgroup, the
  next block's S = Q K^T issued before this block's O += P V, and the next softmax run
  while that matmul is in flight. Split 2 runs only with PIPE: without it, it faulted on
  an H200 (``results/h200-2026-12-03f``).

Scope: dense (B, H, S, D) contiguous bf16, q_len == kv_len, S a multiple of BLOCK_M and
BLOCK_N, D 64 or 128; causal or not. Each variant is checked against SDPA's math backend
in float32 on the first batch row before it is timed (graph replays, do_bench_cudagraph).
Writes DIR/attention_gluon_probe.json. ``--variants 0 3`` runs those entries of VARIANTS
only and ``--no-peers`` leaves out cuDNN and fastlab, so that each variant can run in a
process of its own (one that faults or hangs then loses only itself); the file name then
takes the indices.
"""
import json
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                              tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
_LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, ready, free,
                    q_row, kv_row, n_blocks, STAGES: gl.constexpr, SPLIT: gl.constexpr):
    """Producer: Q once (one tile per consumer), then K/V block j into slot j % STAGES once
    the consumers freed it."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    ROWS: gl.constexpr = q_desc.block_type.shape[0]
    Q_BYTES: gl.constexpr = SPLIT * q_desc.block_type.nbytes
    mbarrier.expect(q_bar, Q_BYTES)
    for i in gl.static_range(SPLIT):
        tma.async_copy_global_to_shared(q_desc, [q_row + i * ROWS, 0], q_bar, q_smem.index(i))
    for j in range(n_blocks):
        s = j % STAGES
        # the slot's (j // STAGES)-th release; a fresh barrier passes parity 1 at once
        mbarrier.wait(free.index(s), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BLOCK_N, 0], ready.index(s),
                                        k_smem.index(s))
        tma.async_copy_global_to_shared(v_desc, [kv_row + j * BLOCK_N, 0], ready.index(s),
                                        v_smem.index(s))


@gluon.jit
def _scores(qk, m_i, l_i, offs_m, start_n, qk_scale, s_layout: gl.constexpr,
            MASK: gl.constexpr):
    """Online-softmax update for one block of raw scores: (p, m_new, l_new, alpha)."""
    BLOCK_N: gl.constexpr = qk.type.shape[1]
    if MASK:
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(cols[None, :] <= offs_m[:, None], qk * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        p = gl.exp2(s - m_new[:, None])
    else:
        m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale)
        p = gl.exp2(qk * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + gl.sum(p, axis=1), alpha


@gluon.jit
def _softmax_step(acc, l_i, m_i, q_smem, k_buf, v_buf, offs_m, start_n, qk_scale,
                  s_layout: gl.constexpr, o_layout: gl.constexpr, MASK: gl.constexpr):
    """One key block in program order: S = Q K^T, its softmax, then O += P V."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_buf.type.shape[0]
    qk = warpgroup_mma(q_smem, k_buf.permute((1, 0)),
                       gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                       is_async=True)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, q_smem, k_buf))[0]
    p, m_new, l_i, alpha = _scores(qk, m_i, l_i, offs_m, start_n, qk_scale, s_layout, MASK)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    p_op = gl.convert_layout(p.to(v_buf.dtype),
                             gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    acc = warpgroup_mma(p_op, v_buf, acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, v_buf))[0]
    return acc, l_i, m_new


@gluon.jit
def _pipelined_loop(q_smem, k_smem, v_smem, ready, free, offs_m, n_full, n_blocks, qk_scale,
                    s_layout: gl.constexpr, o_layout: gl.constexpr, STAGES: gl.constexpr,
                    CAUSAL: gl.constexpr):
    """FA3's order inside one warpgroup: S_{j+1} = Q K_{j+1}^T is issued before O += P_j V_j,
    and the softmax of block j + 1 runs while the second matmul is still in flight."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[0]
    D: gl.constexpr = q_smem.type.shape[1]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    zeros_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    mbarrier.wait(ready.index(0), 0)
    qk = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zeros_s, use_acc=False,
                       is_async=True)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, q_smem, k_smem.index(0)))[0]
    if CAUSAL and n_full == 0:
        p, m_i, l_i, alpha = _scores(qk, m_i, l_i, offs_m, 0, qk_scale, s_layout, True)
    else:
        p, m_i, l_i, alpha = _scores(qk, m_i, l_i, offs_m, 0, qk_scale, s_layout, False)
    for j in range(n_blocks - 1):
        s = j % STAGES
        sn = (j + 1) % STAGES
        mbarrier.wait(ready.index(sn), ((j + 1) // STAGES) & 1)
        k_next = k_smem.index(sn)
        qk = warpgroup_mma(q_smem, k_next.permute((1, 0)), zeros_s, use_acc=False,
                           is_async=True)
        p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
        v_buf = v_smem.index(s)
        acc = warpgroup_mma(p_op, v_buf, acc, is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk, q_smem, k_next))[0]
        if CAUSAL and j + 1 >= n_full:
            p, m_new, l_i, alpha = _scores(qk, m_i, l_i, offs_m, (j + 1) * BLOCK_N, qk_scale,
                                           s_layout, True)
        else:
            p, m_new, l_i, alpha = _scores(qk, m_i, l_i, offs_m, (j + 1) * BLOCK_N, qk_scale,
                                           s_layout, False)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, v_buf, p_op))[0]
        mbarrier.arrive(free.index(s), count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        m_i = m_new
    s = (n_blocks - 1) % STAGES
    p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
    v_buf = v_smem.index(s)
    acc = warpgroup_mma(p_op, v_buf, acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, v_buf, p_op))[0]
    mbarrier.arrive(free.index(s), count=1)
    return acc, l_i, m_i


@gluon.jit
def _softmax_partition(q_smem, k_smem, v_smem, q_bar, ready, free, O, LSE, q_row, start_m,
                       n_full, n_blocks, qk_scale, STAGES: gl.constexpr,
                       CAUSAL: gl.constexpr, num_warps: gl.constexpr, PIPE: gl.constexpr):
    """Consumer of the query rows [start_m, start_m + rows of q_smem): online softmax over
    the key blocks, then O and the LSE through pointers."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[0]
    D: gl.constexpr = q_smem.type.shape[1]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16])
    offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    mbarrier.wait(q_bar, 0)
    if PIPE:
        acc, l_i, m_i = _pipelined_loop(q_smem, k_smem, v_smem, ready, free, offs_m, n_full,
                                        n_blocks, qk_scale, s_layout, o_layout, STAGES, CAUSAL)
    for j in range(n_blocks * (1 - PIPE)):
        s = j % STAGES
        mbarrier.wait(ready.index(s), (j // STAGES) & 1)
        if CAUSAL and j >= n_full:
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q_smem, k_smem.index(s),
                                          v_smem.index(s), offs_m, j * BLOCK_N, qk_scale,
                                          s_layout, o_layout, True)
        else:
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q_smem, k_smem.index(s),
                                          v_smem.index(s), offs_m, j * BLOCK_N, qk_scale,
                                          s_layout, o_layout, False)
        mbarrier.arrive(free.index(s), count=1)

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = acc / l_o[:, None]
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    o_ptrs = O + (q_row + rows).to(gl.int64)[:, None] * D + cols[None, :]
    gl.store(o_ptrs, out.to(O.dtype.element_ty))
    lse = (gl.convert_layout(m_i, gl.SliceLayout(1, o_layout)) + gl.log2(l_o)) * _LN2
    gl.store(LSE + q_row + rows, lse)


@gluon.jit
def _gluon_fwd(q_desc, k_desc, v_desc, O, LSE, S, qk_scale, STAGES: gl.constexpr,
               CAUSAL: gl.constexpr, SPLIT: gl.constexpr, CONSUMER_WARPS: gl.constexpr,
               PIPE: gl.constexpr):
    """SPLIT 1: one consumer partition (the default one) of CONSUMER_WARPS warps owns the
    BLOCK_M query rows; its warpgroups meet at a partition-wide barrier before each slot is
    released. SPLIT 2: two consumer partitions of 4 warps own half the rows each and
    release slots on their own (the slot's barrier counts both), so they can drift.
    PIPE: each consumer issues S_{j+1} = Q K_{j+1}^T before O += P_j V_j and runs the
    softmax of block j + 1 while that second matmul is in flight."""
    ROWS: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_M: gl.constexpr = ROWS * SPLIT
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    n_m = gl.num_programs(0)
    pid_m = n_m - 1 - gl.program_id(0)  # causal: the longest rows first
    bh = gl.program_id(1)
    start_m = pid_m * BLOCK_M
    q_row = bh * S + start_m
    kv_row = bh * S
    if CAUSAL:
        n_blocks = gl.cdiv(start_m + BLOCK_M, BLOCK_N)
        n_full = start_m // BLOCK_N
    else:
        n_blocks = S // BLOCK_N
        n_full = n_blocks

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [SPLIT, ROWS, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=SPLIT)
    fence_async_shared()

    if SPLIT == 1:
        gl.warp_specialize([
            (_softmax_partition, (q_smem.index(0), k_smem, v_smem, q_bar, ready, free, O, LSE,
                                  q_row, start_m, n_full, n_blocks, qk_scale, STAGES, CAUSAL,
                                  CONSUMER_WARPS, PIPE)),
            (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, ready,
                               free, q_row, kv_row, n_blocks, STAGES, SPLIT)),
        ], [1], [24])
    else:
        gl.warp_specialize([
            (_softmax_partition, (q_smem.index(0), k_smem, v_smem, q_bar, ready, free, O, LSE,
                                  q_row, start_m, n_full, n_blocks, qk_scale, STAGES, CAUSAL,
                                  4, PIPE)),
            (_softmax_partition, (q_smem.index(1), k_smem, v_smem, q_bar, ready, free, O, LSE,
                                  q_row + ROWS, start_m + ROWS, n_full, n_blocks, qk_scale,
                                  STAGES, CAUSAL, 4, PIPE)),
            (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, ready,
                               free, q_row, kv_row, n_blocks, STAGES, SPLIT)),
        ], [4, 1], [240, 24])

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(free.index(i))


def descriptors(q, k, v, q_rows, block_n):
    """2-D TMA descriptors over (B * H * S, D) views of contiguous q, k, v; Q tiles of
    q_rows rows, K and V tiles of block_n."""
    d = q.shape[-1]
    out = []
    for t, rows in ((q, q_rows), (k, block_n), (v, block_n)):
        flat = t.reshape(-1, d)
        layout = gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16)
        out.append(TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, d],
                                    layout))
    return out


def gluon_attention(q, k, v, causal, block_m=128, block_n=128, stages=2, split=1,
                    pipe=False):
    """Forward of the probe: (out, lse); arguments as described in the module docstring.
    split 2 needs block_m 128 (two consumers of 64 rows) and pipe."""
    b, h, s, d = q.shape
    if (q.dtype != torch.bfloat16 or not all(t.is_contiguous() for t in (q, k, v))
            or k.shape != q.shape or v.shape != q.shape):
        raise ValueError("the probe takes contiguous bf16 q, k, v of one (B, H, S, D) shape")
    if s % block_m or s % block_n or d not in (64, 128):
        raise ValueError(f"the probe needs S a multiple of {block_m} and {block_n}, D 64 or "
                         f"128; got S {s}, D {d}")
    if split not in (1, 2) or block_m // split < 64:
        raise ValueError(f"split must be 1 or 2 with 64 or more rows per consumer, got "
                         f"split {split} at block_m {block_m}")
    if split == 2 and not pipe:
        raise NotImplementedError("split 2 without pipe faulted with an illegal memory "
                                  "access on an H200 under Triton 3.6 (with and without "
                                  "the two consumers taking turns); the cause is not found")
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, device=q.device, dtype=torch.float32)
    q_desc, k_desc, v_desc = descriptors(q, k, v, block_m // split, block_n)
    warps = block_m // 16 if split == 1 else 4
    _gluon_fwd[(s // block_m, b * h)](q_desc, k_desc, v_desc, out, lse, s,
                                      d ** -0.5 * LOG2E, stages, causal, split, warps,
                                      pipe, num_warps=warps)
    return out, lse


SHAPES = [("B4-H16-S4096-D128", 4, 16, 4096, 128), ("B8-H16-S2048-D64", 8, 16, 2048, 64),
          ("B16-H16-S1024-D64", 16, 16, 1024, 64)]
#: (BLOCK_M, BLOCK_N, STAGES, SPLIT, PIPE)
VARIANTS = [(128, 128, 2, 1, True), (128, 64, 3, 1, True), (128, 128, 2, 1, False),
            (64, 128, 2, 1, True), (128, 128, 2, 2, True), (128, 64, 3, 1, False)]


def main():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench_cudagraph

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benches.attention_passes import bench_start  # noqa: E402
    from fastlab.ops._dispatch import backend  # noqa: E402
    from fastlab.ops.attention import attention  # noqa: E402

    def options(parser):
        parser.add_argument("--variants", type=int, nargs="+", choices=range(len(VARIANTS)),
                            help="indices into VARIANTS (default: all)")
        parser.add_argument("--no-peers", action="store_true",
                            help="time the Gluon variants only")

    args, meta = bench_start(__doc__, "do_bench_cudagraph medians; TFLOP/s: "
                             "4*B*H*S^2*D/2 (causal)", options)
    indices = args.variants or list(range(len(VARIANTS)))
    rows = []
    for name, b, h, s, d in SHAPES:
        if args.shapes and name not in args.shapes:
            continue
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", generator=gen).to(torch.bfloat16)
                   for _ in range(3))
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(*(t[:1].float() for t in (q, k, v)),
                                                 is_causal=True)
        flops = 4.0 * b * h * s * s * d * 0.5

        def record(label, fn):
            row = dict(shape=name, provider=label)
            try:
                err = float((fn()[:1].float() - ref).abs().max())
                row.update(error=err, ok=err <= 3e-2)
                if row["ok"]:
                    ms = do_bench_cudagraph(fn, rep=100)
                    row.update(ms=ms, tflops=flops / ms * 1e-9)
            except Exception as exc:  # a variant that does not compile or run
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
            rows.append(row)
            print(f"  {name} {label:24s} {row.get('tflops', float('nan')):6.1f} TFLOP/s  "
                  f"err {row['error']}", flush=True)

        with torch.no_grad():
            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def fastlab():
                with backend("kernel"):
                    return attention(q, k, v, causal=True)
            if not args.no_peers:
                record("sdpa cudnn", cudnn)
                record("fastlab", fastlab)
            for index in indices:
                bm, bn, st, sp, pipe = variant = VARIANTS[index]
                record(f"gluon {bm}x{bn} s{st} split{sp}{' pipe' if pipe else ''}",
                       lambda variant=variant: gluon_attention(q, k, v, True, *variant)[0])
        suffix = "-" + "-".join(map(str, indices)) if args.variants else ""
        with open(os.path.join(args.out, f"attention_gluon_probe{suffix}.json"), "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
