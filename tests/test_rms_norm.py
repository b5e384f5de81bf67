"""fastlab.ops.rms_norm against LlamaRMSNorm's formula evaluated in float64.

Both paths (the Triton kernel under the interpreter, forced with backend("kernel"), and the
reference) on odd hidden sizes, several leading dims and non-contiguous inputs. Tolerances
against float64: fp32 rtol 1e-5 and atol 1e-5 of the largest value (fp32 rounding of sums
over D); bf16 rtol 2e-2 and atol 1e-2 of the largest value (the normalised x is rounded to
bf16 before the weight, as LlamaRMSNorm does, and the result once more: two bf16 ulps).
"""
import pytest
import torch

from fastlab.ops import backend, rms_norm, rms_norm_ref
from fastlab.testing import assert_close_to_max

TOLS = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2)}
EPS = 1e-6


pytestmark = pytest.mark.usefixtures("interpreter_only")


def _close(got, want, dtype, what):
    assert_close_to_max(got, want, *TOLS[dtype], what)


def _run(fn, x, w):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, EPS)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def _check_once(path, shape, dtype, contiguous=True, weight_dtype=None):
    x = torch.randn(shape) * 3 + 0.5
    if not contiguous:  # every other row of a wider tensor: a row stride != D
        x = torch.randn(shape[0] * 2, *shape[1:])[::2] * 3
    x = x.to(dtype)
    w = (torch.rand(shape[-1]) + 0.5).to(weight_dtype or dtype)
    with backend(path):
        y, dx, dw = _run(rms_norm, x, w)
    want_y, want_dx, want_dw = _run(rms_norm_ref, x.double(), w.double())
    assert y.dtype == torch.promote_types(x.dtype, w.dtype) and y.shape == x.shape
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    _close(y, want_y, dtype, "y")
    _close(dx, want_dx, dtype, "dx")
    _close(dw, want_dw, dtype, "dweight")


@pytest.mark.parametrize("shape", [(5, 100), (2, 3, 33), (7, 4095), (1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_matches_float64(path, dtype, shape):
    _check_once(path, shape, dtype)


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_non_contiguous_input(path):
    _check_once(path, (6, 2, 37), torch.float32, contiguous=False)
    _check_once(path, (6, 37), torch.bfloat16, contiguous=False)


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_bf16_input_fp32_weight_under_autocast(path):
    """What a model under bf16 autocast with fp32 weights hands the norm when its input is
    bf16: the output is fp32 (promotion), as LlamaRMSNorm's."""
    x = torch.randn(4, 3, 50).to(torch.bfloat16)
    w = torch.rand(50) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16), backend(path):
        y, dx, dw = _run(rms_norm, x, w)
        hf_y = rms_norm_ref(x, w, EPS)
    assert y.dtype == hf_y.dtype == torch.float32 and dx.dtype == torch.bfloat16
    # n is rounded to bf16 as in LlamaRMSNorm; the product stays fp32: equal to the formula's
    torch.testing.assert_close(y, hf_y, rtol=1e-6, atol=1e-6)
    want_y, want_dx, want_dw = _run(rms_norm_ref, x.double(), w.double())
    _close(y, want_y, torch.bfloat16, "y")
    _close(dx, want_dx, torch.bfloat16, "dx")
    _close(dw, want_dw, torch.bfloat16, "dweight")


def test_kernel_rounds_like_the_module_in_bf16():
    """Both bf16: the kernel's value is LlamaRMSNorm's, at most one bf16 ulp apart."""
    x = torch.randn(9, 77).to(torch.bfloat16)
    w = (torch.rand(77) + 0.5).to(torch.bfloat16)
    with backend("kernel"):
        y = rms_norm(x, w, EPS)
    torch.testing.assert_close(y, rms_norm_ref(x, w, EPS), rtol=8e-3, atol=0)


def test_nan_propagates():
    x = torch.randn(3, 10)
    x[1, 4] = float("nan")
    for path in ("kernel", "reference"):
        with backend(path):
            y = rms_norm(x, torch.ones(10), EPS)
        assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


def test_validation_errors_are_clear():
    x = torch.randn(3, 8)
    for fn in (rms_norm, rms_norm_ref):
        with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
            fn(x, torch.ones(7), EPS)
        with pytest.raises(ValueError, match="eps must be a non-negative float"):
            fn(x, torch.ones(8), -1.0)
        with pytest.raises(ValueError, match="floating point"):
            fn(x.long(), torch.ones(8), EPS)
        with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
            fn(x, [1.0] * 8, EPS)
        with pytest.raises(ValueError, match="non-empty last dimension"):
            fn(torch.randn(3, 0), torch.ones(0), EPS)


def test_compiles_without_graph_breaks():
    x = torch.randn(2, 5, 24, requires_grad=True)
    w = (torch.rand(24) + 0.5).requires_grad_()
    compiled = torch.compile(lambda a, b: rms_norm(a, b, EPS).square().sum(),
                             backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, w), (x, w))
    want = torch.autograd.grad(rms_norm_ref(x, w, EPS).square().sum(), (x, w))
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_opcheck():
    from fastlab.ops.rms_norm import _rms_norm_fwd

    x = torch.randn(3, 2, 12, requires_grad=True)
    w = (torch.rand(12) + 0.5).requires_grad_()
    torch.library.opcheck(_rms_norm_fwd.op, (x, w, EPS))


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype, weight_dtype", [((4096, 2048), torch.bfloat16, None),
                                                        ((3, 1000, 4095), torch.bfloat16,
                                                         torch.float32),
                                                        ((2048, 4096), torch.float32, None)])
def test_gpu_real_sizes_against_float64(shape, dtype, weight_dtype):
    x = (torch.randn(shape) * 3 + 0.5).to(dtype)
    w = (torch.rand(shape[-1]) + 0.5).to(weight_dtype or dtype)
    y, dx, dw = (t.cpu() for t in _run(rms_norm, x.cuda(), w.cuda()))
    want_y, want_dx, want_dw = _run(rms_norm_ref, x.double(), w.double())
    _close(y, want_y, dtype, "y")
    _close(dx, want_dx, dtype, "dx")
    _close(dw, want_dw, dtype, "dweight")
