"""Attention of a few queries over a preallocated KV cache, with the append fused in.

Layouts: q (B, Hq, Tq, D); cache k/v (B, Hkv, S_max, D) whose first ``lengths[b]`` slots of
row b are live; new k/v (B, Hkv, Tn, D), of which the first ``new_lens[b]`` (or all Tn)
tokens are appended to row b. Query i of row b sits at position ``base_b + i`` with
``base_b = lengths[b] + n_new_b - Tq`` (bottom-right alignment against the live length
after the append), or ``base_b = lengths[b]`` when the append is ragged (then Tq == Tn and
query i is new token i). With ``causal`` it sees keys ``j <= base_b + i``; always only
``j < lengths[b] + n_new_b``.

Score options, as in :mod:`fastlab.kernels.attention` (each a constexpr flag compiled out
when off), with d = base_b + i - j: a sliding window (keys with -right <= d <= left; the
keys below the block's window are not read), softcap (softcap * tanh(scale * qk /
softcap)) and ALiBi (-slope * |d| added, one slope per query head).

Algorithm (flash-decoding with a fused append):
1. One program per (query-row block, key split, batch x kv head). The rows of the Hq / Hkv
   query heads sharing one kv head are stacked (row r = query r // G of head r % G), so K/V
   of that kv head is read once for the whole group (GQA) and ``tl.dot`` gets >= 16 rows
   even when Tq = 1.
2. The key range [0, live length after the append) is cut into ``num_splits`` ranges of
   ``split_size`` slots. Enough splits are launched to fill the GPU when B x Hkv x row
   blocks alone cannot (decode of a small batch over a long cache).
3. Keys below ``lengths[b]`` are read from the cache in a branch-free loop (the hot loop of
   decoding); keys of the new tokens, in a second loop, straight from k_new/v_new, and the
   program of the last row block (the only one whose causal range always reaches the end)
   also stores them into the cache. No program reads a slot written in the same launch, so
   the append needs neither a second pass nor a barrier.
4. Online softmax in base 2 (the softmax scale is folded with log2(e)).
5. One split: normalise and store the output. Several: each stores its normalised partial
   output and log-sum-exp, and a merge kernel combines them exactly:
   out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m), m = max_s lse_s.

A slot at or beyond a row's live length is never read (every K/V load is masked by it), so
uninitialised or stale cache memory cannot leak into the output. A query that sees no key
returns 0.

Floor: decode is memory-bound: the live cache is read once, 2 * sum_b(L_b) * Hkv * D *
itemsize bytes (plus q, out and the new tokens); flops 4 * Hq * D * sum_b(Tq * L_b), which
dominates only for prefill-sized Tq.
"""
import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, cdiv, dot, next_power_of_2
from .attention import _scores

# Split until there are this many programs per SM: with ragged lengths programs differ in
# work, and many short ones let the scheduler even out the SMs (the merge reads only
# splits x rows x D floats, next to nothing beside the cache). Measured on an H100 (bench
# variants fastlab-pps*): ragged B16 T4096 decode 1.175x the floor at 8, 1.251x at 16,
# 1.127x at 32; full caches within 0.5% of each other at 8 and 32.
_PROGRAMS_PER_SM = 32
# A split should stream at least this many keys, so its prologue and the merge stay small
# next to the loads (shorter under the interpreter so CPU tests reach the split path).
_MIN_SPLIT_TOKENS = 16 if INTERPRETING else 256
# Split boundaries on a multiple of the largest key block, so no block straddles two splits.
_SPLIT_ALIGN = 16 if INTERPRETING else 128
# More splits than this only grows the merge: 64 x 256 keys already covers 16K-token caches
# per kv head with plenty of parallelism.
_MAX_SPLITS = 64
# Query rows per program: 16 is the smallest tl.dot tile; prefill uses up to 64, the size
# at which K/V reuse makes attention compute-bound without spilling the fp32 accumulator.
_MIN_BLOCK_M = 16
_MAX_BLOCK_M = 64
# Tokens per program of the append kernel: one 2-D tile of 64 rows keeps stores wide.
_APPEND_BLOCK_T = 64



def _configs():
    """Autotune space of the attention kernel (key block, warps, pipeline depth)."""
    if INTERPRETING:
        # The interpreter ignores warps and stages; one config avoids timing loops on CPU.
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_n in (64, 128)
        for warps in (4, 8)
        for stages in (2, 3, 4)
    ]


def _keep(configs, named_args, **kwargs):
    """Drop configs whose K/V pipeline cannot fit in shared memory (228 KB on H100)."""
    itemsize = 4 if named_args["Q"].dtype == torch.float32 else 2
    block_d = kwargs["BLOCK_D"]
    kept = [c for c in configs
            if c.num_stages * 2 * c.kwargs["BLOCK_N"] * block_d * itemsize <= 160 * 1024]
    return kept or configs[:1]


@triton.jit
def _mma(a, b, acc):
    """``acc + a @ b``: exact fp32 products for fp32 inputs (no TF32), tensor cores else."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return dot(a, b, acc)


@triton.jit
def _softmax_step(q, k, v, offs_n, key_ok, q_pos, m_i, l_i, acc, qk_scale, win_left,
                  win_right, softcap_in, softcap_out, slope, CAUSAL: tl.constexpr,
                  WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Online-softmax update of (max, sum, acc) with one block of keys, in base 2."""
    qk = _mma(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32))
    if SOFTCAP or ALIBI:
        scores, _ = _scores(qk, q_pos, offs_n, 0, qk_scale, softcap_in, softcap_out,
                            slope[:, None], SOFTCAP, ALIBI, False)
    else:
        scores = qk * qk_scale
    visible = key_ok[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= q_pos[:, None])
    if WINDOW:
        rel = q_pos[:, None] - offs_n[None, :]
        visible = visible & ((win_left < 0) | (rel <= win_left))
        visible = visible & ((win_right < 0) | (rel >= -win_right))
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A row that has seen no key yet keeps max -inf; subtract 0 instead (avoids inf - inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.autotune(configs=_configs(), key=["BLOCK_M", "BLOCK_D", "CAUSAL", "HAS_NEW", "SPLIT",
                                          "WINDOW", "SOFTCAP", "ALIBI"],
                 prune_configs_by={"early_config_prune": _keep})
@triton.jit
def _kvcache_attention_kernel(
    # data
    Q,                 # (B, Hq, Tq, D)
    K_cache, V_cache,  # (B, Hkv, S_max, D), appended to in place
    K_new, V_new,      # (B, Hkv, Tn, D); unused unless HAS_NEW
    Lengths,           # (B,) int32: live length before this call
    New_lens,          # (B,) int32: tokens of k_new appended per row; unused unless RAGGED_NEW
    Out,               # (B, Hq, Tq, D); unused when SPLIT
    Part_O,            # (B * Hkv, num_splits, G * Tq, D) fp32; unused unless SPLIT
    Part_L,            # (B * Hkv, num_splits, G * Tq) fp32 log2-sum-exp; unused unless SPLIT
    Slopes,            # (Hq,) or (B, Hq) fp32 ALiBi slopes in base 2; unused unless ALIBI
    # shapes
    n_kv_heads, group, q_len, n_new, max_len, split_size,
    # strides
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_nkb, stride_nkh, stride_nks, stride_nkd,
    stride_nvb, stride_nvh, stride_nvs, stride_nvd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_sb,         # batch stride of Slopes (0 for one slope per head)
    # constants
    qk_scale,          # softmax scale * log2(e)
    win_left, win_right,       # window (-1: unbounded); used when WINDOW
    softcap_in, softcap_out,   # scale / softcap and softcap * log2(e); used when SOFTCAP
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_NEW: tl.constexpr,
    RAGGED_NEW: tl.constexpr, SPLIT: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // n_kv_heads).to(tl.int64)  # b * stride_b can pass 2**31 on large caches
    kvh = bh % n_kv_heads
    n_rows = group * q_len

    # 1. Live lengths of this row and the position of its first query.
    len_before = tl.load(Lengths + b)
    if HAS_NEW:
        if RAGGED_NEW:
            appended = tl.load(New_lens + b)
            q_base = len_before
        else:
            appended = n_new
            q_base = len_before + n_new - q_len
    else:
        appended = 0
        q_base = len_before - q_len
    len_after = len_before + appended

    # 2. Query rows of all heads of the group (row r: query r // G of head kvh * G + r % G).
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    qi = rows // group
    head = kvh * group + rows % group
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qt
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    if ALIBI:
        slope = tl.load(Slopes + b * stride_sb + head, mask=row_ok, other=0.0)
    else:
        slope = tl.zeros([BLOCK_M], tl.float32)

    # 3. Keys this program covers: its split, cut at the last key any of its rows can see.
    kv_end = len_after
    last_query = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_rows) - 1) // group
    if CAUSAL:
        kv_end = tl.minimum(kv_end, q_base + last_query + 1)
    lo = split * split_size
    hi = tl.minimum(lo + split_size, kv_end)
    writer = pid_m == tl.num_programs(0) - 1

    k_base = K_cache + b * stride_kb + kvh * stride_kh + offs_d[None, :] * stride_kd
    v_base = V_cache + b * stride_vb + kvh * stride_vh + offs_d[None, :] * stride_vd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q_pos = q_base + qi
    cache_hi = tl.minimum(hi, len_before)
    new_lo = tl.maximum(lo, len_before)
    # With a window, the cache loop reads only the keys inside some row's window; the new
    # keys' loop keeps its whole range, as its last row block writes them into the cache.
    cache_lo = lo
    if WINDOW:
        if win_right >= 0:
            cache_hi = tl.minimum(cache_hi, q_base + last_query + win_right + 1)
        if win_left >= 0:
            cache_lo = tl.maximum(lo, q_base + (pid_m * BLOCK_M) // group - win_left)

    # 4. Keys already in the cache: the hot loop of decoding, loads only, no branches.
    for start in range(cache_lo, cache_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ok = offs_n < cache_hi
        ok_2d = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_ks, mask=ok_2d, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs, mask=ok_2d, other=0.0)
        m_i, l_i, acc = _softmax_step(q, k, v, offs_n, ok, q_pos, m_i, l_i, acc, qk_scale,
                                      win_left, win_right, softcap_in, softcap_out, slope,
                                      CAUSAL, WINDOW, SOFTCAP, ALIBI)

    # 5. New keys: read from k_new/v_new; the last row block also stores them in the cache.
    if HAS_NEW:
        for start in range(new_lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            ok = offs_n < hi
            ok_2d = ok[:, None] & d_ok[None, :]
            t = offs_n - len_before
            k = tl.load(K_new + b * stride_nkb + kvh * stride_nkh + t[:, None] * stride_nks
                        + offs_d[None, :] * stride_nkd, mask=ok_2d, other=0.0)
            v = tl.load(V_new + b * stride_nvb + kvh * stride_nvh + t[:, None] * stride_nvs
                        + offs_d[None, :] * stride_nvd, mask=ok_2d, other=0.0)
            store = ok_2d & writer & (offs_n < max_len)[:, None]
            tl.store(k_base + offs_n[:, None] * stride_ks, k, mask=store)
            tl.store(v_base + offs_n[:, None] * stride_vs, v, mask=store)
            m_i, l_i, acc = _softmax_step(q, k, v, offs_n, ok, q_pos, m_i, l_i, acc,
                                          qk_scale, win_left, win_right, softcap_in,
                                          softcap_out, slope, CAUSAL, WINDOW, SOFTCAP, ALIBI)

    # 6. Normalise; a row that saw no key gets 0.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if SPLIT:
        part = (bh * tl.num_programs(1) + split) * n_rows + rows
        tl.store(Part_O + part[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=row_ok[:, None] & d_ok[None, :])
        lse = m_i + tl.log2(tl.where(seen, l_i, 1.0))
        tl.store(Part_L + part, tl.where(seen, lse, float("-inf")), mask=row_ok)
    else:
        tl.store(Out + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_ot
                 + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    Part_O,   # (B * Hkv, num_splits, G * Tq, D) fp32
    Part_L,   # (B * Hkv, num_splits, G * Tq) fp32
    Out,      # (B, Hq, Tq, D)
    n_kv_heads, group, n_rows, num_splits,
    stride_ob, stride_oh, stride_ot, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_kv_heads).to(tl.int64)  # b * stride_b can pass 2**31 on large caches
    kvh = bh % n_kv_heads
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    part = (bh * num_splits + splits) * n_rows + row
    lse = tl.load(Part_L + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    weight = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(weight, 0)
    o = tl.load(Part_O + part[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(weight[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    head = kvh * group + row % group
    tl.store(Out + b * stride_ob + head * stride_oh + (row // group) * stride_ot
             + offs_d * stride_od, out.to(Out.dtype.element_ty), mask=d_ok)


@triton.jit
def _append_kernel(
    K_cache, V_cache,  # (B, Hkv, S_max, D)
    K_new, V_new,      # (B, Hkv, Tn, D)
    Lengths,           # (B,) int32, live length before the append
    New_lens,          # (B,) int32; unused unless RAGGED_NEW
    n_kv_heads, n_new, max_len,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_nkb, stride_nkh, stride_nks, stride_nkd,
    stride_nvb, stride_nvh, stride_nvs, stride_nvd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    RAGGED_NEW: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // n_kv_heads).to(tl.int64)  # b * stride_b can pass 2**31 on large caches
    kvh = bh % n_kv_heads
    length = tl.load(Lengths + b)
    if RAGGED_NEW:
        count = tl.load(New_lens + b)
    else:
        count = n_new
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    ok = ((t < count) & (length + t < max_len))[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K_new + b * stride_nkb + kvh * stride_nkh + t[:, None] * stride_nks
                + offs_d[None, :] * stride_nkd, mask=ok)
    v = tl.load(V_new + b * stride_nvb + kvh * stride_nvh + t[:, None] * stride_nvs
                + offs_d[None, :] * stride_nvd, mask=ok)
    pos = length + t
    tl.store(K_cache + b * stride_kb + kvh * stride_kh + pos[:, None] * stride_ks
             + offs_d[None, :] * stride_kd, k, mask=ok)
    tl.store(V_cache + b * stride_vb + kvh * stride_vh + pos[:, None] * stride_vs
             + offs_d[None, :] * stride_vd, v, mask=ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: a one-SM "GPU", so CPU tests reach both paths
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(programs: int, kv_bound: int, device: torch.device):
    """(num_splits, split_size) for ``programs`` (row blocks x B x Hkv) over <= kv_bound keys."""
    target = _PROGRAMS_PER_SM * _sm_count(device)
    splits = 1
    if programs < target:
        splits = min(cdiv(target, programs), max(1, kv_bound // _MIN_SPLIT_TOKENS),
                     _MAX_SPLITS)
    split_size = cdiv(cdiv(max(kv_bound, 1), splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return cdiv(max(kv_bound, 1), split_size), split_size


def _strides(t):
    return t.stride() if t is not None else (0, 0, 0, 0)


def kvcache_attention_forward(q, k_cache, v_cache, lengths, k_new, v_new, new_lens,
                              causal: bool, scale: float, kv_bound: int,
                              window=(-1, -1), softcap: float = 0.0,
                              alibi_slopes=None) -> torch.Tensor:
    """Attention of q over the cache plus k_new/v_new, which are written into the cache.

    ``lengths`` (int32) is read, not updated. ``kv_bound`` is a host upper bound of every
    row's live length after the append; it only sizes the key splits (no host sync).
    ``window``, ``softcap`` and ``alibi_slopes`` ((Hq,) or (B, Hq) float32) as in
    :func:`fastlab.ops.attention`.
    """
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    group = n_heads // n_kv_heads
    n_rows = group * q_len
    has_new = k_new is not None
    n_new = k_new.shape[2] if has_new else 0
    block_m = min(max(next_power_of_2(n_rows), _MIN_BLOCK_M), _MAX_BLOCK_M)
    block_d = max(16, next_power_of_2(head_dim))  # tl.dot needs K >= 16
    m_blocks = cdiv(n_rows, block_m)
    num_splits, split_size = plan_splits(m_blocks * batch * n_kv_heads, kv_bound, q.device)
    split = num_splits > 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if split:
        part_o = torch.empty(batch * n_kv_heads, num_splits, n_rows, head_dim,
                             device=q.device, dtype=torch.float32)
        part_l = torch.empty(batch * n_kv_heads, num_splits, n_rows, device=q.device,
                             dtype=torch.float32)
    else:
        part_o = part_l = out
    grid = (m_blocks, num_splits, batch * n_kv_heads)
    log2e = 1.4426950408889634
    win_left, win_right = window
    alibi = alibi_slopes is not None
    slopes = (alibi_slopes * log2e).contiguous() if alibi else lengths
    _kvcache_attention_kernel[grid](
        q, k_cache, v_cache, k_new if has_new else k_cache, v_new if has_new else v_cache,
        lengths, new_lens if new_lens is not None else lengths, out, part_o, part_l, slopes,
        n_kv_heads, group, q_len, n_new, k_cache.shape[2], split_size,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *_strides(k_new), *_strides(v_new),
        *out.stride(), slopes.stride(0) if alibi and slopes.dim() == 2 else 0,
        scale * log2e, win_left, win_right,
        scale / softcap if softcap > 0 else 0.0, softcap * log2e,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, CAUSAL=causal,
        HAS_NEW=has_new, RAGGED_NEW=new_lens is not None, SPLIT=split,
        WINDOW=win_left >= 0 or win_right >= 0, SOFTCAP=softcap > 0, ALIBI=alibi,
    )
    if split:
        _merge_splits_kernel[(n_rows, batch * n_kv_heads)](
            part_o, part_l, out, n_kv_heads, group, n_rows, num_splits, *out.stride(),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=next_power_of_2(num_splits),
        )
    return out


def kvcache_append(k_cache, v_cache, lengths, k_new, v_new, new_lens) -> None:
    """Write k_new/v_new (all Tn tokens, or the first new_lens[b]) at lengths[b] onwards."""
    batch, n_kv_heads, n_new, head_dim = k_new.shape
    grid = (cdiv(n_new, _APPEND_BLOCK_T), batch * n_kv_heads)
    _append_kernel[grid](
        k_cache, v_cache, k_new, v_new, lengths,
        new_lens if new_lens is not None else lengths,
        n_kv_heads, n_new, k_cache.shape[2],
        *k_cache.stride(), *v_cache.stride(), *k_new.stride(), *v_new.stride(),
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK_T=_APPEND_BLOCK_T,
        RAGGED_NEW=new_lens is not None,
    )
