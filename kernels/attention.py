"""Flash attention for training: forward, and a deterministic backward, in Triton.

Layout (B, H, S, D) with any strides: every tensor is addressed through its four strides,
so a transposed view of a (B, S, H, D) projection is read in place. Query heads map to key
heads by ``h // GROUP`` (GQA/MQA without copying keys). The mask is aligned bottom-right:
with ``shift = kv_len - q_len`` query ``i`` sees key ``j`` iff ``j < kv_len`` and, when
causal, ``j <= i + shift``; ``kv_len`` is per sequence when ``kv_lens`` is given. A query
that sees no key gets output 0, LSE -inf, and gradient 0.

Packed layout (VARLEN): tensors (total, H, D) hold B sequences cut by int32 offsets
cu_seqlens (B + 1,); the grid covers max_seqlen blocks x B * H and each program reads its
sequence's first token and length from the offsets on the device (no host sync), then
works as in the dense case on that sequence; blocks past its length do nothing.

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
Options, each a constexpr flag compiled out when off: a sliding window (keys with
-right <= i + shift - j <= left; blocks outside every row's window are skipped, like those
above the causal diagonal), softcap (scores softcap * tanh(scale * qk / softcap), tanh from
exp; the backward multiplies dS by 1 - tanh^2), ALiBi (-slope * |i + shift - j| added),
and dropout of P after the softmax, drawn from a counter-based uint32 hash of (key, b, h,
i, j) (see _kept) that the backward recomputes: no mask is stored.

Key blocks above the causal diagonal are skipped; only blocks that cut the diagonal or
the key length run the masked variant of the inner loop (``MASK`` constexpr). Each kernel's
grid is 1-D, its programs ordered by ``_block_order``: chunks of sequences that share L2,
longest causal blocks first within a chunk (on an H200 this order took the causal bf16
forward from 412 to 436 TFLOP/s at B4 H16 S4096 D128, from 321 to 343 at D64).

The loops keep their K/V (or Q/dO) pointer tiles fixed and add the block's row offset,
in int64 (forward) or int32 (backward, unless a tensor needs int64: see _row): pointer
tiles carried through the loop and advanced cost the causal bf16 forward 13% on an H200
(291 vs 334 TFLOP/s at B8 H16 S2048 D64, CUDA graph replays).

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

from ._common import INTERPRETING, cdiv, dot, next_power_of_2

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
                   (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2),
                   (64, 32, 4, 3), (32, 32, 4, 2), (64, 64, 4, 1), (16, 128, 4, 3),
                   (32, 128, 4, 1), (64, 128, 4, 1), (32, 256, 4, 1), (64, 256, 8, 1),
                   (32, 64, 2, 2), (64, 64, 2, 2), (32, 128, 2, 1), (16, 16, 2, 2)]
_DKDV_CANDIDATES = [(32, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 8, 3),
                    (32, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 1),
                    (16, 64, 4, 2), (16, 32, 4, 2), (16, 16, 2, 2)]
_DQ_CANDIDATES = [(128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3),
                  (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 1), (32, 16, 4, 2),
                  (16, 64, 4, 2), (16, 16, 2, 2)]

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
_KEY = ["Q_BUCKET", "KV_BUCKET", "HEAD_DIM", "CAUSAL", "VARLEN", "WINDOW", "SOFTCAP", "ALIBI",
        "DROPOUT"]


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
def _sequence(KV_LENS, CU_Q, CU_K, b, Sq, Skv, HAS_KV_LENS: tl.constexpr,
              VARLEN: tl.constexpr):
    """(first query token, q_len, first key token, kv_len) of sequence ``b``.

    Packed (VARLEN): read from the offsets on the device. Dense: the sequence starts at
    token 0 of its batch row; kv_len is clamped to [0, Skv] so no read leaves the tensor.
    """
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        kv_len = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = tl.full([], 0, tl.int32)
        q_len = Sq
        k_start = q_start
        if HAS_KV_LENS:
            kv_len = tl.load(KV_LENS + b).to(tl.int32)
            kv_len = tl.minimum(tl.maximum(kv_len, 0), Skv)
        else:
            kv_len = Skv
    return q_start, q_len, k_start, kv_len


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
def _kv_bounds(start_m, q_len, kv_len, shift, win_left, win_right, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of query block ``start_m``: [lo, hi), of which [full_lo, full_hi) needs
    no mask (every row of the block sees those keys); lo, full_lo and full_hi are
    multiples of BLOCK_N. Without a window, lo = full_lo = 0. Keys outside the window of
    every row of the block are never visited."""
    last = tl.minimum(start_m + BLOCK_M, q_len) - 1
    if WINDOW:
        hi = tl.minimum(kv_len, last + shift + win_right + 1)
        full_hi = tl.minimum(kv_len, start_m + shift + win_right + 1)
        lo = tl.maximum(start_m + shift - win_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last + shift - win_left, 0), BLOCK_N) * BLOCK_N
    elif CAUSAL:
        hi = tl.minimum(kv_len, last + 1 + shift)
        full_hi = tl.minimum(kv_len, start_m + 1 + shift)
        lo = 0
        full_lo = 0
    else:
        hi = kv_len
        full_hi = kv_len
        lo = 0
        full_lo = 0
    # a query block past its sequence (packed layout: the grid covers max_seqlen_q)
    hi = tl.where(start_m < q_len, tl.maximum(hi, 0), 0)
    full_hi = tl.minimum(tl.maximum(full_hi, 0), hi) // BLOCK_N * BLOCK_N
    if WINDOW:
        full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.cdiv(hi, BLOCK_N) * BLOCK_N)
        lo = tl.minimum(lo, full_lo)
        full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _q_bounds(start_n, q_len, kv_len, shift, win_left, win_right, CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query range of key block ``start_n``: [lo, end), of which [mid, mid2) needs no mask;
    lo, mid and mid2 are multiples of BLOCK_M. Without a window, mid2 = end."""
    end = tl.cdiv(q_len, BLOCK_M) * BLOCK_M
    if WINDOW:
        key_last = tl.minimum(start_n + BLOCK_N, kv_len) - 1
        lo = tl.maximum(start_n - shift - win_right, 0) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift - win_right, 0),
                      BLOCK_M) * BLOCK_M
        mid2 = tl.maximum(tl.minimum(q_len, start_n - shift + win_left + 1), 0)
        mid2 = mid2 // BLOCK_M * BLOCK_M
        end = tl.maximum(tl.minimum(q_len, key_last - shift + win_left + 1), 0)
    elif CAUSAL:
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        mid2 = end
    else:
        lo = 0
        mid = 0
        mid2 = end
    # a key block cut by kv_len is masked throughout
    cut = start_n + BLOCK_N > kv_len
    mid = tl.where(cut, end, mid)
    if WINDOW:
        mid2 = tl.where(cut, end, mid2)
    # a block of keys past the sequence: gradient 0, nothing to loop over
    end = tl.where(start_n >= kv_len, 0, end)
    lo = tl.minimum(lo, end)
    mid = tl.minimum(tl.maximum(mid, lo), end)
    mid2 = tl.minimum(tl.maximum(mid2, mid), end)
    return lo, mid, mid2, end


@triton.jit
def _visible(queries, keys, kv_len, shift, win_left, win_right, CAUSAL: tl.constexpr,
             WINDOW: tl.constexpr, TRANS: tl.constexpr):
    """Mask of the (query, key) pairs the mask lets through: [queries, keys], or [keys,
    queries] with TRANS."""
    if TRANS:
        rel = queries[None, :] + shift - keys[:, None]
        ok = keys[:, None] < kv_len
    else:
        rel = queries[:, None] + shift - keys[None, :]
        ok = keys[None, :] < kv_len
    if CAUSAL:
        ok = ok & (rel >= 0)
    if WINDOW:
        ok = ok & (rel <= win_left) & (rel >= -win_right)
    return ok


@triton.jit
def _row(start, WIDE: tl.constexpr):
    """Row index (a block's first row, or a tile's rows) to multiply by a token stride:
    int32, unless the launcher found a tensor where row * stride may leave it (WIDE).
    Which is faster depends on the tile (benches/results/h200-2026-12-03d); the backward's
    loops take int32, the forward's int64 (see _fwd_kernel)."""
    if WIDE:
        row = tl.cast(start, tl.int64)
    else:
        row = start
    return row


@triton.jit
def _tanh(x):
    """tanh from exp (libdevice does not run under the interpreter); exact at +-inf."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(qk, queries, keys, shift, qk_scale, softcap_in, softcap_out, slope,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, TRANS: tl.constexpr):
    """Scores in base 2 from the raw dot products, and tanh of the capped scores (the
    softcap backward needs 1 - tanh^2; without softcap the second value is unused).

    softcap: softcap * tanh(scale * qk / softcap) (softcap_in = scale / softcap,
    softcap_out = softcap * log2 e); ALiBi adds -slope * |i + shift - j| (slope in base 2).
    """
    if SOFTCAP:
        t = _tanh(qk * softcap_in)
        s = t * softcap_out
    else:
        t = qk
        s = qk * qk_scale
    if ALIBI:
        if TRANS:
            rel = queries[None, :] + shift - keys[:, None]
        else:
            rel = queries[:, None] + shift - keys[None, :]
        s -= slope * tl.abs(rel).to(tl.float32)
    return s, t


@triton.jit
def _mix32(x):
    """Bijective uint32 hash (xorshift-multiply rounds); fastlab.ops.attention computes the
    same numbers in int64 for the reference."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _row_key(dropout_key, b, h, H):
    """Dropout key of one (sequence, q head): mix(key ^ mix(b * H + h))."""
    return _mix32(dropout_key.to(tl.uint32) ^ _mix32((b * H + h).to(tl.uint32)))


@triton.jit
def _kept(row_key, queries, keys, threshold, TRANS: tl.constexpr):
    """Which probabilities dropout keeps: mix(mix(row_key ^ i) ^ (j * GOLDEN)) >> 1 >=
    threshold, i and j positions within the sequence (counter-based: the backward draws
    the same numbers, no mask is stored)."""
    u = _mix32(row_key ^ queries.to(tl.uint32))
    kj = keys.to(tl.uint32) * 0x9E3779B1
    if TRANS:
        x = _mix32(u[None, :] ^ kj[:, None])
    else:
        x = _mix32(u[:, None] ^ kj[None, :])
    return (x >> 1).to(tl.int32) >= threshold


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, lo, hi,
               offs_m, offs_d, kv_len, shift, qk_scale, win_left, win_right, softcap_in,
               softcap_out, slope, row_key, threshold,
               D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
               DROPOUT: tl.constexpr, MASK: tl.constexpr, WIDE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key blocks [lo, hi); scores are kept in base 2."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        row = _row(start_n, WIDE)
        k = _load_tile(k_ptrs + row * stride_ks, cols < kv_len, offs_d, D, HEAD_DIM, MASK)
        qk = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        if MASK:
            s, _ = _scores(qk, offs_m, cols, shift, qk_scale, softcap_in, softcap_out, slope,
                           SOFTCAP, ALIBI, False)
            s = tl.where(_visible(offs_m, cols, kv_len, shift, win_left, win_right, CAUSAL,
                                  WINDOW, False), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with no visible key yet keeps max -inf; shift by 0 so exp2 gives 0
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
        elif SOFTCAP or ALIBI:
            s, _ = _scores(qk, offs_m, cols, shift, qk_scale, softcap_in, softcap_out, slope,
                           SOFTCAP, ALIBI, False)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
            p = tl.exp2(s - m_use[:, None])
        else:
            # scale > 0 (checked by the caller), so max(qk) * scale is the scaled max and
            # the scale folds into one fused multiply-add per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs + row * stride_vs, cols < kv_len, offs_d, D, HEAD_DIM, MASK)
        if DROPOUT:
            # the normaliser sums every probability; only the kept ones reach O
            p = tl.where(_kept(row_key, offs_m, cols, threshold, False), p, 0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KV_LENS, CU_Q, CU_K, SLOPES,
    # Q, O (B, H, Sq, D) or packed (total_q, H, D); K, V (B, H // GROUP, Skv, D) or
    # (total_k, H // GROUP, D); LSE (B, H, Sq) or (H, total_q) fp32, token stride 1;
    # KV_LENS (B,) int; CU_Q, CU_K (B + 1,) int32; SLOPES (B, H) or (H,) fp32 slopes
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ab, stride_ah,
    H, GROUP, Sq, Skv, Q_BUCKET, KV_BUCKET, SEQ_CHUNK,  # packed: Sq, Skv the maxima
    qk_scale,  # softmax scale * log2(e)
    win_left, win_right, softcap_in, softcap_out, dropout_key, threshold, keep_scale,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, VARLEN: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1. This program's query block, head and sequence (causal: blocks near the end see
    #    the most keys and run first).
    pid_m, pid_bh = _block_order(tl.cdiv(Sq, BLOCK_M), SEQ_CHUNK, CAUSAL)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len, k_start, kv_len = _sequence(KV_LENS, CU_Q, CU_K, b, Sq, Skv,
                                                HAS_KV_LENS, VARLEN)
    shift = kv_len - q_len
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + b * stride_ab + h * stride_ah) * _LOG2E
    row_key = 0
    if DROPOUT:
        row_key = _row_key(dropout_key, b, h, H)

    # 2. The query tile stays in registers for the whole key loop.
    q_base = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + q_start.to(tl.int64) * stride_qs)
    q = _load_tile(q_base + _row(offs_m, WIDE)[:, None] * stride_qs
                   + offs_d[None, :] * stride_qd,
                   row_ok, offs_d, D, HEAD_DIM, True)
    k_ptrs = (K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
              + k_start.to(tl.int64) * stride_ks
              + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd)
    v_ptrs = (V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
              + k_start.to(tl.int64) * stride_vs
              + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd)

    # 3. Key blocks every row sees in full, and on either side the blocks cut by the mask
    #    (with a window, also those below it). The key loop's offsets are int64 whatever
    #    WIDE says: at the 64 x 64, 4-warp tile int32 ones ran 315 TFLOP/s against 338-345
    #    for int64 in two runs (B8 H16 S2048 D64 on an H200, results/h200-2026-12-03d).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _kv_bounds(start_m, q_len, kv_len, shift, win_left, win_right,
                                          CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    if WINDOW:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs,
                                   lo, full_lo, offs_m, offs_d, kv_len, shift, qk_scale,
                                   win_left, win_right, softcap_in, softcap_out, slope,
                                   row_key, threshold, D, HEAD_DIM, CAUSAL, WINDOW, SOFTCAP,
                                   ALIBI, DROPOUT, True, True, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs,
                               full_lo, full_hi, offs_m, offs_d, kv_len, shift, qk_scale,
                               win_left, win_right, softcap_in, softcap_out, slope, row_key,
                               threshold, D, HEAD_DIM, CAUSAL, WINDOW, SOFTCAP, ALIBI,
                               DROPOUT, False, True, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs,
                               full_hi, hi, offs_m, offs_d, kv_len, shift, qk_scale,
                               win_left, win_right, softcap_in, softcap_out, slope, row_key,
                               threshold, D, HEAD_DIM, CAUSAL, WINDOW, SOFTCAP, ALIBI,
                               DROPOUT, True, True, BLOCK_M, BLOCK_N)

    # 4. Normalise; rows that saw no key have l = 0 and acc = 0: output 0, LSE -inf.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    if DROPOUT:
        l_safe = l_safe / keep_scale
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
    o_base = (O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + q_start.to(tl.int64) * stride_os)
    _store_tile(o_base + _row(offs_m, WIDE)[:, None] * stride_os
                + offs_d[None, :] * stride_od,
                out.to(O.dtype.element_ty), row_ok, offs_d, D, HEAD_DIM)
    tl.store(LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m,
             lse, mask=row_ok)


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
                lo, hi, offs_n, offs_d, q_len, kv_len, shift, qk_scale, win_left, win_right,
                softcap_in, softcap_out, slope, row_key, threshold, keep_scale,
                D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                DROPOUT: tl.constexpr, MASK: tl.constexpr, WIDE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi), transposed (keys as
    rows) so that P^T and dS^T come out of the dots without a transpose. dV is left
    without dropout's 1 / (1 - p), applied once by the caller."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < q_len
        row = _row(start_m, WIDE)
        q = _load_tile(q_ptrs + row * stride_qs, row_ok, offs_d, D, HEAD_DIM, True)
        lse2 = _log2_lse(LSE_ROW, rows, row_ok)
        qkT = dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))
        sT, tT = _scores(qkT, rows, offs_n, shift, qk_scale, softcap_in, softcap_out, slope,
                         SOFTCAP, ALIBI, True)
        pT = tl.exp2(sT - lse2[None, :])
        if MASK:
            pT = tl.where(_visible(rows, offs_n, kv_len, shift, win_left, win_right, CAUSAL,
                                   WINDOW, True), pT, 0.0)
        do = _load_tile(do_ptrs + row * stride_dos, row_ok, offs_d, D, HEAD_DIM, True)
        delta = tl.load(DELTA_ROW + rows, mask=row_ok, other=0.0)
        dpT = dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))
        if DROPOUT:
            keep = _kept(row_key, rows, offs_n, threshold, True)
            dv = dot(tl.where(keep, pT, 0.0).to(do.dtype), do, dv)
            dpT = tl.where(keep, dpT * keep_scale, 0.0)
        else:
            dv = dot(pT.to(do.dtype), do, dv)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KV_LENS, CU_Q, CU_K, SLOPES,
    # Q, DO as Q; K, V, DK, DV as K; LSE, DELTA as the forward's LSE; the rest as forward
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_lb, stride_lh, stride_ab, stride_ah,
    H, GROUP, Sq, Skv, Q_BUCKET, KV_BUCKET, SEQ_CHUNK,
    qk_scale, sm_scale,
    win_left, win_right, softcap_in, softcap_out, dropout_key, threshold, keep_scale,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, VARLEN: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1. This program's key block and kv head (causal: the first key blocks, seen by the
    #    most queries, run first).
    H_KV = H // GROUP
    pid_n, pid_bh = _block_order(tl.cdiv(Skv, BLOCK_N), SEQ_CHUNK, False)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    q_start, q_len, k_start, kv_len = _sequence(KV_LENS, CU_Q, CU_K, b, Sq, Skv,
                                                HAS_KV_LENS, VARLEN)
    shift = kv_len - q_len
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < kv_len

    # 2. Query blocks that see this key block: from the first row reaching key start_n
    #    (to the last row reaching it, with a window); those cut by the mask (or a key
    #    block cut by kv_len) take the masked loop.
    lo, mid, mid2, end = _q_bounds(start_n, q_len, kv_len, shift, win_left, win_right,
                                   CAUSAL, WINDOW, BLOCK_M, BLOCK_N)

    k_base = (K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
              + k_start.to(tl.int64) * stride_ks)
    v_base = (V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
              + k_start.to(tl.int64) * stride_vs)
    k = _load_tile(k_base + _row(offs_n, WIDE)[:, None] * stride_ks
                   + offs_d[None, :] * stride_kd,
                   key_ok, offs_d, D, HEAD_DIM, True)
    v = _load_tile(v_base + _row(offs_n, WIDE)[:, None] * stride_vs
                   + offs_d[None, :] * stride_vd,
                   key_ok, offs_d, D, HEAD_DIM, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # 3. Sum over the q heads of the group in a fixed order: deterministic, no atomics.
    offs_m = tl.arange(0, BLOCK_M)
    for g in range(GROUP):
        h = hk * GROUP + g
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + b * stride_ab + h * stride_ah) * _LOG2E
        row_key = 0
        if DROPOUT:
            row_key = _row_key(dropout_key, b, h, H)
        q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                  + q_start.to(tl.int64) * stride_qs
                  + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd)
        do_ptrs = (DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                   + q_start.to(tl.int64) * stride_dos
                   + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod)
        row0 = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE + row0, DELTA + row0,
                             stride_qs, stride_dos, lo, mid, offs_n, offs_d, q_len, kv_len,
                             shift, qk_scale, win_left, win_right, softcap_in, softcap_out,
                             slope, row_key, threshold, keep_scale, D, HEAD_DIM, CAUSAL,
                             WINDOW, SOFTCAP, ALIBI, DROPOUT, True, WIDE, BLOCK_M, BLOCK_N)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE + row0, DELTA + row0,
                             stride_qs, stride_dos, mid, mid2, offs_n, offs_d, q_len, kv_len,
                             shift, qk_scale, win_left, win_right, softcap_in, softcap_out,
                             slope, row_key, threshold, keep_scale, D, HEAD_DIM, CAUSAL,
                             WINDOW, SOFTCAP, ALIBI, DROPOUT, False, WIDE, BLOCK_M, BLOCK_N)
        if WINDOW:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE + row0, DELTA + row0,
                                 stride_qs, stride_dos, mid2, end, offs_n, offs_d, q_len,
                                 kv_len, shift, qk_scale, win_left, win_right, softcap_in,
                                 softcap_out, slope, row_key, threshold, keep_scale, D,
                                 HEAD_DIM, CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT, True, WIDE,
                                 BLOCK_M, BLOCK_N)

    # 4. dS was taken w.r.t. scaled scores: dK picks up the softmax scale once, here (and
    #    dV dropout's 1 / (1 - p)). Dense: padding keys past kv_len get 0; packed: the keys
    #    past kv_len belong to the next sequence.
    if VARLEN:
        store_ok = key_ok
    else:
        store_ok = offs_n < Skv
    if DROPOUT:
        dv = dv * keep_scale
    _store_tile(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
                + k_start.to(tl.int64) * stride_dks
                + _row(offs_n, WIDE)[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
                (dk * sm_scale).to(DK.dtype.element_ty), store_ok, offs_d, D, HEAD_DIM)
    _store_tile(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
                + k_start.to(tl.int64) * stride_dvs
                + _row(offs_n, WIDE)[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
                dv.to(DV.dtype.element_ty), store_ok, offs_d, D, HEAD_DIM)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, lo, hi,
              offs_m, offs_d, kv_len, shift, qk_scale, win_left, win_right, softcap_in,
              softcap_out, slope, row_key, threshold, keep_scale,
              D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              DROPOUT: tl.constexpr, MASK: tl.constexpr, WIDE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        row = _row(start_n, WIDE)
        k = _load_tile(k_ptrs + row * stride_ks, cols < kv_len, offs_d, D, HEAD_DIM, MASK)
        v = _load_tile(v_ptrs + row * stride_vs, cols < kv_len, offs_d, D, HEAD_DIM, MASK)
        qk = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        s, t = _scores(qk, offs_m, cols, shift, qk_scale, softcap_in, softcap_out, slope,
                       SOFTCAP, ALIBI, False)
        p = tl.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(_visible(offs_m, cols, kv_len, shift, win_left, win_right, CAUSAL,
                                  WINDOW, False), p, 0.0)
        dp = dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        if DROPOUT:
            dp = tl.where(_kept(row_key, offs_m, cols, threshold, False), dp * keep_scale,
                          0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, O, DQ, LSE, DLSE, DELTA, KV_LENS, CU_Q, CU_K, SLOPES,
    # Q, DO, O, DQ as Q; K, V as K; LSE, DLSE, DELTA as the forward's LSE; the rest as
    # forward
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_lb, stride_lh, stride_ab, stride_ah,
    H, GROUP, Sq, Skv, Q_BUCKET, KV_BUCKET, SEQ_CHUNK,
    qk_scale, sm_scale,
    win_left, win_right, softcap_in, softcap_out, dropout_key, threshold, keep_scale,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr, WIDE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # 1. This program's query block and head (longest causal blocks first, as forward).
    pid_m, pid_bh = _block_order(tl.cdiv(Sq, BLOCK_M), SEQ_CHUNK, CAUSAL)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len, k_start, kv_len = _sequence(KV_LENS, CU_Q, CU_K, b, Sq, Skv,
                                                HAS_KV_LENS, VARLEN)
    shift = kv_len - q_len
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + b * stride_ab + h * stride_ah) * _LOG2E
    row_key = 0
    if DROPOUT:
        row_key = _row_key(dropout_key, b, h, H)

    # 2. Everything per query row stays in registers: Q, dO, LSE, delta. This kernel runs
    #    first and writes delta_i = sum_d dO_id * O_id for the dK/dV kernel (the softmax-
    #    backward row term; a gradient flowing into the LSE adds dLSE_i * P_ij to dS_ij,
    #    which is the same as delta_i - dLSE_i): no separate launch computes it. With
    #    dropout, sum_j P_ij dP_ij is still rowsum(dO * O), since O = P_kept V.
    q_off = q_start.to(tl.int64)
    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                   + q_off * stride_qs
                   + _row(offs_m, WIDE)[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                   row_ok, offs_d, D, HEAD_DIM, True)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                    + q_off * stride_dos
                    + _row(offs_m, WIDE)[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                    row_ok, offs_d, D, HEAD_DIM, True)
    row0 = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_off
    lse2 = _log2_lse(LSE + row0, offs_m, row_ok)
    o = _load_tile(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                   + q_off * stride_os
                   + _row(offs_m, WIDE)[:, None] * stride_os + offs_d[None, :] * stride_od,
                   row_ok, offs_d, D, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = row0 + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=row_ok, other=0.0)
    tl.store(DELTA + rows, delta, mask=row_ok)
    k_ptrs = (K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
              + k_start.to(tl.int64) * stride_ks
              + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd)
    v_ptrs = (V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
              + k_start.to(tl.int64) * stride_vs
              + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd)

    # 3. The key loop, split like the forward's.
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _kv_bounds(start_m, q_len, kv_len, shift, win_left, win_right,
                                          CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    if WINDOW:
        dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, lo,
                       full_lo, offs_m, offs_d, kv_len, shift, qk_scale, win_left, win_right,
                       softcap_in, softcap_out, slope, row_key, threshold, keep_scale, D,
                       HEAD_DIM, CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT, True, WIDE, BLOCK_M,
                       BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, full_lo,
                   full_hi, offs_m, offs_d, kv_len, shift, qk_scale, win_left, win_right,
                   softcap_in, softcap_out, slope, row_key, threshold, keep_scale, D,
                   HEAD_DIM, CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT, False, WIDE, BLOCK_M,
                   BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, full_hi, hi,
                   offs_m, offs_d, kv_len, shift, qk_scale, win_left, win_right, softcap_in,
                   softcap_out, slope, row_key, threshold, keep_scale, D, HEAD_DIM, CAUSAL,
                   WINDOW, SOFTCAP, ALIBI, DROPOUT, True, WIDE, BLOCK_M, BLOCK_N)

    # 4. Softmax scale, applied once.
    _store_tile(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
                + q_off * stride_dqs
                + _row(offs_m, WIDE)[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
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
#: Compiled kernel per (kernel, key, constexpr values, device, argument specialization),
#: with the constexpr values in signature order: see _launch().
_COMPILED = {}
#: Whether _launch calls compiled kernels directly once it has them (benches turn it off
#: to time Triton's own launch path against it).
DIRECT_LAUNCH = True


#: Specializations of the scalar arguments after the leading tensors, by their values and
#: types (see _specialization); cleared when it reaches _SCALAR_SPECS_MAX entries.
_SCALAR_SPECS = {}
_SCALAR_SPECS_MAX = 4096


def _arg_spec(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool) or not isinstance(a, int):
        return type(a)
    return a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31, a < 2 ** 63


def _specialization(args) -> tuple:
    """What Triton specializes a compiled kernel on, per argument, or finer: a tensor's
    dtype and 16-byte alignment; an int's being 1, its divisibility by 16 and the integer
    type its value needs (int32, int64, uint64).

    The scalars after the leading tensors repeat from call to call (strides, lengths,
    flags), so their part is looked up by their values and types: a per-argument walk cost
    20 us of host time per launch, three launches per training step."""
    n = 0
    for a in args:
        if not isinstance(a, torch.Tensor):
            break
        n += 1
    head = tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in args[:n]])
    rest = args[n:]
    key = (rest, tuple(map(type, rest)))
    tail = _SCALAR_SPECS.get(key)
    if tail is None:
        tail = tuple([_arg_spec(a) for a in rest])
        # a tensor among the scalars hashes by identity: never remembered
        if not any(isinstance(a, torch.Tensor) for a in rest):
            if len(_SCALAR_SPECS) >= _SCALAR_SPECS_MAX:
                _SCALAR_SPECS.clear()
            _SCALAR_SPECS[key] = tail
    return head + tail


def _launch(tuned, plain, interpret_config, grid, key, *args, **kwargs):
    """Run ``plain`` with the configuration ``tuned`` picked for ``key``.

    The first call for a key autotunes; later calls launch the plain kernel with the
    remembered configuration, skipping the autotuner's per-call argument handling. Once a
    configuration has compiled for a specialization of the arguments (:func:`_specialization`),
    later calls with the same one launch that compiled kernel directly: Triton's own
    launch path binds and specializes every argument again and builds a cache key from
    them, host time that on short sequences exceeds the kernels' GPU time. ``key`` must
    determine the autotuner's own key: the values of ``_KEY`` and the dtypes of the tensor
    arguments. All arguments after the positional ones are constexprs, given by keyword.
    Under the interpreter a fixed configuration runs.
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
    size = grid(best[1])
    if not DIRECT_LAUNCH:
        plain[size](*args, **kwargs, **best[0])
        return
    ck = (plain, key, tuple(kwargs.items()), args[0].device.index, _specialization(args))
    entry = _COMPILED.get(ck)
    if entry is None:
        compiled = plain[size](*args, **kwargs, **best[0])
        values = {**kwargs, **best[0]}
        _COMPILED[ck] = (compiled, tuple(values[n] for n in plain.arg_names[len(args):]))
        return
    compiled, constexprs = entry
    size = (*size, 1, 1)[:3]
    compiled[size](*args, *constexprs)
    return compiled, size, constexprs


#: Launch plans (_DirectLaunch per kernel, made by attention_forward and attention_backward)
#: by everything that decides a call's launches but the tensors' addresses and the dropout
#: key: see _find_plan. They hold no tensors. Cleared when it reaches _PLANS_MAX entries.
_PLANS = {}
_PLANS_MAX = 1024


#: The Triton whose compiled-module launcher _DirectLaunch calls (its argument order is
#: that version's); with another, plans launch through Triton's own call.
_LAUNCHER_TRITON = "3.6."


def _hook_set(hook) -> bool:
    """Whether a launch hook would run: a chain with calls in it, or any other callable
    (``triton.knobs.runtime`` also takes a plain function or None)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if isinstance(calls, list) else True


def _runtime_hooks_set() -> bool:
    hooks = triton.knobs.runtime
    return _hook_set(hooks.launch_enter_hook) or _hook_set(hooks.launch_exit_hook)


def forget_compiled() -> None:
    """Drop the compiled kernels remembered for direct launch and the launch plans built on
    them (call it after changing a tuned configuration in ``_BEST``)."""
    _COMPILED.clear()
    _PLANS.clear()


def forget_tuning() -> None:
    """Drop every tuned configuration, compiled kernel and launch plan: the next call of each
    key tunes again."""
    _BEST.clear()
    forget_compiled()


class _DirectLaunch:
    """One compiled kernel's launch with every argument but the tensors fixed.

    The call hands the tensors' addresses and the fixed scalars straight to the compiled
    module's launcher: Triton's own call of a compiled kernel adds a Python closure, launch
    metadata, scratch checks and two calls of empty launch hooks, and its launcher asks the
    driver about every tensor's pointer. Where a launch hook is set (a profiler), the kernel
    wants scratch memory or another Triton is installed, it goes through Triton's call.
    """

    __slots__ = ("compiled", "grid", "tail", "key_at", "launcher", "head")

    def __init__(self, record, scalars: tuple, key_at: int):
        compiled, self.grid, constexprs = record
        self.compiled = compiled
        self.tail = (*scalars, *constexprs)
        self.key_at = key_at
        run = getattr(compiled, "run", None)
        self.launcher = getattr(run, "launch", None)
        if (not triton.__version__.startswith(_LAUNCHER_TRITON)
                or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1)
                or not isinstance(getattr(compiled, "function", None), int)):
            self.launcher = None
        self.head = None
        if self.launcher is not None:
            self.head = (run.launch_cooperative_grid, run.launch_pdl, None, None,
                         compiled.packed_metadata, None, None, None)

    def __call__(self, tensors, dropout_key: int) -> None:
        tail = self.tail
        i = self.key_at
        if i >= 0 and tail[i] != dropout_key:
            tail = (*tail[:i], dropout_key, *tail[i + 1:])
        if self.launcher is None or _runtime_hooks_set():
            self.compiled[self.grid](*tensors, *tail)
            return
        driver = triton.runtime.driver.active
        stream = driver.get_current_stream(driver.get_current_device())
        self.launcher(*self.grid, stream, self.compiled.function, *self.head,
                      *[t.data_ptr() for t in tensors], *tail)


def _aligned(*tensors) -> bool:
    """Whether every tensor given (None for absent ones) starts on 16 bytes, as the tensors
    of a plan did when it was made (Triton specializes on it)."""
    bits = 0
    for t in tensors:
        if t is not None:
            bits |= t.data_ptr()
    return bits % 16 == 0


def _tensor_key(t):
    return None if t is None else (t.dtype, t.device, t.shape, t.stride())


def _find_plan(kind: str, tensors, optional, options):
    """(key, plan or None) of a call, or (None, None) where calls are not planned (the
    interpreter, direct launch off, a tensor off 16 bytes: Triton specializes on it).

    The key is what decides the call's launches besides its tensors' addresses and the
    dropout key's value: the shapes, strides, dtypes and devices of ``tensors`` and of the
    ``optional`` ones (None where absent; a plan hands the kernels bare addresses, which no
    launcher checks again) and ``options``: the scalars, the dropout key's specialization
    among them."""
    if not DIRECT_LAUNCH or INTERPRETING or not _aligned(*tensors, *optional):
        return None, None
    key = (kind, *[(t.dtype, t.device, t.shape, t.stride()) for t in tensors],
           *[_tensor_key(t) for t in optional], *options)
    return key, _PLANS.get(key)


def _options_key(max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, window,
                 softcap: float, dropout_p: float, dropout_key: int,
                 dropout_threshold: int) -> tuple:
    return (max_seqlen_q, max_seqlen_k, causal, scale, tuple(window), softcap, dropout_p,
            dropout_threshold, _arg_spec(dropout_key))


def _stand_ins(lse, kv_lens, cu_seqlens_q, cu_seqlens_k, alibi_slopes) -> tuple:
    """The optional tensor arguments of the kernels, the LSE standing in for absent ones
    (their flags keep the kernels from reading it)."""
    return tuple(lse if t is None else t for t in (kv_lens, cu_seqlens_q, cu_seqlens_k,
                                                   alibi_slopes))


def _remember(key, plan) -> None:
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    _PLANS[key] = plan


#: Bytes of the tensors a chunk of sequences re-reads (K and V for the query kernels, Q and
#: dO for dK/dV) that the programs running at once should keep in L2 (50-60 MB on Hopper):
#: about a third of it, as two chunks can be in flight at a chunk's edge.
_L2_CHUNK_BYTES = 16 << 20

#: A window side without bound: farther than any key from any query (|i + shift - j| stays
#: below 2**30 for sequences of up to 2**29 tokens), and no sum of it overflows int32.
_UNBOUNDED = 1 << 30

#: Row offsets at or above this leave int32 (see _wide); tests lower it to run the int64 path.
_INT32_OFFSETS = 1 << 31


def _seq_chunk(n_seq: int, seq_bytes: int) -> int:
    """Sequences per chunk of _block_order: as many as share _L2_CHUNK_BYTES."""
    return max(1, min(n_seq, _L2_CHUNK_BYTES // max(seq_bytes, 1)))


class _Layout:
    """Shapes and strides of one call, dense (B, H, S, D) or packed (total, H, D).

    Packed tensors are addressed like dense ones with a batch stride of 0: each program
    adds its sequence's first token times the token stride.
    """

    def __init__(self, q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            self.batch = cu_seqlens_q.shape[0] - 1
            self.heads, self.kv_heads = q.shape[1], k.shape[1]
            self.q_len, self.kv_len = max_seqlen_q, max_seqlen_k
            self.lse_shape = (q.shape[1], q.shape[0])
            self.lse_strides = (0, q.shape[0])
        else:
            self.batch, self.heads, self.q_len, _ = q.shape
            self.kv_heads, self.kv_len = k.shape[1], k.shape[2]
            self.lse_shape = (self.batch, self.heads, self.q_len)
            self.lse_strides = (self.heads * self.q_len, self.q_len)
        self.group = self.heads // self.kv_heads
        d = q.shape[-1]
        self.shape = dict(D=d, HEAD_DIM=max(16, next_power_of_2(d)))
        self.q_bucket, self.kv_bucket = next_power_of_2(self.q_len), next_power_of_2(self.kv_len)
        self.element_size = q.element_size()

    def strides(self, x):
        strides = x.stride()
        if self.varlen:
            return 0, strides[1], strides[0], strides[2]
        return strides

    def query_chunk(self) -> int:
        """Chunk of the query-block kernels: a q head reads its kv head's K and V rows,
        shared by the q heads of its group."""
        d = self.shape["D"]
        return _seq_chunk(self.batch * self.heads,
                          2 * self.kv_len * d * self.element_size // self.group)

    def key_chunk(self) -> int:
        """Chunk of the dK/dV kernel: a kv head reads the Q and dO rows of its group's q
        heads."""
        d = self.shape["D"]
        return _seq_chunk(self.batch * self.kv_heads,
                          2 * self.group * self.q_len * d * self.element_size)


def _wide(layout: _Layout, tensors) -> bool:
    """Whether some row offset within a sequence (row * token stride, rows up to the longest
    sequence plus a tile) of one of ``tensors`` may leave int32: then the kernels' loops
    compute it in int64."""
    rows = max(layout.q_len, layout.kv_len) + 256
    token_dim = 0 if layout.varlen else 2
    return rows * max([abs(t.stride(token_dim)) for t in tensors]) >= _INT32_OFFSETS


#: Where the dropout key lies in the optional features' scalars (see _features).
_KEY_AT = 4


def _features(layout: _Layout, tensors, kv_lens, causal: bool, scale: float, window,
              softcap: float, alibi_slopes, dropout_p: float, dropout_key: int,
              dropout_threshold: int):
    """Runtime arguments and constexpr flags of the optional features, shared by the three
    kernels, and the part of the tuning key they decide; ``tensors`` are those the kernels
    address by row (see _wide)."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    has_window = left >= 0 or (right >= 0 and not causal)
    if alibi_slopes is not None:
        alibi_strides = ((0, alibi_slopes.stride(0)) if alibi_slopes.dim() == 1
                         else tuple(alibi_slopes.stride()))
    else:
        alibi_strides = (0, 0)
    args = (*layout.lse_strides, *alibi_strides)
    # the dropout key at _KEY_AT: a launch plan swaps it per call
    scalars = (left if left >= 0 else _UNBOUNDED, right if right >= 0 else _UNBOUNDED,
               scale / softcap if softcap > 0 else 0.0, softcap * LOG2E, dropout_key,
               dropout_threshold, 1.0 / (1.0 - dropout_p))
    flags = dict(CAUSAL=causal, HAS_KV_LENS=kv_lens is not None, VARLEN=layout.varlen,
                 WINDOW=has_window, SOFTCAP=softcap > 0, ALIBI=alibi_slopes is not None,
                 DROPOUT=dropout_p > 0, WIDE=_wide(layout, tensors))
    return args, scalars, flags, tuple(flags.values())


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      kv_lens, causal: bool, scale: float, *, cu_seqlens_q=None,
                      cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                      window=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                      dropout_p: float = 0.0, dropout_key: int = 0,
                      dropout_threshold: int = 0):
    """O (layout of ``q``) and LSE fp32 of attention; inputs already checked.

    Dense (B, H, S, D) inputs give an LSE (B, Hq, Sq); packed ones (``cu_seqlens_q`` and
    ``cu_seqlens_k`` given, tensors (total, H, D)) an LSE (Hq, total_q).
    """
    plan_key, plan = _find_plan("fwd", (q, k, v), (kv_lens, cu_seqlens_q, cu_seqlens_k,
                                                   alibi_slopes),
                                _options_key(max_seqlen_q, max_seqlen_k, causal, scale, window,
                                             softcap, dropout_p, dropout_key,
                                             dropout_threshold))
    if plan is not None:
        launch, lse_shape = plan
    else:
        layout = _Layout(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
        lse_shape = layout.lse_shape
    out = torch.empty_like(q)
    lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    tensors = (q, k, v, out, lse,
               *_stand_ins(lse, kv_lens, cu_seqlens_q, cu_seqlens_k, alibi_slopes))
    if plan is not None:
        launch(tensors, dropout_key)
        return out, lse
    if out.numel() == 0 or layout.batch == 0 or layout.q_len == 0:
        return out, lse.fill_(float("-inf"))
    extra, scalars, flags, key_flags = _features(layout, (q, k, v, out), kv_lens, causal,
                                                 scale, window, softcap, alibi_slopes,
                                                 dropout_p, dropout_key, dropout_threshold)
    lens = tensors[5]
    key = (q.dtype, lens.dtype, layout.q_bucket, layout.kv_bucket, layout.shape["HEAD_DIM"],
           key_flags)
    n_blocks = layout.q_len
    rest = (*layout.strides(q), *layout.strides(k), *layout.strides(v),
            *layout.strides(out), *extra,
            layout.heads, layout.group, layout.q_len, layout.kv_len, layout.q_bucket,
            layout.kv_bucket, layout.query_chunk(), scale * LOG2E)
    key_at = len(rest) + _KEY_AT
    rest = (*rest, *scalars)
    record = _launch(_fwd_tuned, _fwd_kernel, _INTERPRET_FWD,
                     lambda meta: (cdiv(n_blocks, meta["BLOCK_M"]) * layout.batch
                                   * layout.heads,), key,
                     *tensors, *rest, **flags, **layout.shape)
    if plan_key is not None and record is not None:
        _remember(plan_key, (_DirectLaunch(record, rest, key_at), layout.lse_shape))
    return out, lse


def attention_backward(grad_out: torch.Tensor, grad_lse, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, kv_lens,
                       causal: bool, scale: float, *, cu_seqlens_q=None, cu_seqlens_k=None,
                       max_seqlen_q: int = 0, max_seqlen_k: int = 0, window=(-1, -1),
                       softcap: float = 0.0, alibi_slopes=None, dropout_p: float = 0.0,
                       dropout_key: int = 0, dropout_threshold: int = 0):
    """dQ, dK, dV (layouts of q, k, v) given dO and, optionally, the gradient of the LSE."""
    plan_key, plan = _find_plan("bwd", (grad_out, q, k, v, out, lse),
                                (kv_lens, cu_seqlens_q, cu_seqlens_k, alibi_slopes, grad_lse),
                                _options_key(max_seqlen_q, max_seqlen_k, causal, scale, window,
                                             softcap, dropout_p, dropout_key,
                                             dropout_threshold))
    # packed: keys of sequences that no query block reaches (none when the offsets are
    # valid) keep a defined gradient of 0
    alloc = torch.zeros_like if cu_seqlens_q is not None else torch.empty_like
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    # dQ's kernel also writes delta = rowsum(dO * O) - dLSE for the dK/dV kernel
    delta = torch.empty_like(lse)
    dlse = grad_lse.contiguous() if grad_lse is not None else lse
    lens, cu_q, cu_k, alibi = _stand_ins(lse, kv_lens, cu_seqlens_q, cu_seqlens_k,
                                         alibi_slopes)
    dq_tensors = (q, k, v, grad_out, out, dq, lse, dlse, delta, lens, cu_q, cu_k, alibi)
    dkdv_tensors = (q, k, v, grad_out, dk, dv, lse, delta, lens, cu_q, cu_k, alibi)
    if plan is not None:
        dq_launch, dkdv_launch = plan
        dq_launch(dq_tensors, dropout_key)
        dkdv_launch(dkdv_tensors, dropout_key)
        return dq, dk, dv
    layout = _Layout(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if q.numel() == 0 or k.numel() == 0 or layout.batch == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    extra, scalars, flags, key_flags = _features(layout, (q, k, v, out, grad_out, dq, dk, dv),
                                                 kv_lens, causal, scale, window, softcap,
                                                 alibi_slopes, dropout_p, dropout_key,
                                                 dropout_threshold)
    key = (q.dtype, grad_out.dtype, lens.dtype, layout.q_bucket, layout.kv_bucket,
           layout.shape["HEAD_DIM"], key_flags)
    common = (layout.heads, layout.group, layout.q_len, layout.kv_len, layout.q_bucket,
              layout.kv_bucket)

    # 1. dQ per query block; it also writes delta for step 2
    dq_record = dkdv_record = None
    if layout.q_len > 0:
        dq_rest = (*layout.strides(q), *layout.strides(k), *layout.strides(v),
                   *layout.strides(grad_out), *layout.strides(out), *layout.strides(dq),
                   *extra, *common, layout.query_chunk(), scale * LOG2E, scale)
        dq_key_at = len(dq_rest) + _KEY_AT
        dq_rest = (*dq_rest, *scalars)
        dq_record = _launch(_dq_tuned, _bwd_dq_kernel, _INTERPRET_DQ,
                            lambda meta: (cdiv(layout.q_len, meta["BLOCK_M"]) * layout.batch
                                          * layout.heads,), key,
                            *dq_tensors, *dq_rest, HAS_DLSE=grad_lse is not None, **flags,
                            **layout.shape)

    # 2. dK, dV per key block, summed over the query heads of each group
    if layout.kv_len > 0:
        dkdv_rest = (*layout.strides(q), *layout.strides(k), *layout.strides(v),
                     *layout.strides(grad_out), *layout.strides(dk), *layout.strides(dv),
                     *extra, *common, layout.key_chunk(), scale * LOG2E, scale)
        dkdv_key_at = len(dkdv_rest) + _KEY_AT
        dkdv_rest = (*dkdv_rest, *scalars)
        dkdv_record = _launch(_dkdv_tuned, _bwd_dkdv_kernel, _INTERPRET_DKDV,
                              lambda meta: (cdiv(layout.kv_len, meta["BLOCK_N"])
                                            * layout.batch * layout.kv_heads,), key,
                              *dkdv_tensors, *dkdv_rest, **flags, **layout.shape)
    if plan_key is not None and dq_record is not None and dkdv_record is not None:
        _remember(plan_key, (_DirectLaunch(dq_record, dq_rest, dq_key_at),
                             _DirectLaunch(dkdv_record, dkdv_rest, dkdv_key_at)))
    return dq, dk, dv
