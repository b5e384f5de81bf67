"""Cross-entropy over the last dimension: loss and gradient of each row in one launch.

Algorithm, per row of ``logits`` (N, V) with target class y (one program per row by
default; a smaller grid makes each program stride over rows):

1. Load y and its logit z_y before anything else, so the running max m starts at z_y and,
   whenever the target holds the max, the sum below never needs rescaling.
2. Sweep 1 over V in blocks: m = max_j z_j and s = sum_{j != y} exp(z_j - m), the block
   sums added with Kahan compensation (the sum is rescaled when m grows). The ``lanes``
   candidate keeps m, s and the compensation per lane of the block instead, one exp per
   value (exp(-|z - m|) serves both a growing and a non-growing max) and no reduction
   across the block until the row's end: the sweep's iterations need no barrier.
3. With d = m - z_y >= 0 the loss is log1p(s) when d == 0 (the target dominates: the value
   float32 and float64 lose, computed from its small argument) and d + log(s + exp(-d))
   otherwise (no cancellation: both terms are positive). The target's probability is never
   subtracted from 1: its gradient is -s / (s + exp(-d)), which is -t / (1 + t) with
   t = sum_{j != y} exp(z_j - z_y).
4. Sweep 2 writes the gradient p_j = exp(z_j - m) / (s + exp(-d)) (plus label smoothing and
   z-loss terms) times a per-row factor (1/n_valid for a mean). It runs over the blocks in
   reverse, so the blocks sweep 1 read last are re-read first, while they are still in L2.
   Rows of at most ``_SINGLE_BLOCK_BYTES`` are held in registers instead and read once.

Floor: read the logits once and write the gradient once, 2 * N * V * itemsize bytes; the
streaming sweeps re-read the logits (from L2 where they still are), the single-block path
meets the floor. Ignored rows (target == ignore_index) get loss 0 and a zero gradient; a
target outside [0, V) that is not ignore_index gives a NaN loss and a NaN gradient row
(never an out-of-bounds read).

Candidates (:data:`CANDIDATES`, chosen with :func:`launch_candidate`; the bench times each
beside the default): the per-lane sweep 1 alone, and with persistent grids of one or two
programs an SM over 16 or 8 KiB blocks, few enough rows in flight (132 x 256 KiB = 33 MiB
at V = 128256 bf16) that sweep 2 re-reads its row from L2 rather than HBM, which would meet
the floor; their loops unrolled twice to keep two blocks' loads in flight.

Accuracy does not rest on the hardware's approximate transcendental functions where it
matters: ``_exp`` recovers the rounding error of x * log2(e) with an FMA (exp2 alone would
be off by up to |x| * 2**-24 relative) for the max's rescaling factors, the target's term
and every term of float32 logits, and ``_log1p`` evaluates small arguments with a series
instead of log(1 + t), whose hardware log is accurate only in absolute terms near 1. For
16-bit logits the per-class terms (the sweep-1 sums and the gradient) take the hardware
exp2 alone: its error (about 2**-22 relative, plus |x| * 2**-24, largest on the terms
farthest below the max, which weigh least) is far below the inputs' own rounding (2**-9
for bf16). The sum stays accurate to about 3e-7 relative in the worst case, the loss to
that in absolute terms; the kernel is issue-bound at large vocabularies, and this is a
quarter of its time.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl

from ._common import cdiv, launch, next_power_of_2

LOG2E_HI = tl.constexpr(1.4426950216293335)  # log2(e) rounded to float32
LOG2E_LO = tl.constexpr(1.92596298909109e-08)  # log2(e) - LOG2E_HI
LN2 = tl.constexpr(0.6931471824645996)

# Launch constants: one line of why each; what the sweeps measured, and the variants tried
# and dropped, are in benches/results/2026-12-02_cross_entropy_launch_notes.md.

#: Rows up to this many bytes are held in registers between the sweeps and read once (16 KiB:
#: 8192 bf16 values, 32 per thread over 8 warps); longer rows stream, faster at 64 KiB.
_SINGLE_BLOCK_BYTES = 16384
#: Bytes one streaming block loads: two 16-byte loads per thread over 8 warps, fastest of
#: the block-size sweep at V >= 32K (H100, H200).
_STREAM_BLOCK_BYTES = 8192
#: Warps of a streaming program (see above).
_STREAM_WARPS = 8
#: Values per thread in the single-block path: sets its warp count (4 to 32 warps).
_SINGLE_VALUES_PER_THREAD = 32
#: Most targets (or row losses) the one program of the prologue (epilogue) kernel reads
#: per step: up to 16384 rows take one step, whose loads are all in flight at once.
_COUNT_BLOCK = 16384
#: Block of the gradient-scaling kernel: 8192 values = 16 elementwise values per thread.
_SCALE_BLOCK = 8192
#: Programs per SM of the gradient-scaling kernel; each strides over (row, block) tiles.
_SCALE_PROGRAMS_PER_SM = 8

#: Launch candidates for streaming rows (longer than ``_SINGLE_BLOCK_BYTES``), unmeasured:
#: name -> (per-lane sweep 1, block bytes, warps, programs per SM or None for one a row,
#: loop unroll factor). See the module docstring.
CANDIDATES = {
    "lanes": (True, _STREAM_BLOCK_BYTES, _STREAM_WARPS, None, 1),
    "lanes-l2": (True, 16384, 32, 1, 2),
    "lanes-l2x2": (True, 8192, 16, 2, 2),
}
_candidate = None  # the name :func:`launch_candidate` set, process-wide


def launch_config(V: int, itemsize: int, n_rows: int, candidate=None, device=None):
    """dict(block_v, single, warps, programs, lanes, unroll, fast_exp) for ``n_rows`` rows of
    V values of ``itemsize`` bytes; ``programs`` is the grid size (each program strides over
    rows), ``lanes`` selects the per-lane sweep 1, ``unroll`` the loops' unroll factor,
    ``fast_exp`` the hardware exp2 for the per-class terms (16-bit logits).

    One program per row (a smaller grid keeps fewer rows in flight: slower in every sweep
    of the block-reducing sweep 1, benches/bench_cross_entropy.py mode ``sweep``).
    ``candidate`` (a name of :data:`CANDIDATES`) changes streaming rows' launch; its grid
    follows ``device``'s SM count.
    """
    row_bytes = V * itemsize
    # 16-bit logits: the hardware exp2 for the per-class terms (sweep-1 sums, gradient);
    # the accurate exp cost 24% of the time at 16384 x 128256 bf16 (launch notes)
    fast = itemsize < 4
    if row_bytes <= _SINGLE_BLOCK_BYTES:
        block = next_power_of_2(V)
        warps = min(32, max(4, block // (32 * _SINGLE_VALUES_PER_THREAD)))
        return dict(block_v=block, single=True, warps=warps, programs=n_rows, lanes=False,
                    unroll=1, fast_exp=fast)
    if candidate is None:
        return dict(block_v=_STREAM_BLOCK_BYTES // itemsize, single=False,
                    warps=_STREAM_WARPS, programs=n_rows, lanes=False, unroll=1,
                    fast_exp=fast)
    if candidate not in CANDIDATES:
        raise ValueError(f"candidate must be one of {sorted(CANDIDATES)}, got {candidate!r}")
    lanes, block_bytes, warps, per_sm, unroll = CANDIDATES[candidate]
    programs = n_rows if per_sm is None else per_sm * _sm_count(device)
    return dict(block_v=block_bytes // itemsize, single=False, warps=warps,
                programs=programs, lanes=lanes, unroll=unroll, fast_exp=fast)


@contextlib.contextmanager
def launch_candidate(name):
    """Inside the block, every launch of :func:`cross_entropy_forward` without its own
    ``config`` uses candidate ``name`` (None: the default). Process-wide (benches, tests);
    the exit restores the previous choice."""
    global _candidate
    if name is not None and name not in CANDIDATES:
        raise ValueError(f"candidate must be one of {sorted(CANDIDATES)} or None, got "
                         f"{name!r}")
    previous, _candidate = _candidate, name
    try:
        yield
    finally:
        _candidate = previous


@triton.jit
def _exp(x):
    """exp(x) in float32 to a few ulp, with exp(-inf) = 0."""
    y = x * LOG2E_HI
    err = tl.fma(x, LOG2E_HI, -y) + x * LOG2E_LO  # x*log2(e) - y, exactly enough
    e = tl.exp2(y)
    return tl.where(x == -float("inf"), 0.0, tl.fma(e, err * LN2, e))


@triton.jit
def _exp_fast(x):
    """exp(x) through the hardware's exp2 alone: relative error about 2**-22 plus
    |x| * 2**-24 (the rounding of x * log2(e)), 2**-14 of a bf16 ulp near the row's max."""
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def _exp_of(x, FAST: tl.constexpr):
    if FAST:
        return _exp_fast(x)
    else:
        return _exp(x)


@triton.jit
def _log1p(t):
    """log(1 + t) for t >= 0: series of 2*atanh(t / (2 + t)) below 0.5, log above."""
    w = t / (2.0 + t)
    w2 = w * w
    poly = 1.0 + w2 * (1 / 3 + w2 * (1 / 5 + w2 * (1 / 7 + w2 * (1 / 9 + w2 * (1 / 11)))))
    return tl.where(t < 0.5, 2.0 * w * poly, tl.log(1.0 + t))


@triton.jit
def _block_stats(x, offs, y, valid, z_y, m, s, comp, zsum, HAS_SMOOTHING: tl.constexpr,
                 FAST_EXP: tl.constexpr):
    """Fold one block of logits into the running max m, the compensated sum s (+ comp) of
    exp(z_j - m) over j != y, and (with label smoothing) the sum of z_j - z_y."""
    x_other = tl.where(offs == y, -float("inf"), x)
    m_new = tl.maximum(m, tl.max(x_other, axis=0))
    alpha = _exp(m - m_new)
    block = tl.sum(_exp_of(x_other - m_new, FAST_EXP), axis=0)
    s = s * alpha
    comp = comp * alpha
    # Kahan step: comp carries what the previous additions rounded away
    add = block - comp
    total = s + add
    comp = (total - s) - add
    s = total
    if HAS_SMOOTHING:
        zsum += tl.sum(tl.where(valid, x - z_y, 0.0), axis=0)
    return m_new, s, comp, zsum


@triton.jit
def _lane_stats(x_other, m, s, comp):
    """Fold one block into per-lane running maxima m and compensated sums s (+ comp) of
    exp(z - m): exp(-|z - m|) is the new value's term when the max holds and the old sum's
    factor when the value raises it, one exp either way."""
    d = x_other - m
    e = _exp(-tl.abs(d))
    grow = d > 0.0
    s = tl.where(grow, s * e, s)
    comp = tl.where(grow, comp * e, comp)
    add = tl.where(grow, 1.0, e) - comp
    total = s + add
    comp = (total - s) - add
    return tl.maximum(m, x_other), total, comp


@triton.jit
def _cross_entropy_kernel(
    # data
    logits_ptr,  # (N, V) fp32/bf16/fp16, read
    grad_ptr,  # (N, V) logits dtype, written when WRITE_GRAD; may be logits_ptr itself
    target_ptr,  # (N,) int32/int64
    scale_ptr,  # (N,) or one fp32 value (stride 0): factor of each row's gradient
    loss_ptr,  # (N,) fp32: loss of each row, z-loss term included
    zloss_ptr,  # (N,) fp32: z-loss term of each row
    N,  # rows
    # strides
    stride_ln, stride_lv, stride_gn, stride_gv, stride_t, stride_s,
    # options
    ignore_index, label_smoothing, z_loss,
    # constants (V too: it is fixed per model, and loop bounds must be known to the
    # interpreter as plain ints)
    V: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    LANES: tl.constexpr,
    UNROLL: tl.constexpr,
    FAST_EXP: tl.constexpr,
):
    # programs stride over the rows (one row each with the default grid of N programs;
    # fewer programs keep fewer rows in flight, a configuration the launch sweep times)
    for row in range(tl.program_id(0), N, tl.num_programs(0)):
        _cross_entropy_row(
            tl.full([], 0, tl.int64) + row, logits_ptr, grad_ptr, target_ptr, scale_ptr, loss_ptr,
            zloss_ptr, stride_ln, stride_lv, stride_gn, stride_gv, stride_t, stride_s,
            ignore_index, label_smoothing, z_loss, V, BLOCK_V, SINGLE_BLOCK, WRITE_GRAD,
            HAS_SMOOTHING, HAS_Z_LOSS, LANES, UNROLL, FAST_EXP)


@triton.jit
def _cross_entropy_row(
    row, logits_ptr, grad_ptr, target_ptr, scale_ptr, loss_ptr, zloss_ptr,
    stride_ln, stride_lv, stride_gn, stride_gv, stride_t, stride_s,
    ignore_index, label_smoothing, z_loss,
    V: tl.constexpr, BLOCK_V: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    WRITE_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    LANES: tl.constexpr, UNROLL: tl.constexpr, FAST_EXP: tl.constexpr,
):
    """Loss, z-loss term and (with WRITE_GRAD) gradient of one row (steps 1-4 above)."""
    cols = tl.arange(0, BLOCK_V)
    logits_row = logits_ptr + row * stride_ln
    grad_row = grad_ptr + row * stride_gn
    y = tl.load(target_ptr + row * stride_t).to(tl.int64)

    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(zloss_ptr + row, 0.0)
        if WRITE_GRAD:
            zero = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                tl.store(grad_row + offs * stride_gv, zero, mask=offs < V)
    else:
        # 1. the target first; an out-of-range target reads column 0 and poisons the row
        in_range = (y >= 0) & (y < V)
        y = tl.where(in_range, y, 0)
        z_y = tl.load(logits_row + y * stride_lv).to(tl.float32)

        # 2. sweep 1: max, compensated sum over the other classes, sum for smoothing
        m = z_y
        s = 0.0
        comp = 0.0
        zsum = 0.0
        if SINGLE_BLOCK:
            valid = cols < V
            x = tl.load(logits_row + cols * stride_lv, mask=valid, other=-float("inf"))
            x = x.to(tl.float32)
            m, s, comp, zsum = _block_stats(x, cols, y, valid, z_y, m, s, comp, zsum,
                                            HAS_SMOOTHING, FAST_EXP)
        elif LANES:
            m_lane = tl.full([BLOCK_V], 0.0, tl.float32) + z_y
            s_lane = tl.zeros([BLOCK_V], dtype=tl.float32)
            comp_lane = tl.zeros([BLOCK_V], dtype=tl.float32)
            zsum_lane = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in tl.range(0, V, BLOCK_V, loop_unroll_factor=UNROLL):
                offs = start + cols
                valid = offs < V
                x = tl.load(logits_row + offs * stride_lv, mask=valid, other=-float("inf"),
                            eviction_policy="evict_last").to(tl.float32)
                m_lane, s_lane, comp_lane = _lane_stats(
                    tl.where(offs == y, -float("inf"), x), m_lane, s_lane, comp_lane)
                if HAS_SMOOTHING:
                    zsum_lane += tl.where(valid, x - z_y, 0.0)
            # the lanes combined once, in units of the row's max
            m = tl.max(m_lane, axis=0)
            s = tl.sum((s_lane - comp_lane) * _exp(m_lane - m), axis=0)
            if HAS_SMOOTHING:
                zsum = tl.sum(zsum_lane, axis=0)
        else:
            for start in tl.range(0, V, BLOCK_V, loop_unroll_factor=UNROLL):
                offs = start + cols
                valid = offs < V
                x = tl.load(logits_row + offs * stride_lv, mask=valid, other=-float("inf"),
                            eviction_policy="evict_last").to(tl.float32)
                m, s, comp, zsum = _block_stats(x, offs, y, valid, z_y, m, s, comp, zsum,
                                                HAS_SMOOTHING, FAST_EXP)

        # 3. loss of the row
        d = m - z_y
        e_y = _exp(-d)
        denom = s + e_y
        nll = tl.where(d == 0.0, _log1p(s), d + tl.log(denom))
        loss = nll
        if HAS_SMOOTHING:
            loss = loss - label_smoothing * zsum / V
        zterm = 0.0
        lse = z_y + nll
        if HAS_Z_LOSS:
            zterm = z_loss * lse * lse
        poison = tl.where(in_range, 0.0, float("nan"))
        tl.store(loss_ptr + row, loss + zterm + poison)
        tl.store(zloss_ptr + row, zterm + poison)

        # 4. sweep 2: the gradient, scaled by the row's factor
        if WRITE_GRAD:
            inv = 1.0 / denom
            coef = inv
            target_grad = -s * inv
            smooth_each = 0.0
            if HAS_SMOOTHING:
                smooth_each = label_smoothing / V
                target_grad += label_smoothing - smooth_each
            if HAS_Z_LOSS:
                coef = inv * (1.0 + 2.0 * z_loss * lse)
                target_grad += 2.0 * z_loss * lse * e_y * inv
            row_scale = tl.load(scale_ptr + row * stride_s).to(tl.float32) + poison
            if SINGLE_BLOCK:
                # one block means m is the block's own max: exp(z_j - m) is reused as is
                p = _exp_of(tl.where(cols == y, -float("inf"), x) - m, FAST_EXP) * coef
                p -= smooth_each
                g = tl.where(cols == y, target_grad, p) * row_scale
                tl.store(grad_row + cols * stride_gv, g.to(grad_ptr.dtype.element_ty),
                         mask=cols < V)
            else:
                n_blocks: tl.constexpr = (V + BLOCK_V - 1) // BLOCK_V
                for i in tl.range(0, n_blocks, loop_unroll_factor=UNROLL):
                    offs = (n_blocks - 1 - i) * BLOCK_V + cols
                    valid = offs < V
                    x = tl.load(logits_row + offs * stride_lv, mask=valid,
                                other=-float("inf"), eviction_policy="evict_first")
                    p = _exp_of(x.to(tl.float32) - m, FAST_EXP) * coef - smooth_each
                    g = tl.where(offs == y, target_grad, p) * row_scale
                    tl.store(grad_row + offs * stride_gv, g.to(grad_ptr.dtype.element_ty),
                             mask=valid, eviction_policy="evict_first")


@triton.jit
def _count_valid_kernel(
    target_ptr, N, stride_t, ignore_index,
    factor_ptr,  # one fp32: 1 / n_valid for a mean, else 1
    n_valid_ptr,  # one fp32: max(1, non-ignored targets)
    MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    """The forward's prologue in one program: the mean's divisor (and its reciprocal, the
    gradient's factor), instead of a chain of small torch launches."""
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < N
        t = tl.load(target_ptr + offs.to(tl.int64) * stride_t, mask=inside, other=ignore_index)
        acc += (t != ignore_index).to(tl.int32)
    n = tl.maximum(tl.sum(acc, axis=0), 1).to(tl.float32)
    tl.store(n_valid_ptr, n)
    if MEAN:
        tl.store(factor_ptr, 1.0 / n)
    else:
        tl.store(factor_ptr, 1.0)


@triton.jit
def _reduce_rows_kernel(loss_ptr, zloss_ptr, N, n_valid_ptr, out_ptr, zout_ptr,
                        MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """The forward's epilogue in one program: sum (or mean) of the row losses and z terms."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    zacc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < N
        acc += tl.load(loss_ptr + offs, mask=inside, other=0.0)
        zacc += tl.load(zloss_ptr + offs, mask=inside, other=0.0)
    total = tl.sum(acc, axis=0)
    ztotal = tl.sum(zacc, axis=0)
    if MEAN:
        n = tl.load(n_valid_ptr)
        total = total / n
        ztotal = ztotal / n
    tl.store(out_ptr, total)
    tl.store(zout_ptr, ztotal)


@triton.jit
def _scale_rows_kernel(
    grad_ptr,  # (N, V), scaled in place
    scale_ptr,  # (N,) or one value (stride 0)
    N, V,
    stride_gn, stride_gv, stride_s,
    BLOCK_V: tl.constexpr,
):
    # the forward already applied the factor a mean or a sum expects: with one factor of
    # exactly 1 (the usual backward of a scalar loss) every program stops at once
    first = tl.load(scale_ptr).to(tl.float32)
    if (stride_s != 0) | (first != 1.0):
        n_blocks = tl.cdiv(V, BLOCK_V)
        for tile in range(tl.program_id(0), N * n_blocks, tl.num_programs(0)):
            tile64 = tl.full([], 0, tl.int64) + tile
            row = tile64 // n_blocks
            factor = tl.load(scale_ptr + row * stride_s).to(tl.float32)
            if factor != 1.0:
                offs = (tile64 % n_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)
                valid = offs < V
                ptrs = grad_ptr + row * stride_gn + offs * stride_gv
                g = tl.load(ptrs, mask=valid).to(tl.float32)
                tl.store(ptrs, (g * factor).to(grad_ptr.dtype.element_ty), mask=valid)


def cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, grad, scale: torch.Tensor,
                          ignore_index: int, label_smoothing: float, z_loss: float,
                          config=None):
    """Per-row loss and z-loss term (fp32, shape (N,)) of ``logits`` (N, V); writes the
    gradient times ``scale`` (one fp32 value or (N,)) into ``grad`` (N, V) unless it is
    None. ``grad`` may be ``logits`` itself. ``config`` (tests, benches: any keys of
    :func:`launch_config`'s dict) overrides the launch configuration, which is otherwise
    that of the candidate :func:`launch_candidate` chose (the default outside one)."""
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    zloss = torch.empty_like(loss)
    if N == 0:
        return loss, zloss
    cfg = launch_config(V, logits.element_size(), N, None if config else _candidate,
                        logits.device)
    cfg.update(config or {})
    if cfg["single"] and cfg["block_v"] < V:
        raise ValueError(f"a single-block launch needs block_v >= V = {V}, got "
                         f"{cfg['block_v']}")
    write_grad = grad is not None
    out = grad if write_grad else logits
    launch(_cross_entropy_kernel)[(max(1, min(N, cfg["programs"])),)](
        logits, out, target, scale, loss, zloss, N,
        logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), target.stride(0),
        scale.stride(0) if scale.dim() else 0,
        ignore_index, label_smoothing, z_loss,
        V=V, BLOCK_V=cfg["block_v"], SINGLE_BLOCK=cfg["single"], WRITE_GRAD=write_grad,
        HAS_SMOOTHING=label_smoothing > 0.0, HAS_Z_LOSS=z_loss > 0.0,
        LANES=cfg["lanes"], UNROLL=cfg["unroll"], FAST_EXP=cfg["fast_exp"],
        num_warps=cfg["warps"],
    )
    return loss, zloss


def count_valid(target: torch.Tensor, ignore_index: int, mean: bool):
    """(factor, n_valid): 1 / n_valid for a mean (else 1) and max(1, non-ignored targets),
    fp32 0-d tensors, from one launch."""
    factor = torch.empty((), device=target.device, dtype=torch.float32)
    n_valid = torch.empty_like(factor)
    N = target.shape[0]
    block, warps = _one_program_block(N)
    launch(_count_valid_kernel)[(1,)](target, N, target.stride(0) if N else 1, ignore_index,
                                      factor, n_valid, MEAN=mean, BLOCK=block,
                                      num_warps=warps)
    return factor, n_valid


def reduce_rows(loss: torch.Tensor, zloss: torch.Tensor, n_valid: torch.Tensor, mean: bool):
    """Sum (or, with ``mean``, sum / n_valid) of the row losses and z terms: two 0-d fp32
    tensors from one launch."""
    out = torch.empty((), device=loss.device, dtype=torch.float32)
    zout = torch.empty_like(out)
    block, warps = _one_program_block(loss.shape[0])
    launch(_reduce_rows_kernel)[(1,)](loss, zloss, loss.shape[0], n_valid, out, zout,
                                      MEAN=mean, BLOCK=block, num_warps=warps)
    return out, zout


def _one_program_block(n: int):
    """(block, warps) of a one-program pass over ``n`` values: the whole of them in one
    step up to ``_COUNT_BLOCK`` (a loop of dependent steps would wait on memory each time),
    32 values per thread at most."""
    block = min(max(next_power_of_2(n), 128), _COUNT_BLOCK)
    return block, max(4, min(16, block // 1024))


def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """Multiply row i of ``grad`` (N, V) by ``scale[i]`` (or by the one value of a 0-d
    ``scale``) in place; rows whose factor is exactly 1 are not touched."""
    N, V = grad.shape
    if N == 0 or V == 0:
        return
    tiles = N * cdiv(V, _SCALE_BLOCK)
    grid = (max(1, min(tiles, _SCALE_PROGRAMS_PER_SM * _sm_count(grad.device))),)
    launch(_scale_rows_kernel)[grid](grad, scale, N, V, grad.stride(0), grad.stride(1),
                                     scale.stride(0) if scale.dim() else 0,
                                     BLOCK_V=_SCALE_BLOCK, num_warps=8)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
