"""fastlab.ops.cross_entropy: the Triton kernel (interpreted on CPU) and the reference,
against float64 torch where torch is accurate and against exact math where it is not."""
import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

from fastlab.kernels.cross_entropy import cross_entropy_forward
from fastlab.nn.cross_entropy import CrossEntropyLoss
from fastlab.ops._dispatch import backend, interpreting
from fastlab.ops.cross_entropy import cross_entropy, cross_entropy_ref
from fastlab.testing import assert_close, non_contiguous, randn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["kernel", "reference"]
#: Largest relative error of a gradient entry rounded once to each dtype (half an ulp),
#: doubled for the float32 computation that precedes the rounding. Triton's interpreter
#: truncates float32 -> bfloat16 instead of rounding, so a whole ulp there.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2**-11,
             torch.bfloat16: 2**-7 if interpreting() else 2**-8}
#: Below fp16's normal range the rounded gradient keeps an absolute error of half the
#: smallest subnormal (2**-25); e.g. exp(-20) rounds to 0 there. The interpreter truncates
#: fp16 subnormals too: a whole one there.
GRAD_ATOL = {torch.float32: 0.0, torch.bfloat16: 0.0,
             torch.float16: 2**-24 if interpreting() else 2**-25}


def _targets(n, V, seed, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, V, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return t.to(DEVICE)


def _torch_loss(x64, t, ignore_index, label_smoothing, reduction, z_loss):
    """F.cross_entropy in float64 (accurate for these moderate logits) + the z-loss term."""
    V = x64.shape[-1]
    rows = F.cross_entropy(x64.reshape(-1, V), t.reshape(-1), ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction="none")
    valid = t.reshape(-1) != ignore_index
    rows = rows + z_loss * torch.logsumexp(x64.reshape(-1, V), -1) ** 2 * valid
    if reduction == "none":
        return rows.reshape(t.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp(min=1)


def _check_once(shape, dtype, bk, *, ignore_every=0, label_smoothing=0.0, z_loss=0.0,
                reduction="mean", strided=False, seed=0):
    V = shape[-1]
    x = randn(shape, dtype, DEVICE, seed=seed, scale=3.0)
    if strided:
        x = non_contiguous(x)
    x.requires_grad_(True)
    t = _targets(math.prod(shape[:-1]), V, seed, ignore_every).reshape(shape[:-1])
    x64 = x.detach().double().requires_grad_(True)
    expected = _torch_loss(x64, t, -100, label_smoothing, reduction, z_loss)
    weights = randn(expected.shape, torch.float64, DEVICE, seed=seed + 1)
    (g64,) = torch.autograd.grad((expected * weights).sum(), x64)
    with backend(bk):
        loss = cross_entropy(x, t, label_smoothing=label_smoothing, z_loss=z_loss,
                             reduction=reduction)
        (g,) = torch.autograd.grad((loss * weights.float()).sum(), x)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    assert_close(loss, expected, torch.float32, scale=2.0)
    assert_close(g, g64, dtype)


@pytest.mark.parametrize("bk", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    dict(shape=(37, 1003)),
    dict(shape=(3, 7, 129), ignore_every=4, reduction="sum", strided=True),
    dict(shape=(37, 1003), ignore_every=3, label_smoothing=0.1),
    dict(shape=(53, 257), ignore_every=5, z_loss=1e-3, reduction="none"),
    dict(shape=(37, 1003), label_smoothing=0.05, z_loss=1e-2, strided=True),
], ids=["plain", "3d-sum-strided", "smoothing", "zloss-none", "all-options-strided"])
def test_matches_float64_torch(case, dtype, bk):
    _check_once(dtype=dtype, bk=bk, **case)


def _check_autocast_once(amp_dtype, bk, device, reduction, shape=(37, 24, 203),
                         loss_scale=1.0, **options):
    """cross_entropy of an fp32 linear layer's logits under torch.autocast (logits in the
    autocast dtype) against F.cross_entropy under the same autocast: the loss in float32
    from the same logits, the gradient reaching the fp32 parameters through them.
    ``loss_scale`` multiplies both losses before the backward, as a GradScaler does."""
    N, H, V = shape
    h = randn((N, H), torch.float32, device, seed=N, requires_grad=True)
    w = randn((V, H), torch.float32, device, seed=V, scale=3 * H ** -0.5, requires_grad=True)
    t = _targets(N, V, N + V, ignore_every=4).to(device)
    weights = randn((N,), torch.float32, device, seed=1) if reduction == "none" else 1.0
    weights = weights * loss_scale
    with torch.autocast(device, dtype=amp_dtype):
        logits = F.linear(h, w)
        # the exact loss of the autocast logits (torch's own CUDA cross-entropy under
        # autocast is 3.8e-3 off for bf16 logits, measured on the H200): float64 math, its
        # gradient rounded to the logits' dtype on the way back through the cast
        want = F.cross_entropy(logits.double(), t, reduction=reduction, **options).float()
        want_grads = torch.autograd.grad((want * weights).sum(), (h, w))
        with backend(bk):
            loss = cross_entropy(F.linear(h, w), t, reduction=reduction, **options)
            grads = torch.autograd.grad((loss * weights).sum(), (h, w))
    assert logits.dtype == amp_dtype and loss.dtype == want.dtype == torch.float32
    assert_close(loss, want, torch.float32, scale=2.0)
    for got, expected in zip(grads, want_grads):
        assert got.dtype == torch.float32
        assert_close(got / loss_scale, expected / loss_scale, amp_dtype)


@pytest.mark.parametrize("bk", BACKENDS)
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction, options", [
    ("mean", {}), ("sum", dict(label_smoothing=0.1)), ("none", {})])
def test_autocast_logits_match_torch(reduction, options, amp_dtype, bk):
    _check_autocast_once(amp_dtype, bk, "cpu", reduction, **options)


@pytest.mark.parametrize("bk", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float16_gradient_survives_a_loss_scale(reduction, inplace, bk):
    """fp16 + GradScaler: the loss is multiplied by a large scale before backward. The
    gradient must be that of the scaled loss, rounded once to fp16 (p_j / n_valid of a wide
    vocabulary is below fp16's range: rounded before the scale, most of it would be 0)."""
    N, V = 37, 4099
    x = randn((N, V), torch.float16, DEVICE, seed=19, scale=3.0, requires_grad=True)
    t = _targets(N, V, 19, ignore_every=6)
    scale = 2.0 ** 10 if reduction == "sum" else 2.0 ** 16  # the sum's entries reach 1
    weights = scale * (torch.rand(N, device=DEVICE, dtype=torch.float64) + 0.5) / N \
        if reduction == "none" else scale
    x64 = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(
        (_torch_loss(x64, t, -100, 0.1, reduction, 1e-3) * weights).sum(), x64)
    with backend(bk):
        logits = x * 1.0 if inplace else x
        loss = cross_entropy(logits, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                             inplace_backward=inplace)
        (g,) = torch.autograd.grad((loss * weights).sum(), x)
    assert g.dtype == torch.float16
    err = (g.double() - want).abs()
    bound = GRAD_RTOL[torch.float16] * want.abs() + GRAD_ATOL[torch.float16]
    assert bool((err <= bound).all()), float((err / bound).max())


def _exact(row, y):
    """Loss and gradient of one row in 60-digit arithmetic."""
    with mpmath.workdps(60):
        z = [mpmath.mpf(float(v)) for v in row]
        t = mpmath.fsum(mpmath.exp(v - z[y]) for j, v in enumerate(z) if j != y)
        lse = z[y] + mpmath.log1p(t)
        grad = [mpmath.exp(v - lse) for v in z]
        grad[y] = -t / (1 + t)
        return float(mpmath.log1p(t)), [float(g) for g in grad]


@pytest.mark.parametrize("bk", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [0, 5, 20, 40, 80])
def test_confident_target_matches_exact_math(margin, dtype, bk):
    V = 53
    x = randn((3, V), torch.float32, DEVICE, seed=margin).clamp(-1, 1)
    t = torch.tensor([0, 17, V - 1], device=DEVICE)
    x[torch.arange(3), t] = margin + x[torch.arange(3), t]
    x = x.to(dtype).requires_grad_(True)
    with backend(bk):
        loss = cross_entropy(x, t, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), x)
    for i in range(3):
        want_loss, want_grad = _exact(x[i].detach().cpu(), int(t[i]))
        want_grad = torch.tensor(want_grad, dtype=torch.float64)
        assert want_loss > 0
        assert abs(float(loss[i].detach()) - want_loss) <= 1e-5 * want_loss, (i, float(loss[i]))
        err = (g[i].double().cpu() - want_grad).abs()
        bound = GRAD_RTOL[dtype] * want_grad.abs() + GRAD_ATOL[dtype]
        assert bool((err <= bound).all()), (i, float((err / bound).max()))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_v, programs", [(128, None), (128, 4), (None, 3)])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, z_loss=1e-3)])
def test_streaming_blocks_match_reference(options, dtype, inplace, block_v, programs):
    """Rows longer than one block take the two-sweep path; force it with small blocks.
    With fewer programs than rows, each program strides over several rows."""
    N, V = 21, 1003
    x = randn((N, V), dtype, DEVICE, seed=3, scale=4.0)
    t = _targets(N, V, 3, ignore_every=5)
    x[1, t[1]] += 40  # a confident row, where the compensated sum matters
    scale = torch.rand(N, device=DEVICE) + 0.5
    ls, zl = options.get("label_smoothing", 0.0), options.get("z_loss", 0.0)
    with backend("reference"):
        want = cross_entropy_ref(x, t, reduction="none", label_smoothing=ls, z_loss=zl)
    x64 = x.double().requires_grad_(True)
    (gwant,) = torch.autograd.grad(
        (cross_entropy_ref(x64, t, reduction="none", label_smoothing=ls, z_loss=zl)
         * scale.double()).sum(), x64)
    buf = x.clone() if inplace else None
    grad = buf if inplace else torch.empty_like(x)
    config = dict(block_v=block_v, single=False) if block_v else {}
    if programs:
        config["programs"] = programs
    loss, _ = cross_entropy_forward(buf if inplace else x, t, grad, scale, -100, ls, zl,
                                    config=config)
    assert_close(loss, want, torch.float32)
    assert_close(grad, gwant, dtype)


@pytest.mark.parametrize("candidate", ["lanes", "lanes-l2", "lanes-l2x2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, z_loss=1e-3)],
                         ids=["plain", "smoothing-zloss"])
def test_launch_candidates_match_float64(options, dtype, candidate):
    """Each launch candidate through the op, on rows long enough to stream (40 and 20 KiB),
    against float64: odd V, ignored rows, targets at either end and at a block edge, a
    target dominating by 40 (its loss to 1e-5 relative, where the per-lane sums and their
    compensation decide it), a row whose max lies in the last block. On CPU the grids of
    the persistent candidates are 1 and 2 programs, striding over every row."""
    from fastlab.kernels.cross_entropy import CANDIDATES, launch_candidate

    assert candidate in CANDIDATES
    N, V = 7, 10007
    x = randn((N, V), dtype, DEVICE, seed=5, scale=3.0)
    t = _targets(N, V, 5, ignore_every=4)
    t[1], t[2], t[3] = 0, V - 1, 4096
    x[1, 0] += 40
    x[5, V - 3] += 12
    x = x.requires_grad_(True)
    ls, zl = options.get("label_smoothing", 0.0), options.get("z_loss", 0.0)
    w = torch.rand(N, device=DEVICE, dtype=torch.float64) + 0.5
    x64 = x.detach().double().requires_grad_(True)
    want = cross_entropy_ref(x64, t, reduction="none", label_smoothing=ls, z_loss=zl)
    (gwant,) = torch.autograd.grad((want * w).sum(), x64)
    with backend("kernel"), launch_candidate(candidate):
        loss = cross_entropy(x, t, reduction="none", label_smoothing=ls, z_loss=zl)
        (g,) = torch.autograd.grad((loss * w.float()).sum(), x)
    assert_close(loss, want, torch.float32)
    assert abs(float(loss[1].detach()) - float(want[1])) <= 1e-5 * float(want[1])
    assert_close(g, gwant, dtype)


def test_launch_candidate_names_are_checked_and_restored():
    from fastlab.kernels import cross_entropy as K

    with pytest.raises(ValueError, match="candidate must be one of"):
        with K.launch_candidate("fastest"):
            pass
    with K.launch_candidate("lanes"):
        assert K._candidate == "lanes"
        with K.launch_candidate(None):
            assert K._candidate is None
        assert K._candidate == "lanes"
    assert K._candidate is None
    # rows that fit one block keep the single-block launch under any candidate
    assert K.launch_config(1000, 2, 8, "lanes-l2")["single"]
    cfg = K.launch_config(128256, 2, 16384, "lanes-l2", torch.device("cpu"))
    assert cfg == dict(block_v=8192, single=False, warps=32, programs=1, lanes=True,
                       unroll=2, fast_exp=True)
    # the hardware exp2 serves 16-bit logits only; float32 keeps the accurate exp
    assert not K.launch_config(128256, 4, 16384)["fast_exp"]
    assert K.launch_config(1000, 2, 8)["fast_exp"]


@pytest.mark.parametrize("V", [300, 20000], ids=["single-block", "streaming"])
def test_fast_and_accurate_exp_agree_on_bf16(V):
    """Both exp paths of the kernel on the same bf16 rows: the losses against float64, the
    gradients within one bf16 rounding of each other."""
    from fastlab.kernels import cross_entropy as K

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, V, generator=g) * 4).to(torch.bfloat16)
    t = torch.randint(0, V, (5,), generator=g)
    t[2] = -100
    scale = torch.tensor(0.25)
    xd = x.double()
    want = torch.logsumexp(xd, 1) - xd.gather(1, t.clamp(min=0)[:, None])[:, 0]
    want[2] = 0.0
    grads = []
    for fast in (True, False):
        grad = torch.empty_like(x)
        loss, _ = K.cross_entropy_forward(x, t, grad, scale, -100, 0.0, 0.0,
                                          config=dict(fast_exp=fast))
        torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
        grads.append(grad.float())
    torch.testing.assert_close(grads[0], grads[1], rtol=2 ** -7, atol=1e-9)


@pytest.mark.parametrize("mean", [True, False])
def test_count_valid_counts_the_targets(mean):
    from fastlab.kernels.cross_entropy import _COUNT_BLOCK, count_valid

    n = _COUNT_BLOCK + 77  # more than one step of the counting loop (a few seconds here)
    t = _targets(n, 50, 7, ignore_every=3)
    with backend("kernel"):
        factor, n_valid = count_valid(t, -100, mean)
        all_ignored = count_valid(torch.full_like(t, -100), -100, mean)
    valid = int((t != -100).sum())
    assert n_valid.item() == valid
    assert factor.item() == ((torch.tensor(1.0) / valid).item() if mean else 1.0)
    assert all_ignored[1].item() == 1.0  # an all-ignored mean divides by 1: loss 0, not NaN


@pytest.mark.parametrize("bk", BACKENDS)
def test_none_reduction_scales_each_row_by_its_own_grad(bk):
    x = randn((7, 33), torch.float32, DEVICE, seed=5, requires_grad=True)
    t = _targets(7, 33, 5)
    w = torch.arange(1.0, 8.0, device=DEVICE)
    with backend(bk):
        (g,) = torch.autograd.grad((cross_entropy(x, t, reduction="none") * w).sum(), x)
        (g1,) = torch.autograd.grad(cross_entropy(x, t, reduction="none").sum(), x)
    assert_close(g, g1 * w[:, None], torch.float32)


@pytest.mark.parametrize("bk", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grad(reduction, bk):
    x = randn((5, 11), torch.bfloat16, DEVICE, seed=6, requires_grad=True)
    t = torch.full((5,), -100, device=DEVICE)
    with backend(bk):
        loss = cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
        (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.all(loss == 0) and torch.all(g == 0)


@pytest.mark.parametrize("bk", BACKENDS)
def test_z_loss_is_added_and_reported(bk):
    x = randn((9, 40), torch.float32, DEVICE, seed=7)
    t = _targets(9, 40, 7, ignore_every=4)
    lse2 = torch.logsumexp(x.double(), -1) ** 2
    valid = t != -100
    with backend(bk):
        base, z0 = cross_entropy(x, t, return_z_loss=True)
        loss, z = cross_entropy(x, t, z_loss=1e-2, return_z_loss=True)
    assert float(z0) == 0.0
    want_z = 1e-2 * (lse2 * valid).sum() / valid.sum()
    assert_close(z, want_z, torch.float32)
    assert_close(loss, base.double() + want_z, torch.float32)


@pytest.mark.parametrize("bk", BACKENDS)
def test_inplace_backward_writes_grad_over_logits(bk):
    h = randn((13, 8), torch.float32, DEVICE, seed=8, requires_grad=True)
    w = randn((8, 71), torch.float32, DEVICE, seed=9)
    t = _targets(13, 71, 8, ignore_every=3)
    with backend(bk):
        (want,) = torch.autograd.grad(cross_entropy(h @ w, t), h)
        logits = h @ w
        (got,) = torch.autograd.grad(cross_entropy(logits, t, inplace_backward=True), h)
        x = (h @ w).detach().requires_grad_(True)
        (gx,) = torch.autograd.grad(cross_entropy(x, t), x)
    assert_close(got, want, torch.float32)
    assert_close(logits.detach(), gx, torch.float32)


@pytest.mark.parametrize("bk", BACKENDS)
def test_nan_and_inf_propagate(bk):
    x = randn((4, 19), torch.float32, DEVICE, seed=10)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3, 7] = float("-inf")  # a masked class is fine
    t = torch.tensor([0, 1, 2, 3], device=DEVICE)
    with backend(bk):
        loss = cross_entropy(x, t, reduction="none")
    assert torch.isfinite(loss[[0, 3]]).all()
    assert torch.isnan(loss[1]) and not torch.isfinite(loss[2])


def test_gradcheck_float64():
    """gradcheck the reference's autograd; the op's written-out gradient (float64 runs the
    reference path) must equal it. gradcheck cannot run the op itself: it calls backward
    twice on one graph, which the op refuses (see the next test)."""
    x = randn((5, 7), torch.float64, "cpu", seed=11, requires_grad=True)
    t = torch.tensor([0, 6, -100, 3, 2])
    x[1, 6].data += 50
    options = dict(label_smoothing=0.1, z_loss=1e-2)
    assert torch.autograd.gradcheck(lambda v: cross_entropy_ref(v, t, **options), (x,))
    for reduction in ("mean", "none"):
        w = torch.rand(5, dtype=torch.float64) if reduction == "none" else 1.0
        (want,) = torch.autograd.grad(
            (cross_entropy_ref(x, t, reduction=reduction, **options) * w).sum(), x)
        (got,) = torch.autograd.grad(
            (cross_entropy(x, t, reduction=reduction, **options) * w).sum(), x)
        assert_close(got, want, torch.float64)


def test_second_backward_through_one_graph_raises():
    x = randn((3, 5), torch.float32, "cpu", seed=18, requires_grad=True)
    loss = cross_entropy(x, torch.tensor([0, 1, 2]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_equals_eager_with_ignored_targets(dtype):
    """bf16 writes the gradient in the forward, fp16 in the backward: both trace."""
    x = randn((12, 37), dtype, DEVICE, seed=12)
    t = _targets(12, 37, 12, ignore_every=3)

    def step(v):
        return cross_entropy(v, t, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True)
    with backend("kernel"):
        results = []
        for fn in (step, compiled):
            v = x.clone().requires_grad_(True)
            loss = fn(v)
            (g,) = torch.autograd.grad(loss, v)
            results.append((loss, g))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_opcheck():
    x = randn((6, 17), torch.float32, DEVICE, seed=13)
    t = _targets(6, 17, 13, ignore_every=4)
    args = (-100, 0.1, 1e-3, "mean", False)
    forward = torch.ops.fastlab.cross_entropy_forward.default
    torch.library.opcheck(forward, (x, t, None, *args))
    torch.library.opcheck(forward, (x, t, torch.empty_like(x), *args))
    torch.library.opcheck(torch.ops.fastlab.scale_grad.default,
                          (torch.randn(6, 17, device=DEVICE), torch.rand(6, device=DEVICE)))
    half = x.half()
    for reduction, factor in (("mean", torch.tensor(3.0)), ("none", torch.rand(6))):
        options = (-100, 0.1, 1e-3, reduction)
        torch.library.opcheck(torch.ops.fastlab.cross_entropy_backward.default,
                              (half, t, torch.empty_like(half), factor.to(DEVICE), *options))


def test_module_matches_functional_and_takes_torch_arguments():
    x = randn((2, 5, 31), torch.float32, DEVICE, seed=14)
    t = _targets(10, 31, 14, ignore_every=3).reshape(2, 5)
    module = CrossEntropyLoss(ignore_index=-100, reduction="sum", label_smoothing=0.1)
    assert_close(module(x, t), cross_entropy(x, t, reduction="sum", label_smoothing=0.1))
    legacy = CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"


@pytest.mark.parametrize("bk", BACKENDS)
def test_bad_target_values(bk):
    x = randn((4, 9), torch.float32, DEVICE, seed=15)
    with backend(bk):
        with pytest.raises(ValueError, match=r"target holds class index 9, outside \[0, 9\)"):
            cross_entropy(x, torch.tensor([0, 9, 1, 2], device=DEVICE), check_targets=True)
        with pytest.raises(ValueError, match="target holds class index -3"):
            cross_entropy(x, torch.tensor([0, -3, 1, 2], device=DEVICE), check_targets=True)
        # unchecked: the bad row poisons the loss instead of reading out of bounds
        bad = torch.tensor([0, 9, 1, -100], device=DEVICE)
        rows = cross_entropy(x, bad, reduction="none", check_targets=False)
        # the reported z-loss is poisoned as well, for every reduction, also at z_loss=0
        reduced = [cross_entropy(x, bad, reduction=r, check_targets=False, return_z_loss=True)
                   for r in ("mean", "sum")]
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all() and rows[3] == 0
    for loss, zl in reduced:
        assert torch.isnan(loss) and torch.isnan(zl)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, t: cross_entropy(x, t.float()), TypeError, "target must hold class indices"),
    (lambda x, t: cross_entropy(x.long(), t), TypeError, "logits must be a float32"),
    (lambda x, t: cross_entropy(x, t[:2]), ValueError, r"target must have shape \(4,\)"),
    (lambda x, t: cross_entropy(x[:, :0], t), ValueError, "V >= 1"),
    (lambda x, t: cross_entropy(x, t.to("meta")), ValueError, "same device"),
    (lambda x, t: cross_entropy(x, t, reduction="avg"), ValueError, "reduction must be"),
    (lambda x, t: cross_entropy(x, t, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda x, t: cross_entropy(x, t, z_loss=-1.0), ValueError, "z_loss must be"),
    (lambda x, t: cross_entropy(x, t, ignore_index=0.5), TypeError, "ignore_index must be"),
    (lambda x, t: CrossEntropyLoss(weight=torch.ones(9)), ValueError, "weight"),
    (lambda x, t: cross_entropy(x, t + 9, check_targets=True), ValueError,
     r"outside \[0, 9\)"),
], ids=["float-target", "int-logits", "shape", "no-classes", "device", "reduction",
        "smoothing", "z-loss", "ignore-index", "class-weight", "target-range"])
@pytest.mark.parametrize("bk", ["auto"] + BACKENDS)
def test_bad_arguments(call, error, match, bk):
    """The same error whichever path would run (the default one, the kernel, the
    reference): the checks come before the choice."""
    x = randn((4, 9), torch.float32, DEVICE, seed=16)
    t = torch.tensor([0, 1, 2, 3], device=DEVICE)
    with backend(bk), pytest.raises(error, match=match):
        call(x, t)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("V", [32768, 128256])
def test_real_size_matches_float64(V, reduction):
    x = randn((512, V), torch.bfloat16, "cuda", seed=17, scale=4.0, requires_grad=True)
    t = _targets(512, V, 17, ignore_every=7)
    x[3, t[3]].data += 60
    loss = cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-4)
    w = randn(loss.shape, torch.float32, "cuda", seed=18)
    (g,) = torch.autograd.grad((loss * w).sum(), x)
    x64 = x.detach().double().requires_grad_(True)
    want = cross_entropy_ref(x64, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-4)
    (gwant,) = torch.autograd.grad((want * w.double()).sum(), x64)
    assert_close(loss, want, torch.float32, scale=2.0)
    assert_close(g, gwant, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("candidate", ["lanes", "lanes-l2", "lanes-l2x2"])
@pytest.mark.parametrize("V", [32768, 128256])
def test_real_size_launch_candidates_match_float64(V, candidate):
    """Each launch candidate on the GPU at the bench's vocabularies (the persistent grids
    stride over 2048 rows) against float64."""
    from fastlab.kernels.cross_entropy import launch_candidate

    x = randn((2048, V), torch.bfloat16, "cuda", seed=19, scale=4.0, requires_grad=True)
    t = _targets(2048, V, 19, ignore_every=7)
    x[3, t[3]].data += 60
    with launch_candidate(candidate):
        loss = cross_entropy(x, t, reduction="none", label_smoothing=0.1, z_loss=1e-4)
        w = randn(loss.shape, torch.float32, "cuda", seed=20)
        (g,) = torch.autograd.grad((loss * w).sum(), x)
    x64 = x.detach().double().requires_grad_(True)
    want = cross_entropy_ref(x64, t, reduction="none", label_smoothing=0.1, z_loss=1e-4)
    (gwant,) = torch.autograd.grad((want * w.double()).sum(), x64)
    assert_close(loss, want, torch.float32, scale=2.0)
    assert abs(float(loss[3].detach()) - float(want[3])) <= 1e-5 * float(want[3])
    assert_close(g, gwant, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_autocast_logits_match_torch(reduction, amp_dtype):
    _check_autocast_once(amp_dtype, "auto", "cuda", reduction, shape=(1031, 256, 32768),
                         loss_scale=2.0 ** 16, label_smoothing=0.1)


def test_eager_calls_skip_the_custom_op_dispatcher(monkeypatch):
    import importlib

    mod = importlib.import_module("fastlab.ops.cross_entropy")

    def refuse(*args, **kwargs):
        raise AssertionError("eager call went through the torch.library dispatcher")

    for op in (mod._forward, mod._backward, mod._scale_grad):
        monkeypatch.setattr(op, "op", refuse)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 6, 2])
    (g,) = torch.autograd.grad(mod.cross_entropy(x, t), x)
    x2 = x.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x2, t), x2)
    torch.testing.assert_close(g, want)
    with torch.no_grad():
        mod.cross_entropy(x, t)
