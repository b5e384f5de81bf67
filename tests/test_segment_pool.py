"""Segment pooling (fastlab._C) against the plain-PyTorch references.

CPU runs the C++ kernels; the `gpu` tests run the CUDA kernels at real sizes. Inputs are
fresh random ragged batches with empty units at the start, middle and end.
"""
import sys

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fastlab
from fastlab import _ext
from fastlab._ext import extension_available
from fastlab.nn.pooling import HierarchicalPool
from fastlab.ops._dispatch import backend
from fastlab.ops.segment_pool import (
    REDUCTIONS,
    hierarchical_pool,
    lengths_from_offsets,
    offsets_from_lengths,
    offsets_from_mask,
    padded_to_ragged,
    ragged_to_padded,
    segment_broadcast,
    segment_broadcast_ref,
    segment_pool,
    segment_pool_ref,
    staged_kernel_tuning,
)
from fastlab.testing import assert_close, non_contiguous, randn

pytestmark = pytest.mark.skipif(not extension_available(),
                                reason="fastlab._C is not built (python setup.py build_ext)")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SELECTING = ("max", "min", "first", "last")


def _ops():
    return torch.ops.fastlab


def _sum_scale(dtype, rows):
    """Tolerance scale for a sum of up to `rows` rows: fp32 accumulation errors grow with the
    rows' magnitudes, not the result's (which may cancel); bf16/fp16 are dominated by the
    single rounding of the result."""
    return rows if dtype == torch.float32 else 1


def _offsets(units, max_len, seed, index_dtype=torch.int64, device="cpu"):
    """Random CSR offsets of `units` units of 0..max_len rows, first/middle/last empty."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (units,), generator=g)
    lengths[torch.tensor([0, units // 2, units - 1])] = 0
    return offsets_from_lengths(lengths).to(index_dtype).to(device)


def _layout(x, layout):
    """The same values as x, contiguous, column-strided, or row-strided (a column slice)."""
    if layout == "contiguous":
        return x
    if layout == "strided":
        return non_contiguous(x)
    wide = torch.empty(x.shape[0], x.shape[1] + 3, dtype=x.dtype, device=x.device)
    wide[:, 1:-2] = x.detach()
    return wide[:, 1:-2].requires_grad_(x.requires_grad)


def _check_pool_once(reduce, dtype, layout, index_dtype, features=37, units=41, max_len=9,
                     device="cpu", offsets=None):
    """One forward and backward against the float64 reference; `offsets` (given) replaces
    the random units (`units`, `max_len` then only set the tolerance)."""
    if offsets is None:
        offsets = _offsets(units, max_len, seed=units + features, index_dtype=index_dtype,
                           device=device)
    units = offsets.numel() - 1
    total = int(offsets[-1])
    x = _layout(randn((total, features), dtype, device, seed=1, requires_grad=True), layout)
    out = segment_pool(x, offsets, reduce)
    x64 = x.detach().double().requires_grad_()
    expected = segment_pool_ref(x64, offsets, reduce)
    scale = 0 if reduce in SELECTING else _sum_scale(dtype, max_len)
    assert out.dtype == dtype and out.shape == (units, features)
    assert_close(out, expected, scale=scale, msg=f"{reduce} forward")

    grad = randn(out.shape, dtype, device, seed=2)
    out.backward(grad)
    expected.backward(grad.double())
    assert_close(x.grad, x64.grad, scale=min(scale, 1), msg=f"{reduce} backward")


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "row_slice"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_pool_matches_reference(reduce, dtype, layout, index_dtype):
    _check_pool_once(reduce, dtype, layout, index_dtype)


@pytest.mark.parametrize("features", [1, 8, 64])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_pool_feature_widths(reduce, features):
    _check_pool_once(reduce, torch.float32, "contiguous", torch.int64, features=features)


def _check_broadcast_once(dtype, shift, with_base, layout, index_dtype, features=37, units=29,
                          max_len=7, device="cpu"):
    offsets = _offsets(units, max_len, seed=shift + 3, index_dtype=index_dtype, device=device)
    total = int(offsets[-1])
    y = _layout(randn((units, features), dtype, device, seed=4, requires_grad=True), layout)
    base = (_layout(randn((total, features), dtype, device, seed=5, requires_grad=True), layout)
            if with_base else None)
    out = segment_broadcast(y, offsets, total, shift=shift, base=base)
    y64 = y.detach().double().requires_grad_()
    base64 = base.detach().double().requires_grad_() if with_base else None
    expected = segment_broadcast_ref(y64, offsets, total, shift, base64)
    assert out.dtype == dtype and out.shape == (total, features)
    assert_close(out, expected, msg="broadcast forward")

    grad = randn(out.shape, dtype, device, seed=6)
    out.backward(grad)
    expected.backward(grad.double())
    assert_close(y.grad, y64.grad, scale=_sum_scale(dtype, max_len), msg="broadcast backward (y)")
    if with_base:
        assert_close(base.grad, base64.grad, msg="broadcast backward (base)")


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "row_slice"])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("shift", [0, 1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_matches_reference(dtype, shift, with_base, layout, index_dtype):
    _check_broadcast_once(dtype, shift, with_base, layout, index_dtype)


def _scatter_semantics(x, offsets, reduce):
    """Segment by segment in Python integers, as torch_scatter's segment_csr computes them:
    the sum wrapped to the input's width, the mean truncated toward zero (C division)."""
    bits = torch.iinfo(x.dtype).bits
    out = []
    for s in range(offsets.numel() - 1):
        rows = x[int(offsets[s]):int(offsets[s + 1])].tolist()
        column = []
        for values in zip(*rows) if rows else [[]] * x.shape[1]:
            if not values:
                column.append(0)
            elif reduce in ("sum", "mean"):
                total = sum(values)
                if reduce == "mean":
                    total = abs(total) // len(values) * (1 if total >= 0 else -1)
                column.append((total + 2 ** (bits - 1)) % 2 ** bits - 2 ** (bits - 1))
            else:
                column.append({"max": max, "min": min, "first": lambda v: v[0],
                               "last": lambda v: v[-1]}[reduce](values))
        out.append(column)
    return torch.tensor(out, dtype=x.dtype).reshape(-1, x.shape[1])


@pytest.mark.parametrize("bk", ["auto", "reference"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_integer_pool_matches_torch_scatter_semantics(reduce, dtype, layout, index_dtype, bk):
    offsets = _offsets(23, 6, seed=41, index_dtype=index_dtype)
    g = torch.Generator().manual_seed(42)
    x = torch.randint(-1000, 1000, (int(offsets[-1]), 5), generator=g).to(dtype)
    x = _layout(x, layout)
    with backend(bk):
        out = segment_pool(x, offsets, reduce)
    assert out.dtype == dtype and not out.requires_grad
    assert torch.equal(out, _scatter_semantics(x, offsets, reduce))


def test_integer_mean_truncates_and_sum_wraps():
    """torch_scatter's integer rules: -7/2 gives -3 (not floor's -4); an int32 sum past
    2**31 - 1 wraps around. Accumulated in 64 bits, the int32 mean stays exact there."""
    x = torch.tensor([[-7], [0], [7], [0], [5], [1], [1]], dtype=torch.int32)
    offsets = torch.tensor([0, 2, 4, 7, 7])
    big = torch.tensor([[2**31 - 1], [1], [2**31 - 1], [2**31 - 1]], dtype=torch.int32)
    big_offsets = torch.tensor([0, 2, 4])
    for bk in ("auto", "reference"):
        with backend(bk):
            assert segment_pool(x, offsets, "mean").flatten().tolist() == [-3, 3, 2, 0]
            assert segment_pool(x.long(), offsets, "mean").flatten().tolist() == [-3, 3, 2, 0]
            assert segment_pool(big, big_offsets, "sum").flatten().tolist() == [-2**31, -2]
            assert segment_pool(big, big_offsets, "mean").flatten().tolist() == [
                2**30, 2**31 - 1]
            levels = hierarchical_pool(x, [offsets, torch.tensor([0, 1, 4])], ["sum", "max"])
            assert levels[1].flatten().tolist() == [-7, 7]


@pytest.mark.parametrize("bk", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_integer_broadcast(dtype, bk):
    offsets = _offsets(13, 5, seed=43)
    total = int(offsets[-1])
    g = torch.Generator().manual_seed(44)
    y = torch.randint(-100, 100, (13, 4), generator=g).to(dtype)
    base = torch.randint(-100, 100, (total, 4), generator=g).to(dtype)
    base[0, 0] = torch.iinfo(dtype).max  # wraps around when its unit's value is positive
    unit = torch.repeat_interleave(torch.arange(13), lengths_from_offsets(offsets))
    source = torch.cat([torch.zeros(1, 4, dtype=dtype), y])[unit]  # shift=1: the unit before
    expected = (base.long() + source.long()).to(dtype)
    with backend(bk):
        out = segment_broadcast(y, offsets, total, shift=1, base=base)
        plain = segment_broadcast(y, offsets, total)
    assert out.dtype == dtype and torch.equal(out, expected)
    assert torch.equal(plain, y[unit])


def test_broadcast_is_the_inverse_of_pool():
    offsets = _offsets(17, 6, seed=7)
    y = randn((17, 11), torch.float64, seed=8)
    pooled = segment_pool(segment_broadcast(y, offsets), offsets, "mean")
    nonempty = lengths_from_offsets(offsets) > 0
    torch.testing.assert_close(pooled[nonempty], y[nonempty], rtol=1e-12, atol=1e-12)
    assert (pooled[~nonempty] == 0).all()


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_max_min_route_to_first_row_on_ties(reduce):
    offsets = _offsets(23, 8, seed=9)
    total = int(offsets[-1])
    # values in {0, 1, 2}: most columns of most units have ties
    x = torch.randint(0, 3, (total, 13), generator=torch.Generator().manual_seed(10)).float()
    x.requires_grad_()
    out, arg = _ops().segment_pool(x, offsets, reduce)
    out.backward(torch.ones_like(out))
    expected_grad = torch.zeros_like(x)
    columns = torch.arange(13)
    for s in range(23):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        if lo == hi:
            assert (arg[s] == total).all() and (out[s] == 0).all()
            continue
        best = x.detach()[lo:hi] == out.detach()[s]
        first = best.int().argmax(dim=0) + lo  # the first row reaching the extremum
        assert torch.equal(arg[s], first)
        expected_grad[first, columns] = 1
    assert torch.equal(x.grad, expected_grad)


def test_arg_only_when_a_backward_needs_it():
    offsets = _offsets(11, 5, seed=37)
    x = randn((int(offsets[-1]), 6), torch.float32, seed=38, requires_grad=True)
    with_arg, arg = _ops().segment_pool(x, offsets, "max")
    without_arg, no_arg = _ops().segment_pool(x, offsets, "max", False, False)
    assert arg.shape == (11, 6) and no_arg.shape == (0,)
    assert torch.equal(with_arg, without_arg)
    with pytest.raises(RuntimeError, match="max/min backward needs the arg rows"):
        without_arg.sum().backward()


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_nan_and_inf_propagate(reduce):
    offsets = torch.tensor([0, 3, 3, 7])
    x = randn((7, 4), torch.float32, seed=11)
    x[1, 0] = float("nan")
    x[4, 1] = float("inf")
    x[:, 2] = -float("inf")
    out = segment_pool(x, offsets, reduce)
    expected = segment_pool_ref(x.double(), offsets, reduce)
    torch.testing.assert_close(out.double(), expected, equal_nan=True, rtol=1e-6, atol=1e-6)
    if reduce not in ("first", "last"):
        assert out[0, 0].isnan()


def test_degenerate_shapes():
    for reduce in REDUCTIONS:
        none = segment_pool(torch.randn(0, 5), torch.zeros(1, dtype=torch.long), reduce)
        assert none.shape == (0, 5)
        all_empty = segment_pool(torch.randn(0, 5), torch.zeros(4, dtype=torch.long), reduce)
        assert all_empty.shape == (3, 5) and (all_empty == 0).all()
        no_features = segment_pool(torch.randn(6, 0), torch.tensor([0, 2, 6]), reduce)
        assert no_features.shape == (2, 0)
    assert segment_broadcast(torch.randn(3, 2), torch.zeros(4, dtype=torch.long)).shape == (0, 2)


def _check_backward_is_deterministic(n_units, width, device, seed):
    offsets = _offsets(n_units, 15, seed=seed, device=device)
    x = randn((int(offsets[-1]), width), torch.bfloat16, device, seed=seed + 1,
              requires_grad=True)
    grads = []
    for _ in range(2):
        x.grad = None
        for reduce in ("mean", "max"):
            segment_pool(x, offsets, reduce).float().square().sum().backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_backward_is_deterministic():
    _check_backward_is_deterministic(301, 67, "cpu", seed=12)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_gradcheck_float64(reduce):
    offsets = _offsets(7, 4, seed=14)
    x = randn((int(offsets[-1]), 3), torch.float64, seed=15, requires_grad=True)
    fn = lambda x: segment_pool(x, offsets, reduce)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("shift", [0, 1])
def test_broadcast_gradcheck_float64(shift):
    offsets = _offsets(6, 4, seed=16)
    total = int(offsets[-1])
    y = randn((6, 3), torch.float64, seed=17, requires_grad=True)
    base = randn((total, 3), torch.float64, seed=18, requires_grad=True)
    fn = lambda y, base: segment_broadcast(y, offsets, total, shift, base)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y, base))
    assert torch.autograd.gradgradcheck(fn, (y, base))


def test_mean_adjoint_gradcheck_float64():
    """The internal broadcast-with-mean (backward of mean) is itself twice differentiable."""
    offsets = _offsets(6, 4, seed=19)
    y = randn((6, 3), torch.float64, seed=20, requires_grad=True)
    total = int(offsets[-1])
    fn = lambda y: _ops().segment_broadcast(y, offsets, total, 1, None, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y,))
    assert torch.autograd.gradgradcheck(fn, (y,))


def _opcheck_cases():
    offsets = _offsets(9, 5, seed=21)
    total = int(offsets[-1])
    x = randn((total, 6), torch.float32, seed=22, requires_grad=True)
    y = randn((9, 6), torch.float32, seed=23, requires_grad=True)
    base = randn((total, 6), torch.float32, seed=24, requires_grad=True)
    arg = _ops().segment_pool(x.detach(), offsets, "max")[1]
    grad = randn((9, 6), torch.float32, seed=25, requires_grad=True)
    cases = [("segment_pool", (x, offsets, reduce)) for reduce in REDUCTIONS]
    cases += [("segment_pool", (x.detach().bfloat16(), offsets.int(), "mean")),
              ("segment_pool", (x.detach(), offsets, "min", False, False)),
              ("segment_pool", ((x.detach() * 100).int(), offsets, "mean")),
              ("segment_pool", ((x.detach() * 100).long(), offsets.int(), "max", False, False)),
              ("segment_broadcast", ((y.detach() * 100).long(), offsets, total, 1,
                                     (base.detach() * 100).long()))]
    cases += [("segment_broadcast", (y, offsets, total, shift, b, mean))
              for shift, b, mean in [(0, None, False), (1, base, False), (0, None, True)]]
    cases += [("segment_arg_scatter", (grad, arg, offsets, total))]
    return cases


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(_ops(), name).default, args)


class _TinyAutoencoder(nn.Module):
    """Characters -> words -> sentences and back, as a hierarchical autoencoder wires it."""

    def __init__(self, features):
        super().__init__()
        self.pool = HierarchicalPool(("mean", "max"), causal=True)
        self.up = nn.Linear(features, features)

    def forward(self, x, word_offsets, sentence_offsets):
        words, sentences = self.pool(x, [word_offsets, sentence_offsets])
        words_hat = self.pool.unpool(self.up(sentences), sentence_offsets, base=words)
        return self.pool.unpool(words_hat, word_offsets, base=x)


def test_compile_fullgraph_matches_eager():
    """Inductor traces the ops through their fake kernels, for two batch shapes (the second
    one recompiles with dynamic sizes), forward and backward equal to eager."""
    torch._dynamo.reset()
    model = _TinyAutoencoder(8)
    compiled = torch.compile(model, fullgraph=True)
    for words_count, seed in [(19, 26), (25, 27)]:
        words = _offsets(words_count, 6, seed=seed)
        sentences = _offsets(6, 5, seed=seed + 1)
        # sentences over those words: scale the boundaries to end at words_count
        sentences = (sentences * words_count // sentences[-1]).clamp(max=words_count)
        x = randn((int(words[-1]), 8), torch.float32, seed=seed + 2, requires_grad=True)
        eager = model(x, words, sentences)
        eager.square().sum().backward()
        eager_grad, x.grad = x.grad.clone(), None
        out = compiled(x, words, sentences)
        out.square().sum().backward()
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(x.grad, eager_grad)


def test_hierarchical_pool_matches_chained_reference():
    words = _offsets(31, 7, seed=29)
    sentences = offsets_from_lengths(torch.tensor([5, 0, 9, 3, 14]))
    x = randn((int(words[-1]), 10), torch.float32, seed=30)
    levels = hierarchical_pool(x, [words, sentences], ["mean", "sum"])
    expected_words = segment_pool_ref(x, words, "mean")
    assert_close(levels[0], expected_words)
    assert_close(levels[1], segment_pool_ref(expected_words, sentences, "sum"))
    module_levels = HierarchicalPool("mean")(x, [words, sentences])
    assert_close(module_levels[1], segment_pool_ref(expected_words, sentences, "mean"))


def test_reference_backend_runs_the_references():
    offsets = _offsets(5, 4, seed=31)
    x = randn((int(offsets[-1]), 3), torch.float64, seed=32)
    with backend("reference"):
        pooled = segment_pool(x, offsets, "min")
        spread = segment_broadcast(pooled, offsets, shift=1)
    assert_close(pooled, segment_pool(x, offsets, "min"), scale=0)
    assert_close(spread, segment_broadcast(pooled, offsets, shift=1), scale=0)


def test_offsets_from_mask():
    is_end = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    assert offsets_from_mask(is_end).tolist() == [0, 3, 4, 8, 10, 11]
    assert offsets_from_mask(is_end[:-1]).tolist() == [0, 3, 4, 8, 10]
    assert offsets_from_mask(is_end, num_segments=7).tolist() == [0, 3, 4, 8, 10, 11, 11, 11]
    assert offsets_from_mask(torch.zeros(0, dtype=torch.bool)).tolist() == [0]
    # spaces end words in a character stream
    text = torch.tensor([ord(c) for c in "ab cde f"])
    assert offsets_from_mask(text == ord(" ")).tolist() == [0, 3, 7, 8]


def test_ragged_padded_round_trip():
    offsets = _offsets(13, 6, seed=33)
    lengths = lengths_from_offsets(offsets)
    x = randn((int(offsets[-1]), 5), torch.float32, seed=34, requires_grad=True)
    padded = ragged_to_padded(x, offsets, fill=-1.0)
    assert padded.shape == (13, int(lengths.max()), 5)
    for s in range(13):
        n = int(lengths[s])
        assert torch.equal(padded[s, :n], x[int(offsets[s]):int(offsets[s + 1])])
        assert (padded[s, n:] == -1).all()
    back, back_offsets = padded_to_ragged(padded, lengths, int(offsets[-1]))
    assert torch.equal(back, x) and torch.equal(back_offsets, offsets)
    back.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    truncated = ragged_to_padded(x, offsets, 2)
    assert truncated.shape == (13, 2, 5)


# ----------------------------------------------------------------------------------------------
# Bad input: eager calls reach the C++ checks, traced calls the fake kernels; same messages.
# ----------------------------------------------------------------------------------------------

def _bad_calls():
    ok_x = lambda: torch.randn(7, 3)  # noqa: E731
    ok_offsets = lambda: torch.tensor([0, 2, 7])  # noqa: E731
    pool, spread = _ops().segment_pool, _ops().segment_broadcast
    return {
        "x not 2-D": (ValueError, "segment_pool: x must be 2-D",
                      lambda: pool(torch.randn(7), ok_offsets(), "sum")),
        "x bool": (TypeError, "x must be float32, float64, float16, bfloat16, int32 or int64",
                   lambda: pool(torch.ones(7, 3, dtype=torch.bool), ok_offsets(), "sum")),
        "grad integer": (TypeError, "grad must be float32, float64, float16 or bfloat16",
                         lambda: _ops().segment_arg_scatter(torch.ones(2, 3, dtype=torch.long),
                                                            torch.zeros(2, 3, dtype=torch.long),
                                                            ok_offsets(), 7)),
        "offsets float": (TypeError, "offsets must be int32 or int64",
                          lambda: pool(ok_x(), ok_offsets().float(), "sum")),
        "offsets 2-D": (ValueError, "offsets must be 1-D",
                        lambda: pool(ok_x(), ok_offsets()[None], "sum")),
        "offsets empty": (ValueError, "offsets must be 1-D with S \\+ 1 >= 1",
                          lambda: pool(ok_x(), torch.zeros(0, dtype=torch.long), "sum")),
        "reduce unknown": (ValueError, "reduce must be one of .* got 'median'",
                           lambda: pool(ok_x(), ok_offsets(), "median")),
        "y not 2-D": (ValueError, "segment_broadcast: y must be 2-D",
                      lambda: spread(torch.randn(2), ok_offsets(), 7)),
        "offsets vs y": (ValueError, "offsets must have y.shape\\[0\\] \\+ 1 = 4 boundaries",
                         lambda: spread(torch.randn(3, 3), ok_offsets(), 7)),
        "total negative": (ValueError, "total must be >= 0",
                           lambda: spread(torch.randn(2, 3), ok_offsets(), -1)),
        "shift negative": (ValueError, "shift must be >= 0",
                           lambda: spread(torch.randn(2, 3), ok_offsets(), 7, -1)),
        "base shape": (ValueError, "base must have shape \\(total, y.shape\\[1\\]\\)",
                       lambda: spread(torch.randn(2, 3), ok_offsets(), 7, 0, torch.randn(6, 3))),
        "base dtype": (TypeError, "base must have y's dtype",
                       lambda: spread(torch.randn(2, 3), ok_offsets(), 7, 0,
                                      torch.randn(7, 3, dtype=torch.float64))),
        "arg dtype": (TypeError, "arg must have offsets' dtype",
                      lambda: _ops().segment_arg_scatter(torch.randn(2, 3),
                                                         torch.zeros(2, 3, dtype=torch.int32),
                                                         ok_offsets(), 7)),
        "arg shape": (ValueError, "arg must have grad's shape",
                      lambda: _ops().segment_arg_scatter(torch.randn(2, 3),
                                                         torch.zeros(2, 4, dtype=torch.long),
                                                         ok_offsets(), 7)),
    }


@pytest.mark.parametrize("mode", ["eager", "fake"])
@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_input_raises(name, mode):
    error, match, call = _bad_calls()[name]
    if mode == "eager":
        with pytest.raises(error, match=match):
            call()
    else:
        with FakeTensorMode(), pytest.raises(error, match=match):
            call()


def _public_bad_calls():
    """Bad input through the public functions, which check it before choosing a path."""
    x = lambda: torch.randn(6, 3)  # noqa: E731
    y = lambda: torch.randn(2, 3)  # noqa: E731
    ok = lambda: torch.tensor([0, 2, 6])  # noqa: E731
    words = lambda: torch.tensor([0, 2, 2, 6])  # noqa: E731
    return {
        "pool offsets start": (ValueError, "segment_pool: offsets must start at 0, got 1",
                               lambda: segment_pool(x(), torch.tensor([1, 3, 6]), "sum")),
        "pool offsets order": (ValueError, "segment_pool: offsets must be non-decreasing",
                               lambda: segment_pool(x(), torch.tensor([0, 4, 2, 6]), "max")),
        "pool offsets end": (ValueError, "must end at the number of rows \\(6\\), got 5",
                             lambda: segment_pool(x(), torch.tensor([0, 2, 5]), "mean")),
        "pool offsets list": (TypeError, "segment_pool: offsets must be a tensor",
                              lambda: segment_pool(x(), [0, 2, 6], "sum")),
        "pool offsets float": (TypeError, "offsets must be int32 or int64",
                               lambda: segment_pool(x(), ok().float(), "sum")),
        "pool offsets 2-D": (ValueError, "offsets must be 1-D",
                             lambda: segment_pool(x(), ok()[None], "sum")),
        "pool x 1-D": (ValueError, "segment_pool: x must be 2-D",
                       lambda: segment_pool(torch.randn(6), ok(), "sum")),
        "pool x list": (TypeError, "segment_pool: x must be a tensor",
                        lambda: segment_pool([[1.0]] * 6, ok(), "sum")),
        "pool x bool": (TypeError, "x must be float32",
                        lambda: segment_pool(torch.ones(6, 3, dtype=torch.bool), ok(), "sum")),
        "pool reduce": (ValueError, "segment_pool: reduce must be one of .* got 'median'",
                        lambda: segment_pool(x(), ok(), "median")),
        "spread offsets start": (ValueError, "segment_broadcast: offsets must start at 0",
                                 lambda: segment_broadcast(y(), torch.tensor([1, 3, 6]), 6)),
        "spread offsets order": (ValueError, "offsets must be non-decreasing",
                                 lambda: segment_broadcast(torch.randn(3, 3),
                                                           torch.tensor([0, 4, 2, 6]), 6)),
        "spread offsets end": (ValueError, "must end at the number of rows \\(7\\), got 6",
                               lambda: segment_broadcast(y(), ok(), 7)),
        "spread no offsets": (ValueError, "offsets must be 1-D with S \\+ 1 >= 1",
                              lambda: segment_broadcast(y(), torch.zeros(0, dtype=torch.long))),
        "spread offsets vs y": (ValueError, "offsets must have y.shape\\[0\\] \\+ 1 = 4",
                                lambda: segment_broadcast(torch.randn(3, 3), ok(), 6)),
        "spread total": (ValueError, "total must be >= 0",
                         lambda: segment_broadcast(y(), ok(), -1)),
        "spread shift": (ValueError, "shift must be >= 0",
                         lambda: segment_broadcast(y(), ok(), 6, -1)),
        "spread base shape": (ValueError, "base must have shape \\(total, y.shape\\[1\\]\\)",
                              lambda: segment_broadcast(y(), ok(), 6, 0, torch.randn(5, 3))),
        "spread base dtype": (TypeError, "base must have y's dtype",
                              lambda: segment_broadcast(y(), ok(), 6, 0,
                                                        torch.randn(6, 3).double())),
        "spread base list": (TypeError, "segment_broadcast: base must be a tensor",
                             lambda: segment_broadcast(y(), ok(), None, 0, [[0.0] * 3] * 6)),
        "hierarchy reduce": (ValueError, "hierarchical_pool: reduce must be one of .* 'median'",
                             lambda: hierarchical_pool(x(), [words(), ok()], ["sum", "median"])),
        "hierarchy count": (ValueError, "one string or one per level \\(2\\), got 1",
                            lambda: hierarchical_pool(x(), [words(), ok()], ["sum"])),
        "hierarchy tensor": (TypeError, "level_offsets must be a sequence",
                             lambda: hierarchical_pool(x(), words(), "sum")),
        "hierarchy level 2": (ValueError, "must end at the number of rows \\(3\\), got 6",
                              lambda: hierarchical_pool(x(), [words(), ok()], "mean")),
    }


@pytest.mark.parametrize("bk", ["auto", "reference"])
@pytest.mark.parametrize("name", list(_public_bad_calls()))
def test_public_bad_input_raises_on_both_paths(name, bk):
    """backend("reference") refuses what the default path (the extension) refuses, with
    the same error."""
    error, match, call = _public_bad_calls()[name]
    with backend(bk), pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("offsets, match", [
    ([1, 2, 7], "offsets must start at 0, got 1"),
    ([0, 2, 6], "offsets must end at the number of rows \\(7\\), got 6"),
    ([0, 8, 7], "offsets must be non-decreasing"),
    ([0, 5, 2, 7], "offsets must be non-decreasing"),
])
def test_bad_offset_values_raise_on_cpu(offsets, match):
    x, offsets = torch.randn(7, 3), torch.tensor(offsets)
    with pytest.raises(ValueError, match=match):
        segment_pool(x, offsets, "sum")
    with pytest.raises(ValueError, match=match):
        segment_broadcast(torch.randn(offsets.numel() - 1, 3), offsets, 7)


def test_bad_devices_and_int32_overflow_raise():
    with pytest.raises(ValueError, match="offsets must be on x's device"):
        segment_pool(torch.randn(7, 3), torch.tensor([0, 2, 7], device="meta"))
    with FakeTensorMode():
        huge = torch.empty(2**31, 1, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="int32 offsets address at most 2\\*\\*31 - 1 rows"):
            segment_pool(huge, torch.zeros(3, dtype=torch.int32))


def test_missing_extension_error_says_how_to_build(monkeypatch):
    monkeypatch.delattr(fastlab, "_C")
    monkeypatch.setitem(sys.modules, "fastlab._C", None)
    _ext.load_extension.cache_clear()
    try:
        with pytest.raises(ImportError, match="not built .* build it from the source tree"):
            _ext.load_extension()
        assert not _ext.extension_available()
    finally:
        _ext.load_extension.cache_clear()


def test_bad_helper_input_raises():
    with pytest.raises(TypeError, match="is_end must be a bool tensor"):
        offsets_from_mask(torch.ones(4))
    with pytest.raises(ValueError, match="is_end must be 1-D"):
        offsets_from_mask(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_segments must be >= 0"):
        offsets_from_mask(torch.ones(4, dtype=torch.bool), num_segments=-1)
    with pytest.raises(TypeError, match="lengths must be int32 or int64"):
        offsets_from_lengths(torch.ones(3))
    with pytest.raises(ValueError, match="offsets must be 1-D"):
        lengths_from_offsets(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="x must be 2-D"):
        ragged_to_padded(torch.randn(4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="max_len must be >= 0"):
        ragged_to_padded(torch.randn(4, 2), torch.tensor([0, 4]), -1)
    with pytest.raises(ValueError, match="padded must be 3-D"):
        padded_to_ragged(torch.randn(4, 2), torch.tensor([1, 2, 0, 1]))
    with pytest.raises(ValueError, match="lengths must have padded.shape\\[0\\] = 4 entries"):
        padded_to_ragged(torch.randn(4, 2, 3), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="reduce must be one string or one per level \\(2\\)"):
        hierarchical_pool(torch.randn(4, 2), [torch.tensor([0, 4])] * 2, ["sum"])
    with pytest.raises(ValueError, match="reduce must be one of"):
        HierarchicalPool("median")
    with pytest.raises(ValueError, match="reduce must be one of"):
        segment_pool_ref(torch.randn(4, 2), torch.tensor([0, 4]), "median")


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA kernels at real sizes, vector widths and widths of the hierarchy's levels
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("features, max_len", [(32, 16), (48, 16), (64, 6), (96, 3), (128, 4),
                                               (256, 15), (37, 9)])
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_cuda_real_sizes(reduce, features, max_len):
    for dtype in DTYPES:
        _check_pool_once(reduce, dtype, "contiguous", torch.int64, features, 20011, max_len,
                         "cuda")
    _check_pool_once(reduce, torch.bfloat16, "row_slice", torch.int32, features, 20011, max_len,
                     "cuda")
    _check_broadcast_once(torch.bfloat16, 1, True, "contiguous", torch.int32, features, 20011,
                          max_len, "cuda")


# Kernel settings forced through staged_kernel_tuning: the register kernel and the staged
# kernel at several buffer, window, group and block sizes.
_KERNEL_SETTINGS = {
    "registers": dict(buffer_kib=0, window_kib=16, segs_per_group=1),
    "b8-w40": dict(buffer_kib=8, window_kib=40, segs_per_group=1),
    "b24-w16": dict(buffer_kib=24, window_kib=16, segs_per_group=1),
    "b48-w4": dict(buffer_kib=48, window_kib=4, segs_per_group=1),
    "b40-w32-s4": dict(buffer_kib=40, window_kib=32, segs_per_group=4),
    "b16-w8-s8": dict(buffer_kib=16, window_kib=8, segs_per_group=8),
    "b24-w16-t128": dict(buffer_kib=24, window_kib=16, threads=128),
    "global-offsets": dict(stage_offsets=0),
}


def test_kernel_tuning_checks_its_values_and_leaves_cpu_results_alone():
    offsets = _offsets(17, 6, seed=47)
    x = randn((int(offsets[-1]), 8), torch.float32, seed=48)
    want = segment_pool(x, offsets, "mean")
    with staged_kernel_tuning(buffer_kib=0, threads=128):
        assert torch.equal(segment_pool(x, offsets, "mean"), want)
    with pytest.raises(ValueError, match="buffer_kib must be -1 \\(the default\\) or one of"):
        with staged_kernel_tuning(buffer_kib=12):
            pass
    with pytest.raises(ValueError, match="segs_per_group must be"):
        _ops().segment_pool_tuning(-1, -1, 0)
    _ops().segment_pool_tuning()


def _skewed_offsets(units, long_every, long_len, seed, device):
    """Units of 0-3 rows with one of `long_len` rows every `long_every`: windows sized from the
    mean length then hold far more rows than expected (several buffer loads a window)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (units,), generator=g)
    lengths[::long_every] = long_len
    return offsets_from_lengths(lengths).to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("setting", list(_KERNEL_SETTINGS))
def test_cuda_pool_kernels_agree(setting):
    """Every kernel against the reference with units spanning many buffers (3000 rows of 512
    bytes against 8 KiB), skewed units, empty units, one-vector rows and int32 offsets."""
    with staged_kernel_tuning(**_KERNEL_SETTINGS[setting]):
        for reduce in REDUCTIONS:
            for features, units, max_len in [(256, 41, 3000), (24, 301, 7), (96, 2001, 3)]:
                _check_pool_once(reduce, torch.bfloat16, "contiguous", torch.int64, features, units,
                                 max_len, "cuda")
            _check_pool_once(reduce, torch.float32, "contiguous", torch.int32, 64, 2001, 40, "cuda")
            _check_pool_once(reduce, torch.float16, "contiguous", torch.int32, 8, 3001, 20, "cuda")
            _check_pool_once(reduce, torch.bfloat16, "contiguous", torch.int64, 128, max_len=400,
                             device="cuda", offsets=_skewed_offsets(5001, 97, 400, 7, "cuda"))
            _check_pool_once(reduce, torch.float64, "contiguous", torch.int32, 32, max_len=60,
                             device="cuda",
                             offsets=_skewed_offsets(3001, 13, 60, 8, "cuda").int())


@pytest.mark.gpu
@pytest.mark.parametrize("features, max_len", [(96, 3), (128, 4), (32, 16), (37, 9)])
def test_cuda_mean_equals_cpu_bit_for_bit(features, max_len):
    """The CUDA kernels divide by the row count through a reciprocal and a correction step;
    the CPU kernel divides. Same accumulation order, so the results must match exactly, over
    values of magnitudes 1e-30 to 1e30 (pooling forward and the mean's broadcast)."""
    offsets = _offsets(20011, max_len, seed=features, device="cuda")
    total = int(offsets[-1])
    g = torch.Generator(device="cuda").manual_seed(features)
    magnitudes = 10.0 ** torch.randint(-30, 31, (total, 1), generator=g, device="cuda")
    x = torch.randn(total, features, generator=g, device="cuda") * magnitudes
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        got = segment_pool(xd, offsets, "mean")
        assert torch.equal(got.cpu(), segment_pool(xd.cpu(), offsets.cpu(), "mean"))
        y = got
        spread = _ops().segment_broadcast(y, offsets, total, 0, None, True)
        expected = _ops().segment_broadcast(y.cpu(), offsets.cpu(), total, 0, None, True)
        assert torch.equal(spread.cpu(), expected)


@pytest.mark.gpu
def test_cuda_bad_offsets_are_clamped_and_validate_raises():
    x = torch.randn(1000, 64, device="cuda")
    bad = torch.tensor([5, -7, 3000, 400, 1000, 2**40], device="cuda")
    for reduce in REDUCTIONS:
        out = segment_pool(x, bad, reduce)
        torch.cuda.synchronize()
        assert out.isfinite().all()
    spread = segment_broadcast(torch.randn(5, 64, device="cuda"), bad, 1000)
    torch.cuda.synchronize()
    assert spread.shape == (1000, 64)
    with pytest.raises(ValueError, match="offsets must start at 0"):
        segment_pool(x, bad, "sum", validate=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cuda_integers_run_the_reference(dtype):
    """The CUDA kernels take floats only: CUDA integer inputs run the reference and give the
    CPU kernel's results; the extension's op itself refuses them."""
    offsets = _offsets(2001, 9, seed=45)
    g = torch.Generator().manual_seed(46)
    x = torch.randint(-10**6, 10**6, (int(offsets[-1]), 24), generator=g).to(dtype)
    for reduce in REDUCTIONS:
        got = segment_pool(x.cuda(), offsets.cuda(), reduce)
        assert got.is_cuda and torch.equal(got.cpu(), segment_pool(x, offsets, reduce))
    y = x[:2001]
    spread = segment_broadcast(y.cuda(), offsets.cuda(), x.shape[0], 1, x.cuda())
    assert torch.equal(spread.cpu(), segment_broadcast(y, offsets, x.shape[0], 1, x))
    with pytest.raises(TypeError, match="runs on CPU tensors only"):
        _ops().segment_pool(x.cuda(), offsets.cuda(), "sum")


@pytest.mark.gpu
def test_cuda_backward_is_deterministic():
    _check_backward_is_deterministic(50001, 256, "cuda", seed=35)


@pytest.mark.parametrize("offsets, match", [
    ([1, 3, 5], "must start at 0, got 1"),
    ([0, 3, 4], r"must end at the number of rows \(5\), got 4"),
    ([0, 4, 2, 5], "must be non-decreasing"),
])
def test_python_offset_check_matches_the_extension(offsets, match):
    """The value check that CUDA calls with validate=True run in Python, before the
    extension, says what the extension's check says on CPU."""
    from fastlab.ops.segment_pool import _check_offset_values

    o = torch.tensor(offsets)
    with pytest.raises(ValueError, match=match):
        _check_offset_values("segment_pool", o, 5)
    with pytest.raises(ValueError, match=match):
        segment_pool(torch.randn(5, 3), o, "sum")
    _check_offset_values("segment_pool", torch.tensor([0, 2, 2, 5]), 5)
