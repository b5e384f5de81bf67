"""Flash attention on Hopper (sm_90): TMA tensor-descriptor loads, optionally
warp-specialised key loops, for the common training case.

Covered (see :func:`covers`): dense (B, H, S, D) fp16/bf16 inputs whose last stride is 1,
D of 64 or 128, causal (aligned bottom-right, as in ``kernels.attention``) or not, GQA,
any lengths, with or without a gradient of the LSE. Everything else (packed sequences,
kv_lens, windows, softcap, ALiBi, dropout, fp32, other head dims, misaligned strides)
runs the portable kernels of ``kernels.attention``, which also own the numerics this file
must reproduce: O in q's dtype, the natural-log LSE (B, H, Sq) in fp32, -inf (and output
and gradient 0) for a query that sees no key.

Loads. Every tile (Q, K, V, dO) comes in through a host-built TMA descriptor, and O, dQ,
dK, dV leave through one, so the copy engine moves whole [rows, D] tiles into shared
memory without address arithmetic on the warps. Two descriptor shapes:
  rank 4  [B, H, S, D] with the tensor's real strides. A tile past the end of a sequence
          reads zeros and stores nothing, so any length works, and any layout with
          16-byte aligned strides (a (B, S, 3, H, D) qkv projection seen as (B, H, S, D)
          is read in place).
  flat    a 2-D view whose rows are tokens: [B * H * S, D] for a (B, H, S, D)-ordered
          tensor, [B * S, H * D] for a (B, S, H, D)-ordered one (the head picks the column
          block). A tile past a sequence would touch the next one, so this is used only
          when every length is a multiple of the largest tile; it keeps the loaded tile
          two-dimensional, with no reshape between the copy and the tensor-core operand.

Warp specialisation (``WARP_SPEC`` constexpr per configuration): the key loop (forward,
dQ) or query loop (dK/dV) is a ``tl.range(..., warp_specialize=True)``, which lets the
compiler split it into a producer partition issuing the TMA copies into a ring of
``num_stages`` shared-memory buffers and consumer warpgroups running wgmma and the
softmax, so that the loads of block j + 1 overlap the math of block j. Configurations
without it rely on Triton's software pipelining of the same loop; autotuning picks.

Algorithm (flash attention 2, scores in base 2 with ``scale * log2(e)`` folded in):
  forward   one program per (query block, batch * q head): unmasked key blocks, then the
            blocks cut by the causal diagonal or the key length (``MASK`` constexpr); O and
            LSE written at the end. Blocks above the diagonal are never visited.
  backward  (0) delta = rowsum(dO * O) - dLSE per query row, one small kernel.
            (1) dK/dV: one program per (key block, batch * kv head); one loop over the q
                heads of its group times their query blocks, P recomputed from the LSE;
                the group sum stays in registers (no atomics, deterministic).
            (2) dQ, either a separate pass (default, deterministic): one program per
                (query block, batch * q head) looping over key blocks; or, with
                ``DQ_ATOMIC``, inside (1): each (query block, key block) step adds
                dS @ K into an fp32 buffer with atomics, saving the recomputation of
                QK^T and dP (nondeterministic summation order).
Programs run in the order of ``kernels.attention._block_order``: chunks of sequences
sized to share L2, longest causal blocks first.

Floor, per (batch, q head), n = Sq * Skv visible pairs (about half when causal): forward
4 * n * D flops, backward 10 * n * D (8 * n * D with atomic dQ, which skips recomputing
QK^T and dP); compute-bound at training sizes.
"""
from collections import Counter

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, dot
from .attention import LOG2E, _block_order, _kv_bounds, _Layout, _log2_lse, _q_bounds

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton without host-side descriptors: the portable kernels run
    TensorDescriptor = None

#: Route covered cases on sm_90 devices to these kernels; benches and tests flip it.
HOPPER = True
#: Use flat 2-D descriptors where every length is a multiple of the largest tile.
FLAT_DESCRIPTORS = True
#: dQ by atomics inside the dK/dV kernel instead of its own pass (nondeterministic).
DQ_ATOMIC = False
#: A configuration per kernel ("fwd", "dkdv", "dq") that replaces autotuning, for
#: benches that time every candidate: {"fwd": triton.Config(...), ...}.
FORCED = {}
#: Calls that took this path, by "forward" / "backward": tests check the routing with it.
CALLS = Counter()

_LN2 = tl.constexpr(0.6931471805599453)

#: Head dims these kernels take: one tile of D columns, a power of two the 128-byte TMA
#: swizzle handles in one box.
_HEAD_DIMS = (64, 128)


# ----------------------------------------------------------------------------------------
# Tuning: every candidate in one place, pruned per call by _keep().
# ----------------------------------------------------------------------------------------

#: (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize) per kernel. Forward: a
#: 128-row query tile over two consumer warpgroups (one 64-row wgmma each), key tiles of
#: 128 (fewer softmax rescales) or 64 (more stages fit shared memory at D = 128: a
#: 128 x 128 bf16 K or V tile is 32 KiB). dK/dV: K, V, dK, dV of a 128-key block stay in
#: registers over two warpgroups, so the query tile is narrow. dQ: the mirror image. The
#: 64-row tiles serve sequences too short for 128.
_FWD_CANDIDATES = [(128, 128, 8, 2, False), (128, 128, 8, 3, False), (128, 64, 8, 3, False),
                   (128, 128, 8, 2, True), (128, 128, 8, 3, True), (128, 64, 8, 3, True),
                   (64, 64, 4, 3, False)]
_DKDV_CANDIDATES = [(64, 128, 8, 2, False), (64, 128, 8, 3, False), (64, 128, 8, 2, True),
                    (32, 128, 8, 3, False), (64, 64, 4, 3, False)]
_DQ_CANDIDATES = [(128, 64, 8, 2, False), (128, 64, 8, 3, False), (128, 64, 8, 2, True),
                  (128, 128, 8, 2, False), (64, 64, 4, 3, False)]

#: The largest tile of any candidate: flat descriptors need lengths that are multiples
#: of it (under the interpreter, of the fixed test tiles below).
_MAX_BLOCK = 128

#: Under TRITON_INTERPRET=1 one configuration runs: 16- and 32-row tiles so that short
#: test sequences span several blocks and both loop variants run; warp specialisation on,
#: so the flag's code path is the one the tests check.
_INTERPRET_FWD = dict(BLOCK_M=16, BLOCK_N=16, WARP_SPEC=True)
_INTERPRET_DKDV = dict(BLOCK_M=16, BLOCK_N=32, WARP_SPEC=True)
_INTERPRET_DQ = dict(BLOCK_M=32, BLOCK_N=16, WARP_SPEC=True)
_INTERPRET_MAX_BLOCK = 32

#: Autotune key: lengths by power-of-two bucket, head dim, causality, descriptor shape
#: (tensor dtypes are added by Triton).
_KEY = ["Q_BUCKET", "KV_BUCKET", "HEAD_DIM", "CAUSAL", "FLAT"]


def _set_blocks(nargs):
    """Pre-hook of every configuration: a descriptor's box is its kernel's tile."""
    bm, bn, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
    for name, rows in (("desc_q", bm), ("desc_do", bm), ("desc_o", bm), ("desc_dq", bm),
                       ("desc_k", bn), ("desc_v", bn), ("desc_dk", bn), ("desc_dv", bn)):
        desc = nargs.get(name)
        if desc is not None:
            desc.block_shape = [rows, d] if len(desc.shape) == 2 else [1, 1, rows, d]


def make_config(block_m, block_n, num_warps, num_stages, warp_spec):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "WARP_SPEC": warp_spec},
                         num_warps=num_warps, num_stages=num_stages, pre_hook=_set_blocks)


def _configs(candidates):
    return [make_config(*c) for c in candidates]


def _keep(configs, named_args, **kwargs):
    """Autotune pruning: no tile longer than its sequence (beyond the smallest, 64), and
    64-row tiles only for sequences under 512, where 128-row ones leave SMs idle."""
    args = {**named_args, **kwargs}
    q_bucket, kv_bucket = args["Q_BUCKET"], args["KV_BUCKET"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(64, q_bucket) and c.kwargs["BLOCK_N"] <= max(64, kv_bucket)
            and (c.num_warps == 8 or max(q_bucket, kv_bucket) < 512)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _tuned(kernel, candidates):
    return triton.autotune(_configs(candidates), key=_KEY,
                           prune_configs_by={"early_config_prune": _keep})(kernel)


# ----------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------

@triton.jit
def _load(desc, b, h, row, row_b, row_h, col_h, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
          FLAT: tl.constexpr):
    """Tile [ROWS, HEAD_DIM] of sequence (b, h) from token ``row``. Flat descriptors
    address token rows b * row_b + h * row_h + row and column block h * col_h."""
    if FLAT:
        return desc.load([b * row_b + h * row_h + row, h * col_h])
    else:
        return desc.load([b, h, row, 0]).reshape(ROWS, HEAD_DIM)


@triton.jit
def _store(desc, x, b, h, row, row_b, row_h, col_h, ROWS: tl.constexpr,
           HEAD_DIM: tl.constexpr, FLAT: tl.constexpr):
    """Store tile ``x`` where :func:`_load` reads it (rank 4: rows past the sequence are
    dropped by the copy engine)."""
    if FLAT:
        desc.store([b * row_b + h * row_h + row, h * col_h], x)
    else:
        desc.store([b, h, row, 0], x.reshape(1, 1, ROWS, HEAD_DIM))


@triton.jit
def _visible(rows, cols, kv_len, shift, CAUSAL: tl.constexpr, TRANS: tl.constexpr):
    """Mask of visible (query, key) pairs, [queries, keys] or with TRANS [keys, queries]."""
    if TRANS:
        ok = cols[:, None] < kv_len
        if CAUSAL:
            ok = ok & (cols[:, None] <= rows[None, :] + shift)
    else:
        ok = cols[None, :] < kv_len
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + shift)
    return ok


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------

@triton.jit
def _fwd_loop(acc, l_i, m_i, q, desc_k, desc_v, b, hk, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch,
              lo, hi, offs_m, kv_len, shift, qk_scale, CAUSAL: tl.constexpr,
              MASK: tl.constexpr, FLAT: tl.constexpr, WARP_SPEC: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key blocks [lo, hi) (scores in base 2)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load(desc_k, b, hk, start_n, k_rb, k_rh, k_ch, BLOCK_N, HEAD_DIM, FLAT)
        qk = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        if MASK:
            s = tl.where(_visible(offs_m, start_n + offs_n, kv_len, shift, CAUSAL, False),
                         qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with no visible key yet keeps max -inf; shift by 0 so exp2 gives 0
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
        else:
            # scale > 0, so the scaled max is max(qk) * scale: one multiply-add per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(desc_v, b, hk, start_n, v_rb, v_rh, v_ch, BLOCK_N, HEAD_DIM, FLAT)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    desc_q, desc_k, desc_v, desc_o, LSE,
    # descriptors of Q, O (B, H, Sq, D) and K, V (B, H // GROUP, Skv, D), rank 4 or flat;
    # LSE (B, H, Sq) fp32 contiguous
    q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch, o_rb, o_rh, o_ch,
    H, GROUP, Sq, Skv, Q_BUCKET, KV_BUCKET, SEQ_CHUNK,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, FLAT: tl.constexpr,
    WARP_SPEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1. This program's query block and sequence (causal: the longest blocks first).
    pid_m, pid_bh = _block_order(tl.cdiv(Sq, BLOCK_M), SEQ_CHUNK, CAUSAL)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    shift = Skv - Sq
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)

    # 2. The query tile stays on chip for the whole key loop.
    q = _load(desc_q, b, h, start_m, q_rb, q_rh, q_ch, BLOCK_M, HEAD_DIM, FLAT)

    # 3. Key blocks every row sees in full, then those cut by the diagonal or the length.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    _, _, full_hi, hi = _kv_bounds(start_m, Sq, Skv, shift, 0, 0, CAUSAL, False, BLOCK_M,
                                   BLOCK_N)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, desc_k, desc_v, b, hk, k_rb, k_rh, k_ch,
                              v_rb, v_rh, v_ch, 0, full_hi, offs_m, Skv, shift, qk_scale,
                              CAUSAL, False, FLAT, WARP_SPEC, HEAD_DIM, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, desc_k, desc_v, b, hk, k_rb, k_rh, k_ch,
                              v_rb, v_rh, v_ch, full_hi, hi, offs_m, Skv, shift, qk_scale,
                              CAUSAL, True, FLAT, WARP_SPEC, HEAD_DIM, BLOCK_M, BLOCK_N)

    # 4. Normalise; rows that saw no key have l = 0 and acc = 0: output 0, LSE -inf.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    _store(desc_o, out.to(q.dtype), b, h, start_m, o_rb, o_rh, o_ch, BLOCK_M, HEAD_DIM,
           FLAT)
    tl.store(LSE + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------

@triton.jit
def _delta_kernel(O, DO, DLSE, DELTA,
                  # O, DO (B, H, Sq, D); DLSE, DELTA (B, H, Sq) fp32 contiguous
                  stride_ob, stride_oh, stride_os, stride_dob, stride_doh, stride_dos,
                  H, Sq, HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id - dLSE_i: the softmax-backward row term (a gradient
    flowing into the LSE adds dLSE_i * P_ij to dS_ij, the same as lowering delta)."""
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_m < Sq)[:, None]
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_os + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dos + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = pid_bh.to(tl.int64) * Sq + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=offs_m < Sq, other=0.0)
    tl.store(DELTA + rows, delta, mask=offs_m < Sq)


@triton.jit
def _dkdv_loop(dk, dv, k, v, desc_q, desc_do, LSE, DELTA, DQ_ACC, b, hk, q_rb, q_rh, q_ch,
               do_rb, do_rh, do_ch, lo, n_steps, start_n, H, GROUP, Sq, Skv, shift,
               qk_scale, CAUSAL: tl.constexpr, MASK: tl.constexpr, FLAT: tl.constexpr,
               WARP_SPEC: tl.constexpr, DQ_ATOMIC: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks lo, lo + BLOCK_M, ... (n_steps
    of them) of every q head of the group, in one flat loop so that it pipelines as one.
    Keys are the rows: P^T and dS^T come out of the dots without a transpose."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for step in tl.range(0, GROUP * n_steps, warp_specialize=WARP_SPEC):
        g = step // n_steps
        h = hk * GROUP + g
        start_m = tl.multiple_of(lo + (step - g * n_steps) * BLOCK_M, BLOCK_M)
        rows = start_m + offs_m
        q = _load(desc_q, b, h, start_m, q_rb, q_rh, q_ch, BLOCK_M, HEAD_DIM, FLAT)
        row0 = (b * H + h).to(tl.int64) * Sq
        lse2 = _log2_lse(LSE + row0, rows, rows < Sq)
        qkT = dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))
        pT = tl.exp2(qkT * qk_scale - lse2[None, :])
        if MASK:
            pT = tl.where(_visible(rows, offs_n, Skv, shift, CAUSAL, True), pT, 0.0)
        do = _load(desc_do, b, h, start_m, do_rb, do_rh, do_ch, BLOCK_M, HEAD_DIM, FLAT)
        dv = dot(pT.to(do.dtype), do, dv)
        delta = tl.load(DELTA + row0 + rows, mask=rows < Sq, other=0.0)
        dpT = dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = dot(dsT, q, dk)
        if DQ_ATOMIC:
            dq = dot(tl.trans(dsT), k, tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32))
            tl.atomic_add(DQ_ACC + (row0 + rows)[:, None] * HEAD_DIM + offs_d[None, :], dq,
                          mask=(rows < Sq)[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_kernel(
    desc_q, desc_k, desc_v, desc_do, desc_dk, desc_dv, LSE, DELTA, DQ_ACC,
    # descriptors of Q, dO (B, H, Sq, D), K, V, dK, dV (B, H // GROUP, Skv, D); LSE,
    # DELTA (B, H, Sq) fp32 contiguous; DQ_ACC (B, H, Sq, D) fp32 contiguous (DQ_ATOMIC)
    q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch, do_rb, do_rh, do_ch,
    dk_rb, dk_rh, dk_ch, dv_rb, dv_rh, dv_ch,
    H, GROUP, Sq, Skv, Q_BUCKET, KV_BUCKET, SEQ_CHUNK,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, FLAT: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, WARP_SPEC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # 1. This program's key block and (batch, kv head); causal: the longest (first) first.
    pid_n, pid_bh = _block_order(tl.cdiv(Skv, BLOCK_N), SEQ_CHUNK, False)
    Hkv = H // GROUP
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    shift = Skv - Sq
    start_n = pid_n * BLOCK_N

    # 2. K and V of the block stay on chip; dK and dV accumulate in registers.
    k = _load(desc_k, b, hk, start_n, k_rb, k_rh, k_ch, BLOCK_N, HEAD_DIM, FLAT)
    v = _load(desc_v, b, hk, start_n, v_rb, v_rh, v_ch, BLOCK_N, HEAD_DIM, FLAT)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # 3. Query blocks cut by the diagonal (or all of them when the key block is cut by
    #    the length) with the mask, then those that see the whole key block.
    lo, mid, _, end = _q_bounds(start_n, Sq, Skv, shift, 0, 0, CAUSAL, False, BLOCK_M,
                                BLOCK_N)
    dk, dv = _dkdv_loop(dk, dv, k, v, desc_q, desc_do, LSE, DELTA, DQ_ACC, b, hk, q_rb,
                        q_rh, q_ch, do_rb, do_rh, do_ch, lo, (mid - lo) // BLOCK_M, start_n,
                        H, GROUP, Sq, Skv, shift, qk_scale, CAUSAL, True, FLAT, WARP_SPEC,
                        DQ_ATOMIC, HEAD_DIM, BLOCK_M, BLOCK_N)
    dk, dv = _dkdv_loop(dk, dv, k, v, desc_q, desc_do, LSE, DELTA, DQ_ACC, b, hk, q_rb,
                        q_rh, q_ch, do_rb, do_rh, do_ch, mid, (end - mid) // BLOCK_M, start_n,
                        H, GROUP, Sq, Skv, shift, qk_scale, CAUSAL, False, FLAT, WARP_SPEC,
                        DQ_ATOMIC, HEAD_DIM, BLOCK_M, BLOCK_N)

    # 4. Softmax scale, applied once.
    _store(desc_dk, (dk * sm_scale).to(k.dtype), b, hk, start_n, dk_rb, dk_rh, dk_ch,
           BLOCK_N, HEAD_DIM, FLAT)
    _store(desc_dv, dv.to(v.dtype), b, hk, start_n, dv_rb, dv_rh, dv_ch, BLOCK_N,
           HEAD_DIM, FLAT)


@triton.jit
def _dq_loop(dq, q, do, lse2, delta, desc_k, desc_v, b, hk, k_rb, k_rh, k_ch, v_rb, v_rh,
             v_ch, lo, hi, offs_m, Skv, shift, qk_scale, CAUSAL: tl.constexpr,
             MASK: tl.constexpr, FLAT: tl.constexpr, WARP_SPEC: tl.constexpr,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load(desc_k, b, hk, start_n, k_rb, k_rh, k_ch, BLOCK_N, HEAD_DIM, FLAT)
        qk = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        p = tl.exp2(qk * qk_scale - lse2[:, None])
        if MASK:
            p = tl.where(_visible(offs_m, start_n + offs_n, Skv, shift, CAUSAL, False), p, 0.0)
        v = _load(desc_v, b, hk, start_n, v_rb, v_rh, v_ch, BLOCK_N, HEAD_DIM, FLAT)
        dp = dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = dot(ds, k, dq)
    return dq


@triton.jit
def _dq_kernel(
    desc_q, desc_k, desc_v, desc_do, desc_dq, LSE, DELTA,
    # descriptors of Q, dO, dQ (B, H, Sq, D), K, V (B, H // GROUP, Skv, D); LSE, DELTA
    # (B, H, Sq) fp32 contiguous
    q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch, do_rb, do_rh, do_ch,
    dq_rb, dq_rh, dq_ch,
    H, GROUP, Sq, Skv, Q_BUCKET, KV_BUCKET, SEQ_CHUNK,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, FLAT: tl.constexpr,
    WARP_SPEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1. This program's query block and sequence.
    pid_m, pid_bh = _block_order(tl.cdiv(Sq, BLOCK_M), SEQ_CHUNK, CAUSAL)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    shift = Skv - Sq
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)

    # 2. Q, dO and the row terms stay on chip.
    q = _load(desc_q, b, h, start_m, q_rb, q_rh, q_ch, BLOCK_M, HEAD_DIM, FLAT)
    do = _load(desc_do, b, h, start_m, do_rb, do_rh, do_ch, BLOCK_M, HEAD_DIM, FLAT)
    row0 = pid_bh.to(tl.int64) * Sq
    lse2 = _log2_lse(LSE + row0, offs_m, offs_m < Sq)
    delta = tl.load(DELTA + row0 + offs_m, mask=offs_m < Sq, other=0.0)

    # 3. The key loop, split like the forward's.
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    _, _, full_hi, hi = _kv_bounds(start_m, Sq, Skv, shift, 0, 0, CAUSAL, False, BLOCK_M,
                                   BLOCK_N)
    dq = _dq_loop(dq, q, do, lse2, delta, desc_k, desc_v, b, hk, k_rb, k_rh, k_ch, v_rb,
                  v_rh, v_ch, 0, full_hi, offs_m, Skv, shift, qk_scale, CAUSAL, False, FLAT,
                  WARP_SPEC, HEAD_DIM, BLOCK_M, BLOCK_N)
    dq = _dq_loop(dq, q, do, lse2, delta, desc_k, desc_v, b, hk, k_rb, k_rh, k_ch, v_rb,
                  v_rh, v_ch, full_hi, hi, offs_m, Skv, shift, qk_scale, CAUSAL, True, FLAT,
                  WARP_SPEC, HEAD_DIM, BLOCK_M, BLOCK_N)

    # 4. Softmax scale, applied once.
    _store(desc_dq, (dq * sm_scale).to(q.dtype), b, h, start_m, dq_rb, dq_rh, dq_ch,
           BLOCK_M, HEAD_DIM, FLAT)


_fwd_tuned = _tuned(_fwd_kernel, _FWD_CANDIDATES)
_dkdv_tuned = _tuned(_dkdv_kernel, _DKDV_CANDIDATES)
_dq_tuned = _tuned(_dq_kernel, _DQ_CANDIDATES)


# ----------------------------------------------------------------------------------------
# Host side: coverage, descriptors, launchers
# ----------------------------------------------------------------------------------------

def _tma_ok(x: torch.Tensor) -> bool:
    """A TMA descriptor can address ``x``: 16-byte aligned base and strides, last stride 1."""
    if x.stride(-1) != 1 or x.data_ptr() % 16:
        return False
    return all(s > 0 and s * x.element_size() % 16 == 0
               for n, s in zip(x.shape[:-1], x.stride()[:-1]) if n > 1)


def covers(q, k, v, kv_lens=None, *, cu_seqlens_q=None, window=(-1, -1), softcap=0.0,
           alibi_slopes=None, dropout_p=0.0, others=()) -> bool:
    """Whether a call of ``kernels.attention`` may run here: see the module docstring.
    ``others``: further tensors the call reads or writes through descriptors (dO, O)."""
    if not HOPPER or INTERPRETING or TensorDescriptor is None:
        return False
    if (cu_seqlens_q is not None or kv_lens is not None or tuple(window) != (-1, -1)
            or softcap > 0 or alibi_slopes is not None or dropout_p > 0):
        return False
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    tensors = (q, k, v, *others)
    if q.dtype not in (torch.float16, torch.bfloat16) or q.dim() != 4:
        return False
    if any(x.dtype != q.dtype or x.dim() != 4 or x.shape[-1] != q.shape[-1] for x in tensors):
        return False
    return q.shape[-1] in _HEAD_DIMS and all(_tma_ok(x) for x in tensors)


def _normalised_strides(x: torch.Tensor):
    """x's strides with those of size-1 dims replaced by what a dense tensor would have
    (they are never stepped along, but descriptors want them 16-byte aligned)."""
    strides, dense = list(x.stride()), 1
    for i in range(x.dim() - 1, -1, -1):
        if x.shape[i] == 1:
            strides[i] = dense
        dense = strides[i] * x.shape[i]
    return strides


def _flat_view(x: torch.Tensor):
    """(shape, strides, row_b, row_h, col_h) of the flat 2-D descriptor of ``x``, or None
    when its tokens are not rows of one 2-D array (see the module docstring)."""
    b, h, s, d = x.shape
    sb, sh, ss, _ = _normalised_strides(x)
    if sh == s * ss and sb == h * sh:  # (B, H, S, D) order
        return [b * h * s, d], [ss, 1], h * s, s, 0
    if sh == d and sb == s * ss:  # (B, S, H, D) order, heads side by side
        return [b * s, h * d], [ss, 1], s, 0, d
    return None


def _descriptors(tensors, lengths):
    """Descriptors of ``tensors`` and the flat addressing arguments, flat when every
    tensor allows it and every length is a multiple of the largest tile, else rank 4.
    Boxes are set per configuration by _set_blocks."""
    max_block = _INTERPRET_MAX_BLOCK if INTERPRETING else _MAX_BLOCK
    views = [_flat_view(x) for x in tensors]
    flat = (FLAT_DESCRIPTORS and all(v is not None for v in views)
            and all(n % max_block == 0 for n in lengths))
    descs, coords = [], []
    for x, view in zip(tensors, views):
        d = x.shape[-1]
        if flat:
            shape, strides, rb, rh, ch = view
            descs.append(TensorDescriptor(x, shape, strides, [16, d]))
            coords += [rb, rh, ch]
        else:
            descs.append(TensorDescriptor(x, list(x.shape), _normalised_strides(x),
                                          [1, 1, 16, d]))
            coords += [0, 0, 0]
    return descs, coords, flat


#: Configuration per (kernel, key): see _launch.
_BEST = {}


def _launch(name, tuned, plain, interpret_config, grid, key, descs, args, kwargs,
            before_rerun=None):
    """Run ``plain`` with the configuration ``FORCED[name]``, or the one ``tuned`` picked
    for ``key`` (the first call for a key autotunes, later calls skip the autotuner's
    per-call work). ``before_rerun`` resets outputs that accumulate before the tuned
    configuration runs for real."""
    if INTERPRETING:
        config = dict(interpret_config)
        launch = dict(num_warps=4, num_stages=2)
    else:
        forced = FORCED.get(name)
        if forced is not None:
            config = dict(forced.kwargs)
            launch = dict(num_warps=forced.num_warps, num_stages=forced.num_stages)
        else:
            best = _BEST.get((name, key))
            if best is None:
                tuned[grid](*args, **kwargs)
                c = tuned.best_config
                best = _BEST[(name, key)] = (dict(c.kwargs),
                                             dict(num_warps=c.num_warps,
                                                  num_stages=c.num_stages))
                if before_rerun is not None:
                    before_rerun()
            config, launch = best
    _set_blocks({**descs, **config, "HEAD_DIM": kwargs["HEAD_DIM"]})
    plain[grid(config)](*args, **kwargs, **config, **launch)


def _lse_key(layout: _Layout, dtype, flat: bool):
    return (dtype, layout.q_bucket, layout.kv_bucket, layout.shape["D"], flat)


def attention_forward(q, k, v, causal: bool, scale: float):
    """O (layout of ``empty_like(q)``) and the natural-log LSE (B, H, Sq) fp32."""
    CALLS["forward"] += 1
    layout = _Layout(q, k, None, 0, 0)
    out = torch.empty_like(q)
    lse = torch.empty(layout.lse_shape, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    (dq_, dk_, dv_, do_), coords, flat = _descriptors((q, k, v, out),
                                                      (layout.q_len, layout.kv_len))
    descs = dict(desc_q=dq_, desc_k=dk_, desc_v=dv_, desc_o=do_)
    n_seq = layout.batch * layout.heads
    _launch("fwd", _fwd_tuned, _fwd_kernel, _INTERPRET_FWD,
            lambda meta: (triton.cdiv(layout.q_len, meta["BLOCK_M"]) * n_seq,),
            _lse_key(layout, q.dtype, flat) + (causal,), descs,
            (dq_, dk_, dv_, do_, lse, *coords, layout.heads, layout.group, layout.q_len,
             layout.kv_len, layout.q_bucket, layout.kv_bucket, layout.query_chunk(),
             scale * LOG2E),
            dict(HEAD_DIM=layout.shape["D"], CAUSAL=causal, FLAT=flat))
    return out, lse


def attention_backward(grad_out, grad_lse, q, k, v, out, lse, causal: bool, scale: float):
    """dQ, dK, dV (layouts of ``empty_like`` of q, k, v)."""
    CALLS["backward"] += 1
    layout = _Layout(q, k, None, 0, 0)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    d = layout.shape["D"]
    n_q_seq = layout.batch * layout.heads
    common = (layout.heads, layout.group, layout.q_len, layout.kv_len, layout.q_bucket,
              layout.kv_bucket)
    atomic = DQ_ATOMIC

    # 0. delta = rowsum(dO * O) - dLSE
    delta = torch.empty_like(lse)
    block = 16 if INTERPRETING else 64
    _delta_kernel[(triton.cdiv(layout.q_len, block), n_q_seq)](
        out, grad_out, grad_lse.contiguous() if grad_lse is not None else lse, delta,
        out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        layout.heads, layout.q_len, HAS_DLSE=grad_lse is not None, HEAD_DIM=d,
        BLOCK_M=block)

    tensors = (q, k, v, grad_out, dk, dv) + (() if atomic else (dq,))
    descs_list, coords, flat = _descriptors(tensors, (layout.q_len, layout.kv_len))
    names = ("desc_q", "desc_k", "desc_v", "desc_do", "desc_dk", "desc_dv", "desc_dq")
    descs = dict(zip(names, descs_list))
    key = _lse_key(layout, q.dtype, flat) + (causal, atomic)
    flags = dict(HEAD_DIM=d, CAUSAL=causal, FLAT=flat)

    # 1. dK, dV per key block (and, with atomics, dQ into an fp32 buffer)
    dq_acc = (torch.zeros((*layout.lse_shape, d), device=q.device, dtype=torch.float32)
              if atomic else lse)
    _launch("dkdv", _dkdv_tuned, _dkdv_kernel, _INTERPRET_DKDV,
            lambda meta: (triton.cdiv(layout.kv_len, meta["BLOCK_N"]) * layout.batch
                          * layout.kv_heads,), key, descs,
            (*descs_list[:6], lse, delta, dq_acc, *coords[:18], *common, layout.key_chunk(),
             scale * LOG2E, scale),
            dict(DQ_ATOMIC=atomic, **flags),
            before_rerun=dq_acc.zero_ if atomic else None)

    # 2. dQ per query block
    if atomic:
        dq.copy_(dq_acc.mul_(scale))
    else:
        _launch("dq", _dq_tuned, _dq_kernel, _INTERPRET_DQ,
                lambda meta: (triton.cdiv(layout.q_len, meta["BLOCK_M"]) * n_q_seq,), key,
                descs,
                (descs["desc_q"], descs["desc_k"], descs["desc_v"], descs["desc_do"],
                 descs["desc_dq"], lse, delta, *coords[:12], *coords[18:21], *common,
                 layout.query_chunk(), scale * LOG2E, scale),
                flags)
    return dq, dk, dv
