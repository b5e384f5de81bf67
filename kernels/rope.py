"""Rotary position embedding of q and k in one launch, Hugging Face's rotate_half convention.

For a head vector x = (x1, x2) split into halves of D/2 and the position's cos = (c1, c2),
sin = (s1, s2) (Hugging Face builds both halves from the same frequencies, but the kernel
does not rely on it):

    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2

which is ``x * cos + rotate_half(x) * sin``. The map is linear in x, and its transpose (the
backward) is the same formula with (s1, s2) replaced by (-s2, -s1): for equal halves, the
rotation by -sin. The backward therefore needs only cos and sin.

One program per (batch, position): it loads that position's cos and sin once (fp32) and
rotates every query head and every key head (GQA: the two head counts may differ), in
tiles of heads x D/2. q, k and the outputs are addressed through their four strides, so
the (B, H, S, D) views Hugging Face makes by transposing (B, S, H, D) projections are read
in place, without a copy. Math in fp32, one rounding to the output dtype.

Floor: read q and k, write their rotations (2 * (Hq + Hk) * B * S * D * itemsize bytes),
plus cos and sin once per position.
"""
import torch
import triton
import triton.language as tl

from ._common import cast, next_power_of_2

#: Values one tile of heads holds at most (heads x D/2): 4096 fp32 over 4 warps, 32 a thread.
_TILE_VALUES = 4096
_NUM_WARPS = 4


@triton.jit
def _rotate_heads(x_ptr, out_ptr, b, s,
                  sx_b, sx_h, sx_s, sx_d,   # strides of x (B, H, S, D)
                  so_b, so_h, so_s, so_d,   # strides of out (B, H, S, D)
                  c1, c2, s1, s2,           # (1, BLOCK_HALF) fp32 halves of cos and sin
                  H, HALF,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    d = tl.arange(0, BLOCK_HALF)[None, :]
    for h0 in range(0, H, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H))[:, None].to(tl.int64)
        mask = (h < H) & (d < HALF)
        x_row = x_ptr + b * sx_b + s * sx_s + h * sx_h
        x1 = tl.load(x_row + d * sx_d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + (d + HALF) * sx_d, mask=mask, other=0.0).to(tl.float32)
        o_row = out_ptr + b * so_b + s * so_s + h * so_h
        dtype = out_ptr.dtype.element_ty
        tl.store(o_row + d * so_d, cast(x1 * c1 - x2 * s1, dtype), mask=mask)
        tl.store(o_row + (d + HALF) * so_d, cast(x2 * c2 + x1 * s2, dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr,          # (B, Hq, S, D), (B, Hk, S, D) inputs (or incoming gradients)
    qo_ptr, ko_ptr,        # same shapes: rotations (or gradients of q and k)
    cos_ptr, sin_ptr,      # (B, S, D), batch stride 0 when shared by the batch
    sq_b, sq_h, sq_s, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sqo_b, sqo_h, sqo_s, sqo_d,
    sko_b, sko_h, sko_s, sko_d,
    sc_b, sc_s, sc_d,
    ss_b, ss_s, ss_d,
    S, Hq, Hk, HALF,
    TRANSPOSE: tl.constexpr,   # backward: the transposed map, sin halves (-s2, -s1)
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = d < HALF
    # 1. this position's cos and sin halves, once for all heads
    c_row = cos_ptr + b * sc_b + s * sc_s
    s_row = sin_ptr + b * ss_b + s * ss_s
    c1 = tl.load(c_row + d * sc_d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + (d + HALF) * sc_d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + d * ss_d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + (d + HALF) * ss_d, mask=dmask, other=0.0).to(tl.float32)
    if TRANSPOSE:
        s1, s2 = -s2, -s1
    # 2. every query head, then every key head
    _rotate_heads(q_ptr, qo_ptr, b, s, sq_b, sq_h, sq_s, sq_d, sqo_b, sqo_h, sqo_s, sqo_d,
                  c1, c2, s1, s2, Hq, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, ko_ptr, b, s, sk_b, sk_h, sk_s, sk_d, sko_b, sko_h, sko_s, sko_d,
                  c1, c2, s1, s2, Hk, HALF, BLOCK_HK, BLOCK_HALF)


def _heads_block(heads: int, block_half: int) -> int:
    return max(1, min(next_power_of_2(heads), _TILE_VALUES // block_half))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         q_out: torch.Tensor, k_out: torch.Tensor, transpose: bool) -> None:
    """Writes the rotation of q and k (``transpose``: its transpose, the backward) into
    ``q_out`` and ``k_out``. q, k, outputs (B, H, S, D) of any strides; cos and sin
    (B, S, D), e.g. expanded from (1, S, D)."""
    B, Hq, S, D = q.shape
    Hk = k.shape[1]
    if B * S == 0:
        return
    half = D // 2
    block_half = next_power_of_2(half)
    _rope_kernel[(B * S,)](
        q, k, q_out, k_out, cos, sin,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        *cos.stride(), *sin.stride(),
        S, Hq, Hk, half,
        TRANSPOSE=transpose, BLOCK_HQ=_heads_block(Hq, block_half),
        BLOCK_HK=_heads_block(Hk, block_half), BLOCK_HALF=block_half, num_warps=_NUM_WARPS)
