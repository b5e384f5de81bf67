"""fastlab.ops.swiglu against ``F.silu(gate) * up`` evaluated in float64.

Both paths (the Triton kernel under the interpreter, forced with backend("kernel"), and the
reference) on odd sizes and non-contiguous inputs. Tolerances against float64: fp32 rtol
1e-5, atol 1e-6 of the largest value; bf16 rtol 1e-2 and atol 4e-3 of the largest value
(the kernel rounds once to bf16; the reference path, F.silu in bf16 then the product,
rounds twice).
"""
import pytest
import torch

from fastlab.ops import backend, swiglu, swiglu_ref
from fastlab.testing import assert_close_to_max

TOLS = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 4e-3)}


pytestmark = pytest.mark.usefixtures("interpreter_only")


def _close(got, want, dtype, what):
    assert_close_to_max(got, want, *TOLS[dtype], what)


def _run(fn, gate, up):
    gate = gate.detach().clone().requires_grad_()
    up = up.detach().clone().requires_grad_()
    y = fn(gate, up)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(g.to(y.device, y.dtype))
    return y.detach(), gate.grad, up.grad


def _check_once(path, gate, up):
    with backend(path):
        y, dgate, dup = _run(swiglu, gate, up)
    want = _run(swiglu_ref, gate.double(), up.double())
    assert y.dtype == torch.promote_types(gate.dtype, up.dtype)
    assert dgate.dtype == gate.dtype and dup.dtype == up.dtype
    dtype = torch.bfloat16 if torch.bfloat16 in (gate.dtype, up.dtype) else torch.float32
    for name, got, exact in zip(("y", "dgate", "dup"), (y, dgate, dup), want):
        _close(got, exact, dtype, name)


@pytest.mark.parametrize("shape", [(3, 5, 37), (1029,), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_matches_float64(path, dtype, shape):
    gate = (torch.randn(shape) * 4).to(dtype)  # into both tails of the sigmoid
    _check_once(path, gate, torch.randn(shape).to(dtype))


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_non_contiguous_inputs(path):
    both = torch.randn(4, 7, 2 * 19)
    _check_once(path, both[..., :19], both[..., 19:])       # halves of one projection
    _check_once(path, torch.randn(19, 6).T, torch.randn(6, 19))


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_under_bf16_autocast(path):
    """LlamaMLP under autocast: bf16 projections in, bf16 out, as F.silu(gate) * up."""
    x = torch.randn(2, 5, 24)
    gate_proj, up_proj = torch.nn.Linear(24, 33), torch.nn.Linear(24, 33)
    with torch.autocast("cpu", dtype=torch.bfloat16), backend(path):
        gate, up = gate_proj(x), up_proj(x)
        y = swiglu(gate, up)
        hf = torch.nn.functional.silu(gate) * up
    assert y.dtype == hf.dtype == torch.bfloat16
    torch.testing.assert_close(y, hf, rtol=1e-2, atol=1e-2 * hf.abs().max().item())
    _check_once(path, gate.detach(), up.detach())


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, -x
def test_extreme_gates():
    gate = torch.tensor([-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, float("nan")])
    for path in ("kernel", "reference"):
        with backend(path):
            y = swiglu(gate, torch.ones(7))
        torch.testing.assert_close(y[:-1], torch.nn.functional.silu(gate[:-1]), rtol=1e-6,
                                   atol=1e-30)
        assert y[-1].isnan()


def test_validation_errors_are_clear():
    for fn in (swiglu, swiglu_ref):
        with pytest.raises(ValueError, match="same shape"):
            fn(torch.randn(3, 4), torch.randn(3, 5))
        with pytest.raises(ValueError, match="up must be floating point"):
            fn(torch.randn(3), torch.ones(3, dtype=torch.long))
        with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
            fn(1.0, torch.randn(3))


def test_compiles_without_graph_breaks():
    gate = torch.randn(3, 11, requires_grad=True)
    up = torch.randn(3, 11, requires_grad=True)
    compiled = torch.compile(lambda a, b: swiglu(a, b).square().sum(), backend="aot_eager",
                             fullgraph=True)
    got = torch.autograd.grad(compiled(gate, up), (gate, up))
    want = torch.autograd.grad(swiglu_ref(gate, up).square().sum(), (gate, up))
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_opcheck():
    from fastlab.ops.swiglu import _swiglu_fwd

    torch.library.opcheck(_swiglu_fwd.op, (torch.randn(4, 9, requires_grad=True),
                                        torch.randn(4, 9, requires_grad=True)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_sizes_against_float64(dtype):
    gate, up = (torch.randn(4, 2048, 5504).to(dtype) * 3 for _ in range(2))
    y, dgate, dup = (t.cpu() for t in _run(swiglu, gate.cuda(), up.cuda()))
    want = _run(swiglu_ref, gate.double(), up.double())
    for name, got, exact in zip(("y", "dgate", "dup"), (y, dgate, dup), want):
        _close(got, exact, dtype, name)
