"""fastlab.ops.fused_linear_cross_entropy against the unfused float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from fastlab.ops._dispatch import backend
from fastlab.ops.fused_linear_cross_entropy import (fused_linear_cross_entropy,
                                                    fused_linear_cross_entropy_ref)
from fastlab.testing import assert_close, randn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(N, H, V, dtype, with_bias, seed, ignore_every=0, device=DEVICE):
    hidden = randn((N, H), dtype, device, seed=seed, requires_grad=True)
    weight = randn((V, H), dtype, device, seed=seed + 1, scale=H ** -0.5 * 3,
                   requires_grad=True)
    bias = randn((V,), dtype, device, seed=seed + 2, requires_grad=True) if with_bias else None
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        target[::ignore_every] = -100
    return hidden, weight, bias, target.to(device)


def _check_once(N, H, V, dtype, bk, *, with_bias, chunk_size, reduction="mean",
                low_memory=False, **options):
    hidden, weight, bias, target = _inputs(N, H, V, dtype, with_bias, seed=N + V,
                                           ignore_every=4)
    params = [p for p in (hidden, weight, bias) if p is not None]
    want = fused_linear_cross_entropy_ref(hidden, weight, target, bias, reduction=reduction,
                                          **options)
    w = randn(want.shape, torch.float64, DEVICE, seed=3) if reduction == "none" else 1.0
    want_grads = torch.autograd.grad((want * w).sum(), params)
    with backend(bk):
        loss = fused_linear_cross_entropy(hidden, weight, target, bias, reduction=reduction,
                                          chunk_size=chunk_size, low_memory=low_memory,
                                          **options)
        grads = torch.autograd.grad((loss * w).sum(), params)
    assert loss.dtype == torch.float32
    # the logits are rounded to the inputs' dtype before the loss, as in any bf16 model
    assert_close(loss, want, dtype, scale=0.5)
    for got, expected in zip(grads, want_grads):
        assert got.dtype == dtype
        assert_close(got, expected, dtype, scale=2.0)


@pytest.mark.parametrize("low_memory", [False, True], ids=["fp32-acc", "low-memory"])
@pytest.mark.parametrize("bk", ["kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [
    dict(with_bias=False, chunk_size=None),
    dict(with_bias=True, chunk_size=8, label_smoothing=0.1, z_loss=1e-3),
    dict(with_bias=True, chunk_size=16, reduction="none", z_loss=1e-3),
    dict(with_bias=False, chunk_size=5, reduction="sum", label_smoothing=0.2),
], ids=["plain", "options-chunked", "none-chunked", "sum-chunked"])
def test_matches_unfused_reference(case, dtype, bk, low_memory):
    _check_once(37, 24, 203, dtype, bk, low_memory=low_memory, **case)


def test_weight_gradient_accumulates_in_fp32():
    """One token per chunk: 64 additions. Rounding the running sum to bf16 after each would
    drift by several ulps; accumulated in fp32 it is one rounding from the exact sum of the
    same bf16 terms (each token's logits gradient times its hidden row)."""
    from fastlab.ops.cross_entropy import cross_entropy

    hidden, weight, _, target = _inputs(64, 16, 33, torch.bfloat16, False, seed=5)
    with backend("kernel"):
        (got,) = torch.autograd.grad(
            fused_linear_cross_entropy(hidden, weight, target, reduction="sum",
                                       chunk_size=1), weight)
        # row by row, as the chunks compute them (a bf16 matmul's rounding depends on shape)
        logits = torch.cat([hidden[n:n + 1] @ weight.T for n in range(64)])
        logits = logits.detach().requires_grad_(True)
        (g_logits,) = torch.autograd.grad(cross_entropy(logits, target, reduction="sum"),
                                          logits)
    h = hidden.detach().double()
    exact = g_logits.double().T @ h
    size = g_logits.double().abs().T @ h.abs()
    err = (got.double() - exact).abs()
    assert bool((err <= 2**-8 * exact.abs() + 1e-6 * size).all()), float((err / (
        2**-8 * exact.abs() + 1e-6 * size)).max())


def _weight_grad_errors(N, H, V, chunk_size, reduction, seed):
    """Max errors of the bf16 weight gradient on the kernel path, in units of the
    gradient's largest entry: each mode (fp32 accumulation, low-memory) against the float64
    reference, and low-memory against fp32 accumulation."""
    hidden, weight, _, target = _inputs(N, H, V, torch.bfloat16, False, seed=seed,
                                        ignore_every=7)
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight))
    (exact,) = torch.autograd.grad(fused_linear_cross_entropy_ref(h64, w64, target,
                                                                  reduction=reduction), w64)
    got = {}
    for low_memory in (False, True):
        with backend("kernel"):
            loss = fused_linear_cross_entropy(hidden, weight, target, reduction=reduction,
                                              chunk_size=chunk_size, low_memory=low_memory)
            (grad,) = torch.autograd.grad(loss, weight)
        assert grad.dtype == torch.bfloat16
        got[low_memory] = grad.double()
    size, norm = exact.abs().max(), exact.norm()
    pairs = ((got[False], exact), (got[True], exact), (got[True], got[False]))
    return ([float((a - b).abs().max() / size) for a, b in pairs],
            [float((a - b).norm() / norm) for a, b in pairs])


@pytest.mark.parametrize("N, H, V, chunk_size, reduction", [
    (32, 16, 33, 1, "sum"),
    (160, 24, 203, 16, "mean"),
], ids=["32-chunks-of-1", "10-chunks-of-16"])
def test_low_memory_weight_gradient_error(N, H, V, chunk_size, reduction):
    """Low-memory mode rounds the bf16 weight gradient once per chunk. Errors measured here,
    as (fp32 accumulation vs float64, low-memory vs float64, low-memory vs fp32
    accumulation), max in units of the largest entry / norm-wise:
    32 chunks of 1: max 5.9e-3, 5.9e-3, 8.2e-3 / norm 4.0e-3, 5.0e-3, 4.3e-3;
    10 chunks of 16: max 5.8e-3, 7.1e-3, 4.2e-3 / norm 4.9e-3, 6.0e-3, 4.0e-3.
    One bf16 rounding is up to 3.9e-3; both modes also round the logits and their gradient
    to bf16 before the weight-gradient product."""
    max_errors, norm_errors = _weight_grad_errors(N, H, V, chunk_size, reduction, seed=N)
    assert all(e <= b for e, b in zip(max_errors, (1e-2, 1.5e-2, 1.5e-2))), max_errors
    assert all(e <= 1e-2 for e in norm_errors), norm_errors


def test_low_memory_with_one_chunk_is_the_default_bit_for_bit():
    """One chunk rounds the weight gradient once in either mode; fp32 weights accumulate
    in fp32 in either mode (several chunks, autocast to bf16)."""
    hidden, weight, bias, target = _inputs(45, 16, 97, torch.bfloat16, True, seed=12,
                                           ignore_every=4)

    def run(low_memory, chunk_size=None, **kw):
        loss = fused_linear_cross_entropy(hidden, weight, target, bias, chunk_size=chunk_size,
                                          low_memory=low_memory, label_smoothing=0.1)
        return [loss] + list(torch.autograd.grad(loss, (hidden, weight, bias)))

    with backend("kernel"):
        for a, b in zip(run(False), run(True)):
            assert torch.equal(a, b)
        params = [p.detach().float().requires_grad_(True) for p in (hidden, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs = []
            for low_memory in (False, True):
                loss = fused_linear_cross_entropy(params[0], params[1], target, params[2],
                                                  chunk_size=8, low_memory=low_memory)
                runs.append([loss] + list(torch.autograd.grad(loss, params)))
    for a, b in zip(*runs):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("bk", ["kernel", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_memory_under_autocast_with_bf16_parameters(reduction, bk):
    """A bf16 model under bf16 autocast, several chunks, bias: the weight gradient
    accumulates in bf16 in the returned tensor; loss and gradients against float64."""
    _check_autocast_once(37, 24, 203, torch.bfloat16, bk, "cpu", with_bias=True,
                         reduction=reduction, chunk_size=8, low_memory=True,
                         dtypes=(torch.bfloat16,) * 3)


def test_low_memory_chunks_follow_the_budget():
    """The chunk rows follow from the logits budget; at the target shape (N=16384 H=4096
    V=128256 bf16) the analytic peak is 1.382 GB against the default's 3.286 GB."""
    from fastlab.ops.fused_linear_cross_entropy import (_LOW_MEMORY_LOGITS_BYTES, chunk_rows,
                                                        peak_extra_bytes)

    assert chunk_rows(16384, 128256, 2, low_memory=True) == 768
    assert 768 * 128256 * 2 <= _LOW_MEMORY_LOGITS_BYTES
    assert chunk_rows(16384, 128256, 2) == 4096
    assert chunk_rows(10, 203, 2, low_memory=True) == 10
    assert chunk_rows(4096, 2 ** 24, 4, low_memory=True) == 16  # the fewest rows
    low = peak_extra_bytes(16384, 4096, 128256, dtype=torch.bfloat16, low_memory=True)
    default = peak_extra_bytes(16384, 4096, 128256, dtype=torch.bfloat16)
    assert low == 1_382_023_168 and low < 1.4e9
    assert default == 3_286_368_256


def test_options_reach_the_loss_and_z_loss_is_reported():
    hidden, weight, bias, target = _inputs(9, 8, 21, torch.float32, True, seed=6,
                                           ignore_every=3)
    with backend("kernel"):
        plain, z0 = fused_linear_cross_entropy(hidden, weight, target, bias,
                                               return_z_loss=True)
        loss, z = fused_linear_cross_entropy(hidden, weight, target, bias, z_loss=1e-2,
                                             label_smoothing=0.1, return_z_loss=True)
    want, want_z = fused_linear_cross_entropy_ref(hidden, weight, target, bias, z_loss=1e-2,
                                                  label_smoothing=0.1, return_z_loss=True)
    assert float(z0) == 0.0 and float(z) > 0.0
    assert_close(loss, want, torch.float32)
    assert_close(z, want_z, torch.float32)
    assert not torch.allclose(plain, loss)


@pytest.mark.parametrize("call, error, match", [
    (lambda h, w, t: fused_linear_cross_entropy(h, w[:, :3], t), ValueError,
     r"weight must have shape \(V, 8\)"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w.double(), t), ValueError,
     "must match hidden"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t, torch.zeros(3)), ValueError,
     r"bias must be a \(21,\) tensor"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t[:3]), ValueError,
     "target must have shape"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t.float()), TypeError,
     "target must hold class indices"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=0), ValueError,
     "chunk_size must be"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t + 21), ValueError,
     "outside \\[0, 21\\)"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w.tolist(), t), TypeError,
     "weight must be a tensor"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t, bias=[0.0] * 21), TypeError,
     "bias must be a tensor or None"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t, reduction="avg"), ValueError,
     "reduction must be"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t, low_memory="yes"), TypeError,
     "low_memory must be a bool"),
], ids=["hidden-size", "dtype", "bias", "target-shape", "float-target", "chunk", "range",
        "weight-list", "bias-list", "reduction", "low-memory"])
@pytest.mark.parametrize("bk", ["auto", "kernel", "reference"])
def test_bad_arguments(call, error, match, bk):
    """The same error whichever path would run: the checks come before the choice."""
    hidden, weight, _, target = _inputs(9, 8, 21, torch.float32, False, seed=7)
    with backend(bk), pytest.raises(error, match=match):
        call(hidden, weight, target)


def _check_autocast_once(N, H, V, amp_dtype, bk, device, *, with_bias, reduction, chunk_size,
                         dtypes=(torch.float32,) * 3, loss_scale=1.0, low_memory=False,
                         **options):
    """The op under torch.autocast against F.linear + F.cross_entropy under the same
    autocast: loss in float32, each gradient in its own input's dtype. Ours are accumulated
    in fp32 and rounded once, torch's pass through the autocast dtype first: the
    tolerance is the autocast dtype's. ``loss_scale`` multiplies both losses before the
    backward, as a GradScaler does (the gradients are compared divided by it)."""
    hidden, weight, bias, target = _inputs(N, H, V, torch.float32, with_bias, seed=N + V,
                                           ignore_every=5, device=device)
    hidden, weight = (t.detach().to(d).requires_grad_(True)
                      for t, d in zip((hidden, weight), dtypes))
    if with_bias:
        bias = bias.detach().to(dtypes[2]).requires_grad_(True)
    params = [p for p in (hidden, weight, bias) if p is not None]
    w = randn((N,), torch.float32, device, seed=4) if reduction == "none" else 1.0
    w = w * loss_scale
    with torch.autocast(device, dtype=amp_dtype):
        logits = F.linear(hidden, weight, bias)
        # the exact loss of the autocast logits (torch's own CUDA cross-entropy under
        # autocast is 3.8e-3 off for bf16 logits, measured on the H200)
        want = F.cross_entropy(logits.double(), target, reduction=reduction, **options).float()
        want_grads = torch.autograd.grad((want * w).sum(), params)
        with backend(bk):
            loss = fused_linear_cross_entropy(hidden, weight, target, bias,
                                              reduction=reduction, chunk_size=chunk_size,
                                              low_memory=low_memory, **options)
            grads = torch.autograd.grad((loss * w).sum(), params)
    assert logits.dtype == amp_dtype and want.dtype == loss.dtype == torch.float32
    assert_close(loss, want, amp_dtype, scale=0.5)
    for got, expected, param in zip(grads, want_grads, params):
        assert got.dtype == expected.dtype == param.dtype
        assert_close(got / loss_scale, expected / loss_scale, amp_dtype, scale=2.0)


@pytest.mark.parametrize("bk", ["kernel", "reference"])
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [
    dict(reduction="mean", with_bias=True, chunk_size=8),
    dict(reduction="sum", with_bias=False, chunk_size=None, label_smoothing=0.1),
    dict(reduction="none", with_bias=True, chunk_size=16),
], ids=["mean-bias-chunked", "sum-smoothing", "none-bias-chunked"])
def test_autocast_fp32_parameters_match_torch(case, amp_dtype, bk):
    """The default of an AMP run: fp32 parameters, the matmul in the autocast dtype."""
    _check_autocast_once(37, 24, 203, amp_dtype, bk, "cpu", **case)


@pytest.mark.parametrize("bk", ["kernel", "reference"])
def test_autocast_mixed_input_dtypes(bk):
    """bf16 hidden states (a previous layer's output under autocast) with an fp32 weight
    and bias, as F.linear takes them under autocast; outside it they must match."""
    _check_autocast_once(19, 16, 75, torch.bfloat16, bk, "cpu", with_bias=True,
                         reduction="mean", chunk_size=8,
                         dtypes=(torch.bfloat16, torch.float32, torch.float32))
    hidden, weight, _, target = _inputs(19, 16, 75, torch.float32, False, seed=9)
    with pytest.raises(ValueError, match="must match hidden"):
        fused_linear_cross_entropy(hidden.bfloat16(), weight, target)


@pytest.mark.parametrize("bk", ["kernel", "reference"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp16", "autocast-fp16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float16_gradients_survive_a_loss_scale(reduction, autocast, bk):
    """fp16 + GradScaler: the logits' gradient (fp16) is formed with the incoming loss scale
    already applied, else most of a wide vocabulary's p_j / n_valid is below fp16's range.
    Against the float64 reference on the operands rounded to fp16, row by row (each weight
    row is one class: a rare class's row is where a flushed gradient shows; rounded before
    the scale, rows were off by up to 29%), within a few fp16 roundings of the logits."""
    N, H, V = 37, 16, 4099
    dtype = torch.float32 if autocast else torch.float16
    hidden, weight, bias, target = _inputs(N, H, V, dtype, True, seed=11, ignore_every=6)
    params = (hidden, weight, bias)
    rounded = [p.detach().half().double().requires_grad_(True) for p in params]
    w = 2.0 ** 16 * (torch.rand(N, dtype=torch.float64) + 0.5) / N \
        if reduction == "none" else 2.0 ** 16
    want = fused_linear_cross_entropy_ref(rounded[0], rounded[1], target, rounded[2],
                                          reduction=reduction)
    want_grads = torch.autograd.grad((want * w).sum(), rounded)
    with backend(bk), torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        loss = fused_linear_cross_entropy(hidden, weight, target, bias, reduction=reduction,
                                          chunk_size=16)
        grads = torch.autograd.grad((loss * w).sum(), params)
    for name, got, expected, param in zip(("hidden", "weight", "bias"), grads, want_grads,
                                          params):
        assert got.dtype == param.dtype
        got, expected = got.double().reshape(expected.shape[0], -1), expected.reshape(
            expected.shape[0], -1)
        size = expected.norm(dim=1)
        assert bool((got[size == 0] == 0).all()), name  # ignored tokens' rows
        row_error = (got - expected).norm(dim=1)[size > 0] / size[size > 0]
        assert float(row_error.max()) < 2e-2, (name, float(row_error.max()))


def test_autocast_gradients_are_rounded_once():
    """Under autocast the fp32 parameters' gradients keep fp32 precision: accumulated in
    fp32 and rounded once, not through bf16 (the op's body runs with autocast off, where
    CPU autocast would run the op's fp32 products in bf16). Loss, and the gradients rounded
    to bf16, equal the op's on operands cast to bf16 beforehand."""
    hidden, weight, bias, target = _inputs(37, 24, 203, torch.float32, True, seed=10)
    params = (hidden, weight, bias)
    with backend("kernel"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(hidden, weight, target, bias, chunk_size=8)
            grads = torch.autograd.grad(loss, params)
        cast = [p.detach().bfloat16().requires_grad_(True) for p in params]
        loss_cast = fused_linear_cross_entropy(cast[0], cast[1], target, cast[2],
                                               chunk_size=8)
        grads_cast = torch.autograd.grad(loss_cast, cast)
    assert torch.equal(loss, loss_cast)
    for name, got, rounded in zip(("hidden", "weight", "bias"), grads, grads_cast):
        assert got.dtype == torch.float32
        assert not torch.equal(got, got.bfloat16().float()), name
        if name == "hidden":  # a bf16 matmul may sum in another order than an fp32 one
            assert_close(got.bfloat16(), rounded, torch.bfloat16, scale=0.1)
        else:
            assert torch.equal(got.bfloat16(), rounded), name


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_autocast_fp32_parameters_match_torch(reduction, amp_dtype):
    """The CUDA kernel path under torch.autocast("cuda"): several chunks, bias, fp32
    parameters, the loss scaled as a GradScaler's first steps do (less for a sum, whose
    scaled logits' gradient would pass fp16's largest value)."""
    _check_autocast_once(1031, 256, 8191, amp_dtype, "auto", "cuda", with_bias=True,
                         reduction=reduction, chunk_size=256,
                         # per-row weights of "none" and "sum" reach 1: a larger scale
                         # overflows torch's fp16 backward of F.linear (inf, then NaN)
                         loss_scale=2.0 ** 16 if reduction == "mean" else 2.0 ** 8)


@pytest.mark.gpu
def test_real_size_matches_unfused():
    hidden, weight, bias, target = _inputs(2048, 1024, 32768, torch.bfloat16, True, seed=8,
                                           ignore_every=9, device="cuda")
    params = (hidden, weight, bias)
    loss = fused_linear_cross_entropy(hidden, weight, target, bias, label_smoothing=0.1,
                                      chunk_size=512)
    grads = torch.autograd.grad(loss, params)
    logits = (hidden.float() @ weight.float().T + bias.float())
    want = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
    want_grads = torch.autograd.grad(want, params)
    assert_close(loss, want, torch.bfloat16)
    for got, expected in zip(grads, want_grads):
        assert_close(got, expected, torch.bfloat16, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("low_memory", [False, True], ids=["fp32-acc", "low-memory"])
def test_cuda_peak_memory_follows_the_formula(low_memory):
    """What one forward + backward allocates beyond its inputs (the returned gradients
    included) is the module docstring's formula, within 16 MiB."""
    from fastlab.ops.fused_linear_cross_entropy import peak_extra_bytes

    N, H, V = 4096, 1024, 65536
    hidden, weight, _, target = _inputs(N, H, V, torch.bfloat16, False, seed=13,
                                        device="cuda")

    def step():
        loss = fused_linear_cross_entropy(hidden, weight, target, low_memory=low_memory)
        return torch.autograd.grad(loss, (hidden, weight))

    step()  # cuBLAS workspaces and kernels are made here, outside the measurement
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    want = peak_extra_bytes(N, H, V, dtype=torch.bfloat16, low_memory=low_memory)
    assert abs(peak - want) <= 16 << 20, (peak, want)
    del grads


@pytest.mark.gpu
def test_cuda_low_memory_differs_from_fp32_only_in_the_weight_gradient():
    """16 chunks: loss and hidden gradient equal the default's bit for bit; the bf16
    weight gradient, rounded once per chunk, stays within a few bf16 roundings of it."""
    hidden, weight, bias, target = _inputs(8192, 1024, 32768, torch.bfloat16, True, seed=14,
                                           ignore_every=9, device="cuda")
    params = (hidden, weight, bias)
    runs = []
    for low_memory in (False, True):
        loss = fused_linear_cross_entropy(hidden, weight, target, bias, chunk_size=512,
                                          low_memory=low_memory)
        runs.append([loss] + list(torch.autograd.grad(loss, params)))
    (loss, gh, gw, gb), (loss_lm, gh_lm, gw_lm, gb_lm) = runs
    assert torch.equal(loss, loss_lm) and torch.equal(gh, gh_lm) and torch.equal(gb, gb_lm)
    diff = gw_lm.double() - gw.double()
    assert float(diff.abs().max() / gw.double().abs().max()) < 2e-2
    assert float(diff.norm() / gw.double().norm()) < 1e-2


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
def test_product_into_op_survives_inductor_decompositions(accumulate, out_dtype):
    """The fused op's products into a buffer (fp32 sums of bf16 operands, or bf16 into bf16)
    are one opaque op: traced with Inductor's decompositions (which reject mm/addmm with
    out= and out_dtype, as a compiled fused op's body is traced on a GPU) it stays one
    node, and its value is the float64 product (added to what ``out`` held)."""
    import sys

    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    flce = sys.modules["fastlab.ops.fused_linear_cross_entropy"]  # the attribute is the op

    a = randn((37, 19), torch.bfloat16, "cpu", seed=1)
    b = randn((19, 23), torch.bfloat16, "cpu", seed=2)
    start = randn((37, 23), out_dtype, "cpu", seed=3)

    def body(out, a, b):
        out = out.clone()
        flce._mm_into(out, a, b, accumulate)
        return out

    gm = make_fx(body, decomposition_table=select_decomp_table(), tracing_mode="fake")(
        start, a, b)
    assert "fastlab.mm_into" in gm.code, gm.code
    want = a.double() @ b.double() + (start.double() if accumulate else 0.0)
    got = body(start, a, b)
    assert got.dtype == out_dtype
    assert_close(got, want, out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_under_autocast_with_several_chunks(hidden_dtype):
    """torch.compile of the fused op under bf16 autocast with several chunks (the weight
    gradient accumulated across them in fp32, the hidden gradient written in fp32 for fp32
    hidden): Inductor traces the triton_op's body; same values as the eager call."""
    torch._dynamo.reset()
    hidden, weight, _, target = _inputs(1031, 256, 8191, hidden_dtype, False, seed=21,
                                        ignore_every=5, device="cuda")
    weight = weight.detach().float().requires_grad_()

    def loss_fn(h, w):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fused_linear_cross_entropy(h, w, target, chunk_size=256)

    want = loss_fn(hidden, weight)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got = torch.compile(loss_fn, fullgraph=True)(hidden, weight)
    grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, want_grads):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
