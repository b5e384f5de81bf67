"""Multi-tensor AdamW: one launch updates every parameter of a (group, dtype) bucket.

Algorithm (decoupled weight decay, Loshchilov & Hutter; the same update as torch.optim.AdamW):

    g  = grad * inv_scale * clip_coef        (negated when maximizing)
    p  = p * (1 - lr * weight_decay)
    m  = lerp(m, g, 1 - beta1)
    v  = beta2 * v + (1 - beta2) * g * g      (amsgrad: vmax = max(vmax, v), used below)
    p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Math is always fp32; the bias corrections are computed in fp64 from ``1 - beta`` so that
``1 - beta2^t`` keeps its digits at small t. With master weights the fp32 copy is what is
read, decayed and updated, and the low-precision param is rewritten from it in the same pass.

Multi-tensor layout. Every tensor of a launch is one row of an int64 table of raw addresses
(``COLUMNS``); the launch grid runs over chunks of ``CHUNK`` elements, each chunk naming its
row and first element, so one launch covers any number of tensors of any sizes. The tables are
built once on the host and reused while the parameter set and its memory do not change.

Step pipeline, all on the device so that nothing waits for the host and the step can be
captured in a CUDA graph:
  1. (clipping) ``_grad_sumsq_kernel``: one fp32 sum of squares of the unscaled gradient
     per chunk, written to its own slot (no atomics: the reduction order is fixed).
  2. ``_finalize_kernel`` (one program): norm = sqrt(sum of the partials in a fixed order),
     clip coefficient, inv_scale, skip flag (found_inf from a grad scaler or a non-finite
     norm), and every tensor's step += 1 unless skipped.
  3. ``_adamw_kernel``: the update above; a skipped step leaves every program idle.

Floor per parameter (bytes that must move): fp32 params read g, p, m, v and write p, m, v:
28 bytes (amsgrad +8). bf16/fp16 params with fp32 master weights read g (2), master, m, v
and write master, m, v and the param (2): 28 bytes. Clipping adds one read of the gradient.
"""
import torch
import triton
import triton.language as tl

from ._common import cast

#: Columns of the per-tensor address table (int64). Unused columns hold 0.
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, MASTER, STEP, NUMEL = (
    tl.constexpr(i) for i in range(8))
COLUMNS = tl.constexpr(8)

# Tuning constants. The kernels write their inputs in place through raw addresses, so
# Triton's autotuner (which reruns a kernel to time it) cannot be used: the configuration
# below is fixed, for a bandwidth-bound elementwise pass on Hopper.
#: Elements per loop iteration: 8 per thread at 4 warps, two 16-byte fp32 loads per stream.
BLOCK = 1024
#: Elements per program: 16 iterations amortise the two dependent table loads a program
#: makes before streaming, and leave ~8k programs for GPT-2 small (several waves on 132 SMs).
CHUNK = 16 * BLOCK
#: Byte alignment promised to the compiler for aligned launches: one 16-byte vector.
ALIGNMENT = tl.constexpr(16)
#: Warps per program: small programs keep registers low and many programs resident per SM.
NUM_WARPS = 4
#: Partials (or step addresses) the single finalize program reduces per iteration.
FINALIZE_BLOCK = 1024
#: Slots of the per-device scalar buffer written by the finalize kernel.
SKIP, CLIP_COEF, INV_SCALE, NORM = (tl.constexpr(i) for i in range(4))
SCALARS = tl.constexpr(4)
#: clip_grad_norm_'s guard against division by a zero norm (kept identical to torch's).
CLIP_EPS = tl.constexpr(1e-6)

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _grad_sumsq_kernel(
    table_ptr,     # int64 [T, COLUMNS]: addresses and numels of the launch's tensors
    chunks_ptr,    # int64 [C, 2]: (row, first element) of each chunk
    partials_ptr,  # fp32 [C]: this launch's slice of the device's partial sums
    scale_ptr,     # fp32 [1]: the grad scaler's scale (read when HAS_SCALE)
    GRAD_DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Partial sum of squares of the unscaled gradient over one chunk."""
    pid = tl.program_id(0)
    row = tl.load(chunks_ptr + 2 * pid)
    start = tl.multiple_of(tl.load(chunks_ptr + 2 * pid + 1), CHUNK)
    numel = tl.load(table_ptr + row * COLUMNS + NUMEL)
    grad = tl.load(table_ptr + row * COLUMNS + GRAD).to(tl.pointer_type(GRAD_DTYPE))
    if ALIGNED:
        # the host puts a tensor in an aligned launch only if its address is 16-byte
        # aligned: the hint (on the pointer, where the compiler uses it) gives 16-byte loads
        grad = tl.multiple_of(grad, ALIGNMENT)
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = tl.div_rn(1.0, tl.load(scale_ptr).to(tl.float32))
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(CHUNK // BLOCK):
        off = start + i * BLOCK
        # unscale first, as GradScaler.unscale_ does, so the norm is the one torch reports
        if off + BLOCK <= numel:
            g = tl.load(grad + off + tl.arange(0, BLOCK)).to(tl.float32) * inv_scale
            acc += g * g
        elif off < numel:
            offs = off + tl.arange(0, BLOCK)
            g = tl.load(grad + offs, mask=offs < numel, other=0.0).to(tl.float32) * inv_scale
            acc += g * g
    tl.store(partials_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _finalize_kernel(
    partials_ptr,   # fp32 [n_partials]: per-chunk sums of squares (read when HAS_NORM)
    n_partials,
    found_inf_ptr,  # fp32 [1]: the grad scaler's found_inf (read when HAS_FOUND_INF)
    scale_ptr,      # fp32 [1]: the grad scaler's scale (read when HAS_SCALE)
    steps_ptr,      # int64 [n_steps]: addresses of the fp32 step counters to advance
    n_steps,
    scalars_ptr,    # fp32 [SCALARS]: out (skip, clip_coef, inv_scale, norm)
    max_norm,
    HAS_NORM: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: global norm, clip coefficient, skip flag, and the step increments."""
    # 1. inverse scale and found_inf of the grad scaler
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = tl.div_rn(1.0, tl.load(scale_ptr).to(tl.float32))
    skip = 0.0
    if HAS_FOUND_INF:
        skip = tl.where(tl.load(found_inf_ptr) != 0.0, 1.0, 0.0)
    # 2. norm from the partials, always summed in the same order (deterministic)
    norm = 0.0
    coef = 1.0
    if HAS_NORM:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        start = 0
        while start < n_partials:
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(partials_ptr + offs, mask=offs < n_partials, other=0.0)
            start += BLOCK
        norm = tl.sqrt_rn(tl.sum(acc, axis=0))
        coef = tl.minimum(tl.div_rn(max_norm, norm + CLIP_EPS), 1.0)
        # inf or NaN anywhere in the gradients: the step must not reach the weights
        finite = tl.abs(norm) < float("inf")
        skip = tl.where(finite, skip, 1.0)
    tl.store(scalars_ptr + SKIP, skip)
    tl.store(scalars_ptr + CLIP_COEF, coef)
    tl.store(scalars_ptr + INV_SCALE, inv_scale)
    tl.store(scalars_ptr + NORM, norm)
    # 3. advance every step counter unless the step is skipped (torch's found_inf semantics)
    start = 0
    while start < n_steps:
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_steps
        step = tl.load(steps_ptr + offs, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        tl.store(step, tl.load(step, mask=mask) + (1.0 - skip), mask=mask)
        start += BLOCK


@triton.jit
def _adamw_block(
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, offs, numel,
    inv_scale, clip_coef, decay, lr_t, bc2_sqrt, beta1, one_minus_beta1, beta2,
    one_minus_beta2, eps,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER_WEIGHTS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """The AdamW update of ``BLOCK`` elements; ``MASKED`` only for a tensor's last block."""
    mask = offs < numel if MASKED else None
    weights = master if MASTER_WEIGHTS else param
    g = tl.load(grad + offs, mask=mask).to(tl.float32)
    p = tl.load(weights + offs, mask=mask).to(tl.float32)
    m = tl.load(exp_avg + offs, mask=mask).to(tl.float32)
    v = tl.load(exp_avg_sq + offs, mask=mask).to(tl.float32)
    # the two factors are applied one after the other, as unscale_ then clip_grad_norm_ do
    g = g * inv_scale * clip_coef
    if MAXIMIZE:
        g = -g
    p = p * decay
    # lerp(m, g, 1 - beta1) in the two forms torch uses for weights below / above 0.5
    m = tl.where(one_minus_beta1 < 0.5, m + one_minus_beta1 * (g - m), g - (g - m) * beta1)
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        v_max = tl.maximum(tl.load(max_exp_avg_sq + offs, mask=mask).to(tl.float32), v)
        tl.store(max_exp_avg_sq + offs, cast(v_max, max_exp_avg_sq.dtype.element_ty), mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(v_max), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - lr_t * tl.div_rn(m, denom)
    tl.store(exp_avg + offs, cast(m, exp_avg.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq + offs, cast(v, exp_avg_sq.dtype.element_ty), mask=mask)
    if MASTER_WEIGHTS:
        tl.store(master + offs, p, mask=mask)
    tl.store(param + offs, cast(p, param.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_kernel(
    table_ptr,    # int64 [T, COLUMNS]: addresses and numels of the launch's tensors
    chunks_ptr,   # int64 [C, 2]: (row, first element) of each chunk
    lr_ptr,       # fp32 [1]: the group's learning rate, on the device
    scalars_ptr,  # fp32 [SCALARS]: (skip, clip_coef, inv_scale, norm) from _finalize_kernel
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER_WEIGHTS: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """AdamW over one chunk of one tensor; idle when the finalize kernel flagged a skip."""
    pid = tl.program_id(0)
    if tl.load(scalars_ptr + SKIP) == 0.0:
        # 1. which tensor and which elements
        row = tl.load(chunks_ptr + 2 * pid)
        start = tl.multiple_of(tl.load(chunks_ptr + 2 * pid + 1), CHUNK)
        entry = table_ptr + row * COLUMNS
        numel = tl.load(entry + NUMEL)
        param = tl.load(entry + PARAM).to(tl.pointer_type(PARAM_DTYPE))
        grad = tl.load(entry + GRAD).to(tl.pointer_type(PARAM_DTYPE))
        exp_avg = tl.load(entry + EXP_AVG).to(tl.pointer_type(STATE_DTYPE))
        exp_avg_sq = tl.load(entry + EXP_AVG_SQ).to(tl.pointer_type(STATE_DTYPE))
        max_exp_avg_sq = tl.load(entry + MAX_EXP_AVG_SQ).to(tl.pointer_type(STATE_DTYPE))
        master = tl.load(entry + MASTER).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            # the host puts a tensor in an aligned launch only if all its addresses are
            # 16-byte aligned: the hints (on the pointers, where the compiler uses them)
            # make every load and store below a 16-byte vector
            param = tl.multiple_of(param, ALIGNMENT)
            grad = tl.multiple_of(grad, ALIGNMENT)
            exp_avg = tl.multiple_of(exp_avg, ALIGNMENT)
            exp_avg_sq = tl.multiple_of(exp_avg_sq, ALIGNMENT)
            max_exp_avg_sq = tl.multiple_of(max_exp_avg_sq, ALIGNMENT)
            master = tl.multiple_of(master, ALIGNMENT)
        step = tl.load(tl.load(entry + STEP).to(tl.pointer_type(tl.float32)))
        # 2. per-tensor scalars: fp64 keeps 1 - beta^t exact to fp32 even when beta^t ~ 1
        t = step.to(tl.float64)
        lr = tl.load(lr_ptr).to(tl.float64)
        bc1 = 1.0 - tl.exp(t * tl.log(1.0 - tl.cast(one_minus_beta1, tl.float64)))
        bc2 = 1.0 - tl.exp(t * tl.log(1.0 - tl.cast(one_minus_beta2, tl.float64)))
        lr_t = (lr / bc1).to(tl.float32)
        bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
        decay = (1.0 - lr * tl.cast(weight_decay, tl.float64)).to(tl.float32)
        inv_scale = tl.load(scalars_ptr + INV_SCALE)
        clip_coef = tl.load(scalars_ptr + CLIP_COEF)
        # 3. stream the chunk; only a tensor's last block needs a mask (loop bounds are
        # static, blocks past the tensor's end are skipped)
        for i in range(CHUNK // BLOCK):
            off = start + i * BLOCK
            if off + BLOCK <= numel:
                _adamw_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master,
                             off + tl.arange(0, BLOCK), numel, inv_scale, clip_coef, decay,
                             lr_t, bc2_sqrt, beta1, one_minus_beta1, beta2, one_minus_beta2,
                             eps, AMSGRAD, MAXIMIZE, MASTER_WEIGHTS, MASKED=False)
            elif off < numel:
                _adamw_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master,
                             off + tl.arange(0, BLOCK), numel, inv_scale, clip_coef, decay,
                             lr_t, bc2_sqrt, beta1, one_minus_beta1, beta2, one_minus_beta2,
                             eps, AMSGRAD, MAXIMIZE, MASTER_WEIGHTS, MASKED=True)


def chunk_table(numels):
    """(row, first element) of every chunk of tensors with these sizes, as a list of pairs."""
    return [(row, start) for row, n in enumerate(numels) for start in range(0, n, CHUNK)]


def grad_sumsq(table, chunks, partials, scale, grad_dtype, aligned):
    """Step 1: per-chunk sums of squares of ``grad * (1 / scale)`` into ``partials``."""
    n_chunks = chunks.shape[0]
    if n_chunks == 0:
        return
    _grad_sumsq_kernel[(n_chunks,)](
        table, chunks, partials, partials if scale is None else scale,
        GRAD_DTYPE=TL_DTYPES[grad_dtype], HAS_SCALE=scale is not None, ALIGNED=aligned,
        BLOCK=BLOCK, CHUNK=CHUNK, num_warps=NUM_WARPS,
    )


def finalize(partials, found_inf, scale, steps, scalars, max_norm):
    """Step 2: norm, clip coefficient, inv_scale and skip flag into ``scalars``; steps += 1.

    ``partials`` is None without clipping; ``found_inf``/``scale`` are None without a grad
    scaler (``scale`` is also None when the gradients were already unscaled).
    """
    _finalize_kernel[(1,)](
        scalars if partials is None else partials,
        0 if partials is None else partials.numel(),
        scalars if found_inf is None else found_inf,
        scalars if scale is None else scale,
        steps, steps.numel(), scalars, float(max_norm or 0.0),
        HAS_NORM=partials is not None, HAS_FOUND_INF=found_inf is not None,
        HAS_SCALE=scale is not None, BLOCK=FINALIZE_BLOCK, num_warps=NUM_WARPS,
    )


def adamw_update(table, chunks, lr, scalars, *, beta1, beta2, eps, weight_decay, amsgrad,
                 maximize, master, param_dtype, state_dtype, aligned):
    """Step 3: the AdamW update of every tensor in ``table`` (one launch)."""
    n_chunks = chunks.shape[0]
    if n_chunks == 0:
        return
    _adamw_kernel[(n_chunks,)](
        table, chunks, lr, scalars,
        float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps),
        float(weight_decay),
        PARAM_DTYPE=TL_DTYPES[param_dtype], STATE_DTYPE=TL_DTYPES[state_dtype],
        AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), MASTER_WEIGHTS=bool(master),
        ALIGNED=bool(aligned), BLOCK=BLOCK, CHUNK=CHUNK, num_warps=NUM_WARPS,
    )
