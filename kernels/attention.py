"""Flash attention for training: forward, and a deterministic backward, in Triton.

Layout (B, H, S, D) with any strides: every tensor is addressed through its four strides,
so a transposed view of a (B, S, H, D) projection is read in place. Query heads map to key
heads by ``h // GROUP`` (GQA/MQA without copying keys). The mask is aligned bottom-right:
with ``shift = kv_len - q_len`` query ``i`` sees key ``j`` iff ``j < kv_len`` and, when
causal, ``j <= i + shift``; ``kv_len`` is per sequence when ``kv_lens`` is given. A query
that sees no key gets output 0, LSE -inf, and gradient 0.

Algorithm (flash attention 2):
  forward   one program per (query block, batch * q head): stream key/value blocks, keep
            an online softmax in base 2 (``scale * log2(e)`` folded into one multiply),
            write O and the natural-log LSE (B, H, Sq) in float32.
  backward  (1) dQ: one program per (query block, batch * q head) loops over key blocks;
                it first computes delta = rowsum(dO * O) - dLSE of its rows, which it
                needs itself, and writes it for (2): no separate launch for delta.
            (2) dK/dV: one program per (key block, batch * kv head) loops over the q heads
                of its group and over the query blocks, recomputing P from the LSE; the
                group sum stays in registers, so no atomics and the result is
                deterministic.
Key blocks above the causal diagonal are skipped; only blocks that cut the diagonal or
the key length run the masked variant of the inner loop (``MASK`` constexpr). Each kernel's
grid is 1-D, its programs ordered by ``_block_order``: chunks of sequences that share L2,
longest causal blocks first within a chunk (on an H200 this order took the causal bf16
forward from 412 to 436 TFLOP/s at B4 H16 S4096 D128, from 321 to 343 at D64).

Head dims 1..256 are padded inside the kernel to ``HEAD_DIM``, the next power of two
>= 16 (``tl.dot`` needs 16), by masked loads: padded lanes read 0 and are never stored.
bf16/fp16 operands go to the tensor cores with fp32 accumulation; P and dS are rounded to
the input dtype before their matmuls, as in every flash implementation. fp32 inputs use
TF32 tensor-core dots on the GPU (10-bit mantissa products, fp32 accumulation).

Floor, per (batch, q head), with n = q_len * kv_len visible pairs (about half when
causal): forward 4 * n * D flops (QK^T and PV), backward 10 * n * D (QK^T, dP, dV, dK,
dQ; QK^T recomputed); bytes: forward reads Q, K, V and writes O and LSE, backward reads
Q, K, V, O, dO, LSE and writes dQ, dK, dV. At training sizes it is compute-bound.
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, dot, next_power_of_2

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(LOG2E)


# ----------------------------------------------------------------------------------------
# Tuning: every candidate in one place, pruned per call by keep().
# ----------------------------------------------------------------------------------------

#: (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel. Forward: wide query
#: tiles (128 rows: one 64-row wgmma per warpgroup with 8 warps) and 3 stages
#: to hide K/V loads. dK/dV: narrow query tiles, since K, V, dK and dV of a 128-key block
#: already sit in registers. dQ: the mirror image (wide query tile, narrow key tile).
#: Tiles with BLOCK_M = 16 and a wide BLOCK_N serve a few queries over a long cache;
#: single-stage tiles serve short sequences, and at small head dims a key tile as long as
#: the sequence does the whole row in one step (see keep()). Two-warp programs of the small
#: head dims' tiles double the programs an SM holds, where a short loop cannot hide latency.
#: Measured and dropped: K/V loads through device-side TMA descriptors (4-D, built by each
#: program) ran the causal bf16 forward slower on an H200 than these pointer loads, 396 vs
#: 414 TFLOP/s at B4 H16 S4096 D128 and 302 vs 323 at B8 H16 S2048 D64.
_FWD_CANDIDATES = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 3),
                   (128, 64, 8, 4), (128, 64, 8, 5),
                   (128, 64, 4, 3), (64, 64, 4, 2),
                   (64, 32, 4, 3), (32, 32, 4, 2), (64, 64, 4, 1), (16, 128, 4, 3),
                   (32, 128, 4, 1), (64, 128, 4, 1), (32, 256, 4, 1), (64, 256, 8, 1),
                   (32, 64, 2, 2), (64, 64, 2, 2), (32, 128, 2, 1), (16, 16, 2, 2)]
_DKDV_CANDIDATES = [(32, 128, 8, 3), (32, 64, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2),
                    (64, 64, 4, 1), (16, 64, 4, 2), (16, 32, 4, 2), (16, 16, 2, 2)]
_DQ_CANDIDATES = [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2),
                  (64, 64, 4, 1), (32, 16, 4, 2), (16, 64, 4, 2), (16, 16, 2, 2)]

#: The one configuration used under TRITON_INTERPRET=1, where autotuning would take
#: minutes: 16-row tiles make short test sequences span several blocks (so the masked and
#: unmasked loops both run), and the unequal dK/dV and dQ tiles test block-edge logic.
_INTERPRET_FWD = dict(BLOCK_M=16, BLOCK_N=16)
_INTERPRET_DKDV = dict(BLOCK_M=16, BLOCK_N=32)
_INTERPRET_DQ = dict(BLOCK_M=32, BLOCK_N=16)


def _keep(configs, named_args, **kwargs):
    """Autotune pruning: drop the candidates that cannot pay off for this call.

    BLOCK_M tiles the query sequence and BLOCK_N the key sequence in all three kernels.
    """
    args = {**named_args, **kwargs}
    head_dim, q_bucket, kv_bucket = args["HEAD_DIM"], args["Q_BUCKET"], args["KV_BUCKET"]
    longest = max(q_bucket, kv_bucket)
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        # a tile longer than its sequence only computes padding
        if bm > max(16, q_bucket) or bn > max(16, kv_bucket):
            continue
        # 16-wide tiles only serve sequences too short for anything else
        if (bm == 16 and q_bucket > 64) or (bn == 16 and kv_bucket > 64):
            continue
        # long sequences: small tiles re-read K/V (or Q/dO) too often; at D = 256 the
        # register file allows nothing bigger
        if longest >= 1024 and max(bm, bn) < 64 and head_dim < 256:
            continue
        # short sequences: 128-wide tiles leave too few programs to fill the SMs; a wide
        # key tile at a small head dim keeps the query tile (and the program count) and
        # spends its registers on the scores instead of on D
        if longest <= 256 and max(bm, bn) > 64 and not (head_dim <= 32 and bm <= 64):
            continue
        # one stage only where loops are a few iterations long: there the registers the
        # pipeline buffers cost (2.4x at D = 16 fp32, ptxas -v) decide the occupancy
        if c.num_stages == 1 and longest > 256:
            continue
        # two warps carry the tiles of small head dims over short loops, nothing bigger
        if c.num_warps == 2 and bm * bn >= 2048 and (head_dim > 32 or longest > 512):
            continue
        # one warpgroup holding a 128 x D fp32 accumulator spills from D = 128 on (ptxas -v)
        if bm == 128 and c.num_warps == 4 and head_dim >= 128:
            continue
        # at D = 256 a 128 x 256 fp32 accumulator alone fills the register file
        if head_dim >= 256 and (max(bm, bn) > 64 or c.num_stages > 2):
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _configs(candidates):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in candidates]


#: Autotune key: sequence lengths by power-of-two bucket (a growing KV cache must not retune
#: at every step), the padded head dim, causality; tensor dtypes are added by Triton.
_KEY = ["Q_BUCKET", "KV_BUCKET", "HEAD_DIM", "CAUSAL"]


# ----------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------

@triton.jit
def _load_tile(ptrs, row_ok, offs_d, D: tl.constexpr, HEAD_DIM: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """A [rows, HEAD_DIM] tile; padded dims, and rows failing ``row_ok``, read 0."""
    if CHECK_ROWS:
        if D == HEAD_DIM:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    else:
        if D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, row_ok, offs_d, D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store the rows passing ``row_ok`` and the real (unpadded) dims of a tile."""
    if D == HEAD_DIM:
        tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _kv_len(KV_LENS, b, Skv, HAS_KV_LENS: tl.constexpr):
    """Key length of sequence ``b``, clamped to [0, Skv] so no read leaves the tensor."""
    if HAS_KV_LENS:
        n = tl.load(KV_LENS + b).to(tl.int32)
        n = tl.minimum(tl.maximum(n, 0), Skv)
    else:
        n = Skv
    return n


@triton.jit
def _block_order(n_blocks, SEQ_CHUNK, LONGEST_LAST: tl.constexpr):
    """(block, sequence) of this program in a 1-D grid of n_blocks x sequences programs.

    Programs start in the order of their ids. Sequences (batch x head rows) go in chunks of
    SEQ_CHUNK, whose K/V (or Q/dO) the launcher sized to share L2; within a chunk the
    blocks run longest first across all its sequences, so the programs that start last
    are short ones and no SM is left with a long block after the others ran dry (the
    plain sequence-major order left 7-15% of the GPU idle at the end, in a list-scheduling
    model of the causal D128 case). With LONGEST_LAST the last block is the longest
    (causal query blocks); else the first (causal key blocks).
    """
    pid = tl.program_id(0)
    n_seq = tl.num_programs(0) // n_blocks
    per_chunk = SEQ_CHUNK * n_blocks
    chunk = pid // per_chunk
    within = pid - chunk * per_chunk
    in_chunk = tl.minimum(SEQ_CHUNK, n_seq - chunk * SEQ_CHUNK)
    rank = within // in_chunk
    seq = chunk * SEQ_CHUNK + within - rank * in_chunk
    if LONGEST_LAST:
        block = n_blocks - 1 - rank
    else:
        block = rank
    return block, seq


@triton.jit
def _query_block(KV_LENS, H, GROUP, Sq, Skv, SEQ_CHUNK, CAUSAL: tl.constexpr,
                 HAS_KV_LENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    """Indices of a query-block program (grid: query blocks x batch*heads, ordered by
    _block_order: causal blocks near the end see the most keys and run first)."""
    pid_m, pid_bh = _block_order(tl.cdiv(Sq, BLOCK_M), SEQ_CHUNK, CAUSAL)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    kv_len = _kv_len(KV_LENS, b, Skv, HAS_KV_LENS)
    shift = kv_len - Sq
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    return pid_bh, b, h, hk, kv_len, shift, start_m, offs_m, offs_n, offs_d, offs_m < Sq


@triton.jit
def _kv_bounds(start_m, Sq, kv_len, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key range of query block ``start_m``: [0, full) needs no mask, [full, hi) does.

    ``full`` is a multiple of BLOCK_N: the keys every row of the block sees.
    """
    if CAUSAL:
        shift = kv_len - Sq
        hi = tl.minimum(kv_len, tl.minimum(start_m + BLOCK_M, Sq) + shift)
        full = tl.minimum(kv_len, start_m + 1 + shift)
    else:
        hi = kv_len
        full = kv_len
    hi = tl.maximum(hi, 0)
    full = tl.maximum(full, 0) // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _visible(offs_m, offs_n, kv_len, shift, CAUSAL: tl.constexpr):
    """[len(offs_m), len(offs_n)] mask of the (query, key) pairs the mask lets through."""
    ok = offs_n[None, :] < kv_len
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + shift)
    return ok


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, lo, hi,
               offs_m, offs_d, kv_len, shift, qk_scale,
               D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
               MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key blocks [lo, hi); scores are kept in base 2."""
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs += lo * stride_ks
    v_ptrs += lo * stride_vs
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_ptrs, cols < kv_len, offs_d, D, HEAD_DIM, MASK)
        qk = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        if MASK:
            s = tl.where(_visible(offs_m, cols, kv_len, shift, CAUSAL), qk * qk_scale,
                         float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with no visible key yet keeps max -inf; shift by 0 so exp2 gives 0
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
        else:
            # scale > 0 (checked by the caller), so max(qk) * scale is the scaled max and
            # the scale folds into one fused multiply-add per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs, cols < kv_len, offs_d, D, HEAD_DIM, MASK)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KV_LENS,  # Q, O (B, H, Sq, D); K, V (B, H // GROUP, Skv, D);
                               # LSE (B, H, Sq) fp32 contiguous; KV_LENS (B,) int
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    H, GROUP, Sq, Skv, Q_BUCKET, KV_BUCKET, SEQ_CHUNK,
    qk_scale,  # softmax scale * log2(e)
    D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1. This program's query block and head (longest causal blocks first).
    pid_bh, b, h, hk, kv_len, shift, start_m, offs_m, offs_n, offs_d, row_ok = _query_block(
        KV_LENS, H, GROUP, Sq, Skv, SEQ_CHUNK, CAUSAL, HAS_KV_LENS, BLOCK_M, BLOCK_N,
        HEAD_DIM)

    # 2. The query tile stays in registers for the whole key loop.
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = _load_tile(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                   row_ok, offs_d, D, HEAD_DIM, True)
    k_ptrs = (K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
              + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd)
    v_ptrs = (V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
              + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd)

    # 3. Key blocks every row sees in full, then the blocks cut by the mask.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full, hi = _kv_bounds(start_m, Sq, kv_len, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs,
                               0, full, offs_m, offs_d, kv_len, shift, qk_scale,
                               D, HEAD_DIM, CAUSAL, False, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs,
                               full, hi, offs_m, offs_d, kv_len, shift, qk_scale,
                               D, HEAD_DIM, CAUSAL, True, BLOCK_M, BLOCK_N)

    # 4. Normalise; rows that saw no key have l = 0 and acc = 0: output 0, LSE -inf.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    _store_tile(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                out.to(O.dtype.element_ty), row_ok, offs_d, D, HEAD_DIM)
    tl.store(LSE + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=row_ok)


_fwd_tuned = triton.autotune(_configs(_FWD_CANDIDATES), key=_KEY,
                             prune_configs_by={"early_config_prune": _keep})(_fwd_kernel)


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------

@triton.jit
def _log2_lse(LSE_ROW, offs_m, row_ok):
    """LSE of the rows in base 2; +inf for rows that saw no key (and padding rows), so
    that exp2(score - lse) is exactly 0 there."""
    lse = tl.load(LSE_ROW + offs_m, mask=row_ok, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE_ROW, DELTA_ROW, stride_qs, stride_dos,
                lo, hi, offs_n, offs_d, Sq, kv_len, shift, qk_scale,
                D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi), transposed (keys as
    rows) so that P^T and dS^T come out of the dots without a transpose."""
    offs_m = tl.arange(0, BLOCK_M)
    q_ptrs += lo * stride_qs
    do_ptrs += lo * stride_dos
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Sq
        q = _load_tile(q_ptrs, row_ok, offs_d, D, HEAD_DIM, True)
        lse2 = _log2_lse(LSE_ROW, rows, row_ok)
        qkT = dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))
        pT = tl.exp2(qkT * qk_scale - lse2[None, :])
        if MASK:
            ok = offs_n[:, None] < kv_len
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= rows[None, :] + shift)
            pT = tl.where(ok, pT, 0.0)
        do = _load_tile(do_ptrs, row_ok, offs_d, D, HEAD_DIM, True)
        dv = dot(pT.to(do.dtype), do, dv)
        delta = tl.load(DELTA_ROW + rows, mask=row_ok, other=0.0)
        dpT = dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))
        dsT = pT * (dpT - delta[None, :])
        dk = dot(dsT.to(q.dtype), q, dk)
        q_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_dos
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KV_LENS,  # Q, DO (B, H, Sq, D); K, V, DK, DV
                                               # (B, H // GROUP, Skv, D); LSE, DELTA
                                               # (B, H, Sq) fp32; KV_LENS (B,) int
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    H, GROUP, Sq, Skv, Q_BUCKET, KV_BUCKET, SEQ_CHUNK,
    qk_scale, sm_scale,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1. This program's key block and kv head (causal: the first key blocks, seen by the
    #    most queries, run first).
    H_KV = H // GROUP
    pid_n, pid_bh = _block_order(tl.cdiv(Skv, BLOCK_N), SEQ_CHUNK, False)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    kv_len = _kv_len(KV_LENS, b, Skv, HAS_KV_LENS)
    shift = kv_len - Sq
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < kv_len

    # 2. Query blocks that see this key block: from the first row reaching key start_n;
    #    those cut by the diagonal (or a key block cut by kv_len) need the mask.
    end = tl.cdiv(Sq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    mid = tl.where(start_n + BLOCK_N > kv_len, end, mid)
    # a block of keys past the sequence: gradient 0, nothing to loop over
    end = tl.where(start_n >= kv_len, 0, end)
    lo = tl.minimum(lo, end)
    mid = tl.minimum(tl.maximum(mid, lo), end)

    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    k = _load_tile(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                   key_ok, offs_d, D, HEAD_DIM, True)
    v = _load_tile(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                   key_ok, offs_d, D, HEAD_DIM, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # 3. Sum over the q heads of the group in a fixed order: deterministic, no atomics.
    offs_m = tl.arange(0, BLOCK_M)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                  + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd)
        do_ptrs = (DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                   + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod)
        row0 = (b * H + h).to(tl.int64) * Sq
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE + row0, DELTA + row0,
                             stride_qs, stride_dos, lo, mid, offs_n, offs_d, Sq, kv_len,
                             shift, qk_scale, D, HEAD_DIM, CAUSAL, True, BLOCK_M, BLOCK_N)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE + row0, DELTA + row0,
                             stride_qs, stride_dos, mid, end, offs_n, offs_d, Sq, kv_len,
                             shift, qk_scale, D, HEAD_DIM, CAUSAL, False, BLOCK_M, BLOCK_N)

    # 4. dS was taken w.r.t. scaled scores: dK picks up the softmax scale once, here.
    all_keys = offs_n < Skv
    _store_tile(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
                + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
                (dk * sm_scale).to(DK.dtype.element_ty), all_keys, offs_d, D, HEAD_DIM)
    _store_tile(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
                + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
                dv.to(DV.dtype.element_ty), all_keys, offs_d, D, HEAD_DIM)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, lo, hi,
              offs_m, offs_d, kv_len, shift, qk_scale,
              D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
              MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs += lo * stride_ks
    v_ptrs += lo * stride_vs
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_ptrs, cols < kv_len, offs_d, D, HEAD_DIM, MASK)
        v = _load_tile(v_ptrs, cols < kv_len, offs_d, D, HEAD_DIM, MASK)
        qk = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        p = tl.exp2(qk * qk_scale - lse2[:, None])
        if MASK:
            p = tl.where(_visible(offs_m, cols, kv_len, shift, CAUSAL), p, 0.0)
        dp = dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(k.dtype), k, dq)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, O, DQ, LSE, DLSE, DELTA, KV_LENS,  # Q, DO, O, DQ (B, H, Sq, D); K, V
                                                    # (B, H // GROUP, Skv, D); LSE, DLSE,
                                                    # DELTA (B, H, Sq) fp32; KV_LENS (B,)
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    H, GROUP, Sq, Skv, Q_BUCKET, KV_BUCKET, SEQ_CHUNK,
    qk_scale, sm_scale,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # 1. This program's query block and head (longest causal blocks first, as forward).
    pid_bh, b, h, hk, kv_len, shift, start_m, offs_m, offs_n, offs_d, row_ok = _query_block(
        KV_LENS, H, GROUP, Sq, Skv, SEQ_CHUNK, CAUSAL, HAS_KV_LENS, BLOCK_M, BLOCK_N,
        HEAD_DIM)

    # 2. Everything per query row stays in registers: Q, dO, LSE, delta. This kernel runs
    #    first and writes delta_i = sum_d dO_id * O_id for the dK/dV kernel (the softmax-
    #    backward row term; a gradient flowing into the LSE adds dLSE_i * P_ij to dS_ij,
    #    which is the same as delta_i - dLSE_i): no separate launch computes it.
    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                   + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                   row_ok, offs_d, D, HEAD_DIM, True)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                    + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                    row_ok, offs_d, D, HEAD_DIM, True)
    lse2 = _log2_lse(LSE + pid_bh.to(tl.int64) * Sq, offs_m, row_ok)
    o = _load_tile(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                   + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                   row_ok, offs_d, D, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = pid_bh.to(tl.int64) * Sq + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=row_ok, other=0.0)
    tl.store(DELTA + rows, delta, mask=row_ok)
    k_ptrs = (K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
              + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd)
    v_ptrs = (V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
              + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd)

    # 3. The key loop, split like the forward's.
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full, hi = _kv_bounds(start_m, Sq, kv_len, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, 0, full,
                   offs_m, offs_d, kv_len, shift, qk_scale, D, HEAD_DIM, CAUSAL, False,
                   BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, full, hi,
                   offs_m, offs_d, kv_len, shift, qk_scale, D, HEAD_DIM, CAUSAL, True,
                   BLOCK_M, BLOCK_N)

    # 4. Softmax scale, applied once.
    _store_tile(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
                + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
                (dq * sm_scale).to(DQ.dtype.element_ty), row_ok, offs_d, D, HEAD_DIM)


_dkdv_tuned = triton.autotune(_configs(_DKDV_CANDIDATES), key=_KEY,
                              prune_configs_by={"early_config_prune": _keep})(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_configs(_DQ_CANDIDATES), key=_KEY,
                            prune_configs_by={"early_config_prune": _keep})(_bwd_dq_kernel)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------

#: Tuned configuration per (kernel, dtype, key values): see _launch().
_BEST = {}


def _launch(tuned, plain, interpret_config, grid, key, *args, **kwargs):
    """Run ``plain`` with the configuration ``tuned`` picked for ``key``.

    The first call for a key autotunes; later calls launch the plain kernel with the
    remembered configuration, skipping the autotuner's per-call argument handling (tens of
    microseconds of host time per launch, as much as a short sequence's kernels take on
    the GPU). ``key`` must determine the autotuner's own key: the values of ``_KEY`` and
    the dtypes of the tensor arguments. Under the interpreter a fixed configuration runs.
    """
    if INTERPRETING:
        plain[grid(interpret_config)](*args, **kwargs, **interpret_config)
        return
    best = _BEST.get((plain, key))
    if best is None:
        tuned[grid](*args, **kwargs)
        _BEST[(plain, key)] = best = (dict(tuned.best_config.all_kwargs()),
                                      dict(tuned.best_config.kwargs))
        return
    plain[grid(best[1])](*args, **kwargs, **best[0])


#: Bytes of the tensors a chunk of sequences re-reads (K and V for the query kernels, Q and
#: dO for dK/dV) that the programs running at once should keep in L2 (50-60 MB on Hopper):
#: about a third of it, as two chunks can be in flight at a chunk's edge.
_L2_CHUNK_BYTES = 16 << 20


def _seq_chunk(n_seq: int, seq_bytes: int) -> int:
    """Sequences per chunk of _block_order: as many as share _L2_CHUNK_BYTES."""
    return max(1, min(n_seq, _L2_CHUNK_BYTES // max(seq_bytes, 1)))


def _query_chunk(q: torch.Tensor, k: torch.Tensor) -> int:
    """Chunk of the query-block kernels: a q head reads its kv head's K and V rows, shared
    by the q heads of its group."""
    group = q.shape[1] // k.shape[1]
    return _seq_chunk(q.shape[0] * q.shape[1],
                      2 * k.shape[2] * k.shape[3] * k.element_size() // group)


def _key_chunk(q: torch.Tensor, k: torch.Tensor) -> int:
    """Chunk of the dK/dV kernel: a kv head reads the Q and dO rows of its group's q heads."""
    group = q.shape[1] // k.shape[1]
    return _seq_chunk(k.shape[0] * k.shape[1],
                      2 * group * q.shape[2] * q.shape[3] * q.element_size())


def _shape_args(q: torch.Tensor, k: torch.Tensor):
    """Constexpr and bucket arguments shared by the three attention kernels."""
    d = q.shape[-1]
    return dict(D=d, HEAD_DIM=max(16, next_power_of_2(d)),
                Q_BUCKET=next_power_of_2(q.shape[2]), KV_BUCKET=next_power_of_2(k.shape[2]))


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      kv_lens, causal: bool, scale: float):
    """O (layout of ``q``) and LSE (B, Hq, Sq) fp32 of attention; inputs already checked."""
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, q_len), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    shape = _shape_args(q, k)
    lens = kv_lens if kv_lens is not None else lse
    key = (q.dtype, lens.dtype, shape["Q_BUCKET"], shape["KV_BUCKET"], shape["HEAD_DIM"],
           causal)
    _launch(_fwd_tuned, _fwd_kernel, _INTERPRET_FWD,
            lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]) * batch * heads,), key,
            q, k, v, out, lse, lens,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, heads // k.shape[1], q_len, kv_len, shape.pop("Q_BUCKET"),
            shape.pop("KV_BUCKET"), _query_chunk(q, k), scale * LOG2E,
            CAUSAL=causal, HAS_KV_LENS=kv_lens is not None, **shape)
    return out, lse


def attention_backward(grad_out: torch.Tensor, grad_lse, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, kv_lens,
                       causal: bool, scale: float):
    """dQ, dK, dV (layouts of q, k, v) given dO and, optionally, the gradient of the LSE."""
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    shape = _shape_args(q, k)
    q_bucket, kv_bucket = shape.pop("Q_BUCKET"), shape.pop("KV_BUCKET")
    lens = kv_lens if kv_lens is not None else lse
    group = heads // kv_heads
    key = (q.dtype, grad_out.dtype, lens.dtype, q_bucket, kv_bucket, shape["HEAD_DIM"],
           causal)

    # 1. dQ per query block; it also writes delta = rowsum(dO * O) - dLSE for step 2
    delta = torch.empty_like(lse)
    dlse = grad_lse.contiguous() if grad_lse is not None else lse
    _launch(_dq_tuned, _bwd_dq_kernel, _INTERPRET_DQ,
            lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]) * batch * heads,), key,
            q, k, v, grad_out, out, dq, lse, dlse, delta, lens,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *out.stride(),
            *dq.stride(), heads, group, q_len, kv_len, q_bucket, kv_bucket,
            _query_chunk(q, k), scale * LOG2E,
            scale, CAUSAL=causal, HAS_KV_LENS=kv_lens is not None,
            HAS_DLSE=grad_lse is not None, **shape)

    # 2. dK, dV per key block, summed over the query heads of each group
    _launch(_dkdv_tuned, _bwd_dkdv_kernel, _INTERPRET_DKDV,
            lambda meta: (triton.cdiv(kv_len, meta["BLOCK_N"]) * batch * kv_heads,), key,
            q, k, v, grad_out, dk, dv, lse, delta, lens,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(),
            *dv.stride(), heads, group, q_len, kv_len, q_bucket, kv_bucket,
            _key_chunk(q, k), scale * LOG2E, scale, CAUSAL=causal,
            HAS_KV_LENS=kv_lens is not None, **shape)
    return dq, dk, dv

