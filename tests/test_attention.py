"""fastlab.ops.attention: the Triton kernels (interpreted on CPU) against a float64 oracle.

Every kernel check runs forward and all three gradients (and the LSE with its gradient)
against :func:`attention_ref` evaluated in float64 on the same input values, on odd
sizes where blocks do not divide the sequences and head dims need padding.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastlab.ops._dispatch import backend
from fastlab.ops.attention import attention, attention_ref
from fastlab.testing import assert_attention_close, assert_close, non_contiguous, randn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def _tol_scale(dtype: torch.dtype) -> float:
    """Tolerance multiplier: fp32 on the GPU goes through TF32 dots (10-bit mantissa)."""
    if dtype == torch.float32:
        return 2000.0 if ON_GPU else 4.0
    return 2.0


def _make(shape, dtype, seed, layout):
    """Fresh inputs of ``shape`` (B, H, S, D) in one of four memory layouts."""
    x = randn(shape, dtype, DEVICE, seed=seed)
    if layout == "bshd":  # a (B, S, H, D) tensor seen as (B, H, S, D), as projections give
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":
        x = non_contiguous(x)
    elif layout == "offset":  # storage one element in: a pointer not 16-byte aligned
        x = x.new_empty(x.numel() + 1)[1:].view(shape).copy_(x)
    return x.requires_grad_()


def _run(q, k, v, grad_out, grad_lse, **kwargs):
    out, lse = attention(q, k, v, return_lse=True, **kwargs)
    # rows that see no key have lse = -inf; their LSE gradient is taken as 0
    loss = (out.float() * grad_out.float()).sum() + (lse.nan_to_num(0.0, 0.0, 0.0) * grad_lse).sum()
    return (out, lse) + torch.autograd.grad(loss, (q, k, v))


def _check_once(batch, hq, hkv, q_len, kv_len, d, causal, dtype, *, kv_lens=None,
                layout="contiguous", scale=None, **options):
    q = _make((batch, hq, q_len, d), dtype, 1, layout)
    k = _make((batch, hkv, kv_len, d), dtype, 2, layout)
    v = _make((batch, hkv, kv_len, d), dtype, 3, layout)
    grad_out = randn((batch, hq, q_len, d), dtype, DEVICE, seed=4)
    grad_lse = randn((batch, hq, q_len), torch.float32, DEVICE, seed=5)
    kwargs = dict(causal=causal, scale=scale,
                  kv_lens=None if kv_lens is None else torch.tensor(kv_lens, device=DEVICE),
                  **options)
    with backend("kernel"):
        got = _run(q, k, v, grad_out, grad_lse, **kwargs)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = _run(*exact, grad_out.double(), grad_lse.double(), **kwargs)

    out, lse = got[:2]
    assert out.shape == q.shape and out.dtype == dtype
    assert out.stride() == torch.empty_like(q).stride(), "output must keep q's layout"
    assert lse.dtype == torch.float32
    assert_attention_close(got, want, dtype, _tol_scale(dtype),
                           tf32=dtype == torch.float32 and ON_GPU)
    return got


@pytest.mark.parametrize("d", [4, 16, 24, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,kv_len", [(37, 53), (53, 37)])
def test_matches_float64_reference(q_len, kv_len, causal, d):
    _check_once(1, 2, 2, q_len, kv_len, d, causal, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_inputs(dtype, causal):
    _check_once(2, 2, 2, 37, 53, 24, causal, dtype)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_and_multi_query_heads(hq, hkv, causal):
    _check_once(1, hq, hkv, 37, 53, 16, causal, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,kv_len,kv_lens", [(37, 53, [53, 0, 20]), (21, 53, [5, 53, 38])])
def test_per_sequence_key_lengths(q_len, kv_len, kv_lens, causal):
    got = _check_once(3, 2, 1, q_len, kv_len, 16, causal, torch.float32, kv_lens=kv_lens)
    dk, dv = got[3], got[4]
    for b, n in enumerate(kv_lens):
        assert (dk[b, :, n:] == 0).all() and (dv[b, :, n:] == 0).all(), "padding keys got grad"


@pytest.mark.parametrize("layout", ["bshd", "strided"])
def test_strided_inputs_read_in_place(layout):
    _check_once(2, 4, 2, 37, 53, 24, True, torch.float32, layout=layout)


def test_custom_scale_and_single_query():
    _check_once(1, 2, 2, 37, 53, 16, False, torch.float32, scale=0.3)
    _check_once(2, 2, 2, 1, 53, 16, True, torch.float32)


def test_rows_without_keys_are_zero_not_nan():
    # bottom-right causal with q_len > kv_len: the first q_len - kv_len rows see nothing
    q_len, kv_len = 45, 13
    out, lse, dq, dk, dv = _check_once(1, 2, 2, q_len, kv_len, 16, True, torch.float32)
    empty = q_len - kv_len
    assert (out[:, :, :empty] == 0).all() and (dq[:, :, :empty] == 0).all()
    assert lse[:, :, :empty].isneginf().all() and lse[:, :, empty:].isfinite().all()


@pytest.mark.parametrize("causal", [False, True])
def test_program_order_in_chunks_of_sequences(monkeypatch, causal):
    """Programs run in chunks of sequences, longest blocks first within a chunk: chunks
    of 3 over 8 (batch x q head) and 4 (batch x kv head) sequences leave a short last
    chunk, and every block of every sequence must still be computed exactly once."""
    import importlib

    kernels = importlib.import_module("fastlab.kernels.attention")
    monkeypatch.setattr(kernels, "_seq_chunk", lambda n_seq, seq_bytes: min(n_seq, 3))
    _check_once(2, 4, 2, 37, 53, 16, causal, torch.float32)


@pytest.mark.parametrize("layout", ["contiguous", "bshd"])
def test_int64_row_offsets(monkeypatch, layout):
    """Row offsets (row * token stride) go to int64 where a tensor could leave int32: with
    the bound lowered, the wide path runs for these small inputs and must agree with the
    float64 reference, forward and backward, over windowed and causal loops."""
    import importlib

    kernels = importlib.import_module("fastlab.kernels.attention")
    layout_of = kernels._Layout(torch.empty(2, 3, 37, 16), torch.empty(2, 3, 53, 16), None, 0, 0)
    small = [torch.empty(2, 3, 53, 16)]
    assert not kernels._wide(layout_of, small)
    monkeypatch.setattr(kernels, "_INT32_OFFSETS", 16 * (53 + 256))
    assert kernels._wide(layout_of, small)  # 16 * (53 + 256) rows reach the bound
    assert not kernels._wide(layout_of, [torch.empty(2, 3, 53, 15)])  # stride 15 does not
    seen = []
    real = kernels._wide
    monkeypatch.setattr(kernels, "_wide", lambda *a: seen.append(real(*a)) or seen[-1])
    _check_once(2, 4, 2, 37, 53, 16, True, torch.float32, layout=layout)
    _check_once(1, 2, 2, 45, 29, 24, False, torch.float32, layout=layout, window=(6, 2))
    assert seen and all(seen), "every launch must have taken the int64 path"


def _slopes(*shape):
    return torch.rand(shape, generator=torch.Generator().manual_seed(7)).to(DEVICE) * 0.5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(5, 3), (0, 0), (-1, 4), (20, -1)])
def test_sliding_window(window, causal):
    _check_once(1, 2, 1, 37, 53, 16, causal, torch.float32, window=window)


@pytest.mark.parametrize("q_len,kv_len", [(37, 53), (45, 13)])
def test_softcap(q_len, kv_len):
    _check_once(1, 2, 2, q_len, kv_len, 24, True, torch.float32, softcap=1.5)


@pytest.mark.parametrize("shape,causal", [((3,), False), ((2, 3), True)])
def test_alibi(shape, causal):
    _check_once(2, 3, 1, 37, 53, 8, causal, torch.float32, alibi_slopes=_slopes(*shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_softcap_alibi_together(dtype):
    _check_once(3, 4, 2, 37, 53, 16, True, dtype, kv_lens=[53, 0, 20], window=(9, -1),
                softcap=2.0, alibi_slopes=_slopes(4))


def _one_hot_values(batch, hkv, kv_len, d):
    """V whose key j is the unit vector e_j: O = P V holds the (dropped) probabilities."""
    v = torch.zeros(batch, hkv, kv_len, d, device=DEVICE)
    v[..., torch.arange(kv_len), torch.arange(kv_len)] = 1.0
    return v


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_drops_the_reference_elements(causal):
    """The kernel drops exactly the elements the reference's hash drops, at the expected
    rate, reproducibly from (seed, offset), and new numbers for a new offset."""
    from fastlab.ops.attention import _dropout_keep_ref, dropout_key

    b, hq, hkv, q_len, kv_len, p = 2, 2, 1, 29, 31, 0.3
    q = randn((b, hq, q_len, 32), torch.float32, DEVICE, seed=1)
    k = randn((b, hkv, kv_len, 32), torch.float32, DEVICE, seed=2)
    v = _one_hot_values(b, hkv, kv_len, 32)
    kwargs = dict(causal=causal, dropout_p=p, dropout_seed=1234, dropout_offset=5)
    with backend("kernel"):
        got = attention(q, k, v, **kwargs)[..., :kv_len]
        again = attention(q, k, v, **kwargs)[..., :kv_len]
        other = attention(q, k, v, **{**kwargs, "dropout_offset": 6})[..., :kv_len]
    plain = attention_ref(q, k, v, causal=causal)[..., :kv_len]
    keep = _dropout_keep_ref(dropout_key(1234, 5), p, torch.arange(b, device=DEVICE), hq,
                             q_len, kv_len)
    visible = plain > 0
    assert torch.equal(got > 0, visible & keep), "kernel and reference drop different elements"
    assert torch.equal(got, again)
    assert not torch.equal(other > 0, got > 0)
    kept = float((got > 0).sum() / visible.sum())
    assert abs(kept - (1 - p)) < 0.05, kept  # ~1400 draws: 4.5 standard deviations
    torch.testing.assert_close(got, torch.where(keep, plain / (1 - p), 0.0), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(attention_ref(q, k, v, **kwargs)[..., :kv_len], got,
                               rtol=1e-5, atol=1e-6)


def test_dropout_rate_of_the_hash():
    """Over 2**20 draws the kept fraction is 1 - p within 4 standard deviations, for
    every p, and rows and columns are not correlated (halves agree)."""
    from fastlab.ops.attention import _dropout_keep_ref, dropout_key

    for p in (0.1, 0.5, 0.9):
        keep = _dropout_keep_ref(dropout_key(7, 0), p, torch.arange(2), 8, 256, 256)
        n = keep.numel()
        assert abs(float(keep.float().mean()) - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
        assert abs(float(keep[..., ::2].float().mean() - keep[..., 1::2].float().mean())) < 0.01
        assert abs(float(keep[..., ::2, :].float().mean()
                         - keep[..., 1::2, :].float().mean())) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_gradients(dtype):
    _check_once(1, 4, 2, 37, 53, 16, True, dtype, dropout_p=0.25, dropout_seed=99,
                dropout_offset=3, window=(-1, -1), softcap=0.0)


def test_reference_options_match_sdpa():
    """The oracle's window and ALiBi: SDPA with the same float mask written out."""
    q = randn((2, 3, 7, 8), torch.float64, seed=1)
    k = randn((2, 3, 11, 8), torch.float64, seed=2)
    v = randn((2, 3, 11, 8), torch.float64, seed=3)
    slopes = _slopes(2, 3).cpu()
    i, j = torch.arange(7)[:, None], torch.arange(11)[None, :]
    d = i + 4 - j
    bias = -slopes.double()[:, :, None, None] * d.abs()
    bias = bias.masked_fill(~((d <= 2) & (d >= -1)), float("-inf"))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    got = attention_ref(q, k, v, window=(2, 1), alibi_slopes=slopes)
    torch.testing.assert_close(got, want)
    scores = 3.0 * torch.tanh(q @ k.transpose(-1, -2) / 8 ** 0.5 / 3.0)
    want = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(attention_ref(q, k, v, softcap=3.0), want)


def test_reference_options_gradcheck():
    """The explicit backward of the reference with every option on (dropout's mask fixed
    by its seed) against numerical gradients."""
    q = randn((2, 4, 9, 5), torch.float64, seed=1, requires_grad=True)
    k = randn((2, 2, 6, 5), torch.float64, seed=2, requires_grad=True)
    v = randn((2, 2, 6, 5), torch.float64, seed=3, requires_grad=True)

    def fn(q, k, v):
        out, lse = attention(q, k, v, causal=True, kv_lens=torch.tensor([4, 6]),
                             return_lse=True, window=(3, -1), softcap=1.5,
                             alibi_slopes=_slopes(2, 4).cpu(), dropout_p=0.3,
                             dropout_seed=5)
        return out, lse.nan_to_num(0.0, 0.0, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_zero_length_keys():
    q = randn((2, 2, 7, 16), torch.float32, DEVICE, seed=1, requires_grad=True)
    k = randn((2, 2, 0, 16), torch.float32, DEVICE, seed=2, requires_grad=True)
    v = randn((2, 2, 0, 16), torch.float32, DEVICE, seed=3, requires_grad=True)
    with backend("kernel"):
        out, lse = attention(q, k, v, causal=True, return_lse=True)
        (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert (out == 0).all() and lse.isneginf().all() and (dq == 0).all()


def test_backward_is_deterministic():
    q = _make((1, 4, 37, 16), torch.bfloat16, 1, "contiguous")
    k = _make((1, 1, 53, 16), torch.bfloat16, 2, "contiguous")
    v = _make((1, 1, 53, 16), torch.bfloat16, 3, "contiguous")
    grad_out = randn(q.shape, torch.bfloat16, DEVICE, seed=4)
    with backend("kernel"):
        first = torch.autograd.grad(attention(q, k, v, causal=True), (q, k, v), grad_out)
        second = torch.autograd.grad(attention(q, k, v, causal=True), (q, k, v), grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_reference_matches_sdpa():
    """The oracle itself: equal to torch SDPA given the same explicit bottom-right mask."""
    q = randn((2, 4, 37, 24), torch.float64, seed=1)
    k = randn((2, 2, 53, 24), torch.float64, seed=2)
    v = randn((2, 2, 53, 24), torch.float64, seed=3)
    lens = torch.tensor([53, 30])
    i, j = torch.arange(37)[:, None], torch.arange(53)[None, :]
    mask = (j < lens.view(2, 1, 1, 1)) & (j <= i + (lens.view(2, 1, 1, 1) - 37))
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                          v.repeat_interleave(2, 1), attn_mask=mask)
    got = attention_ref(q, k, v, causal=True, kv_lens=lens)
    torch.testing.assert_close(got, want)
    plain = F.scaled_dot_product_attention(q[:, :, :37], q, q, is_causal=True)
    torch.testing.assert_close(attention_ref(q, q, q, causal=True), plain)


@pytest.mark.parametrize("use_kv_lens", [False, True])
def test_reference_backward_gradcheck(use_kv_lens):
    """float64 runs the reference path of the same custom op: gradcheck its explicit
    backward, including GQA, the LSE's gradient and rows without keys."""
    q = randn((2, 4, 9, 5), torch.float64, seed=1, requires_grad=True)
    k = randn((2, 2, 6, 5), torch.float64, seed=2, requires_grad=True)
    v = randn((2, 2, 6, 5), torch.float64, seed=3, requires_grad=True)
    kv_lens = torch.tensor([4, 6]) if use_kv_lens else None

    def fn(q, k, v):
        out, lse = attention(q, k, v, causal=True, kv_lens=kv_lens, return_lse=True)
        return out, lse.nan_to_num(0.0, 0.0, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_cpu_tensors_use_reference_by_default():
    q = randn((1, 2, 5, 8), torch.float32, seed=1)
    k = randn((1, 2, 6, 8), torch.float32, seed=2)
    torch.testing.assert_close(attention(q, k, k, causal=True),
                               attention_ref(q, k, k, causal=True))


#: The op's arguments after kv_lens for the dense layout: no offsets, no ALiBi, no maxima.
_DENSE = (None, None, None, 0, 0)
#: window (-1, -1), softcap 0, dropout_p 0 and its key
_NO_OPTIONS = (-1, -1, 0.0, 0.0, 0)


@pytest.mark.parametrize("kernel", [False, True])
def test_opcheck(kernel):
    q = randn((1, 2, 19, 16), torch.float32, DEVICE, seed=1, requires_grad=True)
    k = randn((1, 1, 23, 16), torch.float32, DEVICE, seed=2, requires_grad=True)
    v = randn((1, 1, 23, 16), torch.float32, DEVICE, seed=3, requires_grad=True)
    lens = torch.tensor([17], device=DEVICE)
    with backend("kernel" if kernel else "reference"):
        torch.library.opcheck(torch.ops.fastlab.attention_fwd.default,
                              (q, k, v, lens, *_DENSE, True, 0.25, *_NO_OPTIONS))
        out, lse = torch.ops.fastlab.attention_fwd(q, k, v, lens, *_DENSE, True, 0.25,
                                                   *_NO_OPTIONS)
        torch.library.opcheck(torch.ops.fastlab.attention_bwd.default,
                              (torch.randn_like(out), torch.randn_like(lse), q.detach(),
                               k.detach(), v.detach(), out.detach(), lse.detach(), lens,
                               *_DENSE, True, 0.25, *_NO_OPTIONS))


def test_torch_compile_fullgraph():
    q = _make((1, 2, 37, 16), torch.float32, 1, "bshd")
    k = _make((1, 1, 53, 16), torch.float32, 2, "bshd")
    v = _make((1, 1, 53, 16), torch.float32, 3, "bshd")
    lens = torch.tensor([40], device=DEVICE)

    def step(q, k, v):
        out, lse = attention(q, k, v, causal=True, kv_lens=lens, return_lse=True)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with backend("kernel"):
        eager = torch.autograd.grad(step(q, k, v), (q, k, v))
        traced = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b)


def _bad(q_shape=(2, 4, 5, 8), k_shape=(2, 2, 6, 8), v_shape=None, dtypes=None, **kwargs):
    dq, dk, dv = dtypes or (torch.float32,) * 3
    q = torch.randn(q_shape).to(dq)
    k = torch.randn(k_shape).to(dk)
    v = torch.randn(v_shape or k_shape).to(dv)
    attention(q, k, v, **kwargs)


@pytest.mark.parametrize("args,error,match", [
    (dict(k_shape=(3, 2, 6, 8)), ValueError, "batch of k/v"),
    (dict(k_shape=(2, 3, 6, 8)), ValueError, "multiple of k/v heads"),
    (dict(q_shape=(2, 4, 5, 8), k_shape=(2, 4, 6, 4)), ValueError, "head_dim of k/v"),
    (dict(v_shape=(2, 2, 7, 8)), ValueError, "same shape"),
    (dict(q_shape=(2, 4, 5, 300), k_shape=(2, 2, 6, 300)), ValueError, "head_dim must be"),
    (dict(q_shape=(4, 5, 8)), ValueError, "4-D"),
    (dict(dtypes=(torch.float32, torch.bfloat16, torch.float32)), TypeError, "share a dtype"),
    (dict(dtypes=(torch.int64,) * 3), TypeError, "q must be float16"),
    (dict(kv_lens=torch.tensor([3, 7])), ValueError, r"kv_lens values must be in \[0, 6\]"),
    (dict(kv_lens=torch.tensor([-1, 2])), ValueError, "kv_lens values"),
    (dict(kv_lens=torch.tensor([3])), ValueError, r"kv_lens must have shape \(batch,\)"),
    (dict(kv_lens=torch.tensor([3.0, 2.0])), TypeError, "kv_lens must be int32 or int64"),
    (dict(kv_lens=[3, 2]), TypeError, "kv_lens must be a torch.Tensor"),
    (dict(scale=0.0), ValueError, "scale must be a positive"),
    (dict(window=(2,)), ValueError, r"window must be a pair \(left, right\)"),
    (dict(window=(-2, 0)), ValueError, "window must be a pair"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite float >= 0"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=0.1, dropout_seed=-3), ValueError, "dropout_seed must be an int"),
    (dict(dropout_offset=1.5), ValueError, "dropout_offset must be an int"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), TypeError,
     "alibi_slopes must be float32"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(heads,\)"),
    (dict(alibi_slopes=[0.5] * 4), TypeError, "alibi_slopes must be a torch.Tensor"),
])
def test_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        _bad(**args)


@pytest.mark.parametrize("name", ["reference", "kernel"])
def test_validate_false_skips_the_value_check_and_clamps(name):
    """validate=False: no check of kv_lens' values (no host sync on CUDA); values outside
    [0, Skv] act as the nearest end. Shapes and dtypes are still checked."""
    q, k, v = randn((2, 2, 3, 8), seed=1), randn((2, 2, 6, 8), seed=2), randn((2, 2, 6, 8), seed=3)
    with backend(name):
        got = attention(q, k, v, kv_lens=torch.tensor([9, 4]), validate=False)
        want = attention(q, k, v, kv_lens=torch.tensor([6, 4]))
        assert_close(got, want)
        with pytest.raises(ValueError, match="kv_lens values"):
            attention(q, k, v, kv_lens=torch.tensor([9, 4]))
        with pytest.raises(ValueError, match=r"kv_lens must have shape \(batch,\)"):
            attention(q, k, v, kv_lens=torch.tensor([3]), validate=False)
        with pytest.raises(TypeError, match="validate must be a bool"):
            attention(q, k, v, kv_lens=torch.tensor([3, 3]), validate=1)


def test_encoder_checks_kv_lens_once_not_per_layer(monkeypatch):
    """The BERT encoder checks kv_lens' values once per call and lets its layers skip it
    (each check is a host sync on CUDA)."""
    from fastlab.models import encoder as E

    model = E.Encoder(E.EncoderConfig(vocab_size=11, max_len=8, n_layer=3, n_head=2,
                                      d_model=16, dropout=0.0))
    idx = torch.randint(0, 11, (2, 8))
    seen = []
    real = E.attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("validate", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "attention", spy)
    out = model(idx, torch.tensor([8, 5]))
    assert seen == [False] * 3 and out.shape == (2, 8, 16)
    with pytest.raises(ValueError, match=r"kv_lens values must be in \[0, 8\]"):
        model(idx, torch.tensor([9, 5]))
    with pytest.raises(ValueError, match=r"kv_lens must be a tensor of shape \(2,\)"):
        model(idx, torch.tensor([8]))


def test_non_tensor_input():
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        attention(torch.randn(1, 1, 2, 4), [[1.0]], torch.randn(1, 1, 2, 4))


# ---------------------------------------------------------------------------------------
# GPU: real sizes against the reference (float32 oracle in chunks would be slower than the
# test is worth; the float64 oracle fits at these sizes)
# ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,hq,hkv,q_len,kv_len,d,causal", [
    (2, 8, 8, 1024, 1024, 128, True),
    (2, 8, 2, 777, 1500, 64, True),
    (1, 4, 4, 300, 129, 256, True),
    (16, 4, 4, 256, 256, 16, False),
    (64, 8, 8, 64, 64, 4, True),
    # short sequences at small head dims, where the wide key tiles compete (GQA, q != kv)
    (8, 4, 2, 200, 256, 24, True),
    (32, 4, 1, 256, 97, 8, True),
])
def test_gpu_real_sizes(b, hq, hkv, q_len, kv_len, d, causal, dtype):
    _check_once(b, hq, hkv, q_len, kv_len, d, causal, dtype, layout="bshd")


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(window=(255, -1)), dict(window=(100, 37)),
                                     dict(softcap=30.0), dict(alibi_slopes="per-head"),
                                     dict(dropout_p=0.1, dropout_seed=1)],
                         ids=["window-causal", "window", "softcap", "alibi", "dropout"])
def test_gpu_options(options):
    if options.get("alibi_slopes") == "per-head":
        options = dict(alibi_slopes=_slopes(2, 8))
    causal = options.get("window") != (100, 37)
    _check_once(2, 8, 2, 1024, 1100, 128, causal, torch.bfloat16, layout="bshd", **options)


@pytest.mark.gpu
def test_gpu_direct_launch_reuses_compiled_kernels_exactly():
    """After its first calls a tuning key launches the compiled kernel directly: the same
    call again, another length in the same bucket, another layout (other strides) and a
    misaligned view must all still match float64, and repeated calls bit for bit."""
    from fastlab.kernels import attention as kernels

    first = _check_once(2, 4, 2, 1000, 1000, 64, True, torch.bfloat16, layout="bshd")
    for _ in range(2):
        again = _check_once(2, 4, 2, 1000, 1000, 64, True, torch.bfloat16, layout="bshd")
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    _check_once(2, 4, 2, 1000, 1000, 64, True, torch.bfloat16, layout="bshd")
    _check_once(2, 4, 2, 1017, 1017, 64, True, torch.bfloat16, layout="bshd")
    _check_once(2, 4, 2, 1000, 1000, 64, True, torch.bfloat16)
    _check_once(2, 4, 2, 1000, 1000, 64, True, torch.bfloat16, layout="strided")
    _check_once(2, 4, 2, 1000, 1000, 64, True, torch.bfloat16, layout="offset")
    assert kernels._COMPILED, "the direct path never ran"


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(), dict(dropout_p=0.1), dict(window=(100, -1)),
                                     dict(kv_lens="ragged")],
                         ids=["plain", "dropout", "window", "kv-lens"])
def test_gpu_launch_plans_match_the_full_launch_bit_for_bit(monkeypatch, options):
    """Repeated calls launch from a plan through the compiled module's launcher: outputs,
    LSE and gradients equal those of Triton's own launch path exactly, a dropout seed the
    plan never saw included."""
    import importlib

    kernels = importlib.import_module("fastlab.kernels.attention")
    q = _make((2, 4, 700, 64), torch.bfloat16, 1, "bshd")
    k, v = (_make((2, 2, 900, 64), torch.bfloat16, s, "bshd") for s in (2, 3))
    grad_out = randn((2, 4, 700, 64), torch.bfloat16, DEVICE, seed=4)
    grad_lse = randn((2, 4, 700), torch.float32, DEVICE, seed=5)
    if options.get("kv_lens") == "ragged":
        options = dict(kv_lens=torch.tensor([900, 333], device=DEVICE))

    def call(seed):
        extra = dict(dropout_seed=seed) if "dropout_p" in options else {}
        with backend("kernel"):
            return _run(q, k, v, grad_out, grad_lse, causal=True, **options, **extra)

    for seed in range(4):  # tune, compile, launch directly, then from the plan
        call(seed)
    planned_before = len(kernels._PLANS)
    assert planned_before >= 2, "no launch plan was made"
    planned = call(17)
    assert len(kernels._PLANS) == planned_before, "the call missed its plan"
    monkeypatch.setattr(kernels, "DIRECT_LAUNCH", False)
    full = call(17)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), planned, full):
        assert torch.equal(a, b), name


class _RecordingKernel:
    """A compiled kernel that records its launches (grid, arguments) and does nothing."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args: self.calls.append((tuple(grid), args))


def _stub_compiled_kernels(monkeypatch, kernels):
    """Every launch finds a tuned configuration and a compiled kernel (the recorder), so
    _launch takes its direct path and the calls after it their plans, on CPU tensors."""
    recorder = _RecordingKernel()
    config = ({"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2},
              {"BLOCK_M": 32, "BLOCK_N": 16})

    class AnyConfig(dict):
        def get(self, key, default=None):
            return config

    class AnyCompiled(dict):
        def get(self, key, default=None):
            # the constexprs a compiled kernel is called with: the keyword flags of the call
            return recorder, tuple(value for _, value in key[2])

    monkeypatch.setattr(kernels, "INTERPRETING", False)
    monkeypatch.setattr(kernels, "_BEST", AnyConfig())
    monkeypatch.setattr(kernels, "_COMPILED", AnyCompiled())
    monkeypatch.setattr(kernels, "_PLANS", {})
    return recorder


def _launch_signature(calls, roles, returned):
    """The launches of one step with addresses replaced by what they point at: a caller's
    tensor by its name in ``roles``, a returned tensor by its name in ``returned``, any
    other tensor by the index of its first appearance in the step (so that two arguments
    holding one buffer, as the forward's LSE and the backward's, stay tied), with shape,
    strides and dtype; scalars by value and type."""
    names = {t.data_ptr(): name for name, t in roles.items()}
    names.update({t.data_ptr(): name for name, t in returned.items()})
    seen = {}
    signature = []
    for grid, args in calls:
        launch = [grid]
        for a in args:
            if isinstance(a, torch.Tensor):
                who = names.get(a.data_ptr())
                if who is None:
                    who = seen.setdefault(a.data_ptr(), len(seen))
                launch.append((who, tuple(a.shape), a.stride(), a.dtype))
            else:
                launch.append((type(a), a))
        signature.append(tuple(launch))
    return signature


class _Step:
    """One fwd+bwd of a case of the plan tests on fresh copies of its inputs, recorded."""

    def __init__(self, case, recorder, ops):
        self.case, self.recorder, self.ops = case, recorder, ops
        layout = case.get("layout", "contiguous")
        q_shape, kv_shape = (2, 2, 37, 24), (2, 1 if layout == "bshd" else 2, 53, 24)
        self.inputs = dict(q=_make(q_shape, torch.bfloat16, 1, layout),
                           k=_make(kv_shape, torch.bfloat16, 2, layout),
                           v=_make(kv_shape, torch.bfloat16, 3, layout),
                           g=randn(q_shape, torch.bfloat16, "cpu", seed=4))
        for name in ("kv_lens", "alibi_slopes", "cu"):
            if name in case:
                self.inputs[name] = case[name]
        if "cu" in case:
            for name in ("q", "k", "v"):
                x = self.inputs[name].detach()[0].transpose(0, 1)[:37].contiguous()
                self.inputs[name] = x.requires_grad_()
            self.inputs["g"] = self.inputs["g"][0].transpose(0, 1).contiguous()

    def run(self, seed=1, shift=None):
        """(signature, planned launches) of a step on fresh copies; ``shift`` names an input
        to start one element into its storage (a pointer off 16 bytes)."""
        inputs = {}
        for name, x in self.inputs.items():
            offset = int(name == shift)
            span = 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
            fresh = x.detach().new_empty(span + offset).as_strided(x.shape, x.stride(), offset)
            fresh.copy_(x)
            inputs[name] = fresh.detach().requires_grad_(x.requires_grad)
        q, k, v, g = (inputs[n] for n in "qkvg")
        case = self.case
        options = {n: case[n] for n in ("causal", "scale", "window", "softcap")
                   if n in case}
        if "alibi_slopes" in case:
            options["alibi_slopes"] = inputs["alibi_slopes"]
        if "dropout_p" in case:
            options.update(dropout_p=case["dropout_p"], dropout_seed=seed)
        self.recorder.calls.clear()
        if "cu" in case:
            cu = inputs["cu"]
            out = self.ops.attention_varlen(q, k, v, cu, cu, 20, 20, return_lse=True, **options)
        else:
            if "kv_lens" in case:
                options["kv_lens"] = inputs["kv_lens"]
            out = attention(q, k, v, return_lse=True, **options)
        out, lse = out
        outputs, grads = [out], [g]
        if case.get("lse_grad"):
            inputs["dlse"] = torch.ones_like(lse)
            outputs.append(lse)
            grads.append(inputs["dlse"])
        dq, dk, dv = torch.autograd.grad(outputs, (q, k, v), grads)
        returned = dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)
        calls = list(self.recorder.calls)
        assert len(calls) == 3, "a forward and two backward launches"
        return _launch_signature(calls, inputs, returned)


_PLAN_CASES = {
    "dense": dict(causal=True),
    "gqa-bshd-kv-lens": dict(causal=True, layout="bshd", kv_lens=torch.tensor([53, 20])),
    "varlen": dict(causal=True, cu=torch.tensor([0, 17, 37], dtype=torch.int32)),
    "options": dict(causal=True, window=(9, -1), softcap=20.0, alibi_slopes=torch.rand(2)),
    "dropout": dict(causal=True, dropout_p=0.2),
    "lse-grad": dict(causal=True, lse_grad=True),
}


def _plan_setup(monkeypatch):
    import importlib

    kernels = importlib.import_module("fastlab.kernels.attention")
    ops = importlib.import_module("fastlab.ops.attention")
    recorder = _stub_compiled_kernels(monkeypatch, kernels)
    monkeypatch.setattr(ops, "_kernel_wanted", lambda *tensors: True)
    planned = []
    call = kernels._DirectLaunch.__call__

    def counting(self, tensors, dropout_key):
        planned.append(self)
        return call(self, tensors, dropout_key)

    monkeypatch.setattr(kernels._DirectLaunch, "__call__", counting)
    return kernels, ops, recorder, planned


@pytest.mark.parametrize("name", list(_PLAN_CASES))
def test_launch_plans_repeat_the_full_launch(monkeypatch, name):
    """From the first direct launch of a call on, the same call on other tensors of the same
    shapes launches from a plan: what it hands each kernel must be the full path's, tensor
    for tensor (the caller's, the returned ones, the buffers shared between launches),
    scalar for scalar with the dropout key swapped in; and a tensor off 16 bytes must take
    the full path even where a plan exists."""
    kernels, ops, recorder, planned = _plan_setup(monkeypatch)
    step = _Step(_PLAN_CASES[name], recorder, ops)
    # two seeds whose dropout keys Triton would specialize alike share one plan
    first = 1
    spec = kernels._arg_spec(ops.dropout_key(first, 0))
    second = next(s for s in range(2, 100) if kernels._arg_spec(ops.dropout_key(s, 0)) == spec)
    step.run(first)  # the full path; it leaves the plans
    assert len(kernels._PLANS) == 2, "a forward and a backward plan"
    got = step.run(second)
    assert len(planned) == 3, "the second step did not launch from its plans"
    kernels._PLANS.clear()
    want = step.run(second)
    assert got == want
    if name == "dropout":
        key = ops.dropout_key(second, 0)
        assert all(any(a == (int, key) for a in launch) for launch in want), \
            "the dropout key of the call reaches every kernel"

    for shifted in ("q", "k"):
        before = len(planned)
        assert step.run(second, shift=shifted) == want
        assert len(planned) == before, f"{shifted} off 16 bytes launched from a plan"


_VARIANTS = {
    "scale": (dict(causal=True), dict(causal=True, scale=0.3)),
    "causal": (dict(causal=True), dict(causal=False)),
    "window": (dict(causal=True, window=(9, -1)), dict(causal=True, window=(7, -1))),
    "softcap": (dict(causal=True, softcap=20.0), dict(causal=True, softcap=10.0)),
    "strides": (dict(causal=True), dict(causal=True, layout="strided")),
    "lse-grad": (dict(causal=True), dict(causal=True, lse_grad=True)),
    "kv-lens-dtype": (dict(causal=True, kv_lens=torch.tensor([53, 20])),
                      dict(causal=True, kv_lens=torch.tensor([53, 20], dtype=torch.int32))),
    "alibi-rank": (dict(causal=True, alibi_slopes=torch.rand(2)),
                   dict(causal=True, alibi_slopes=torch.rand(2, 2))),
    "dropout-p": (dict(causal=True, dropout_p=0.2), dict(causal=True, dropout_p=0.3)),
}


@pytest.mark.parametrize("name", list(_VARIANTS))
def test_launch_plans_never_serve_another_call(monkeypatch, name):
    """A call that differs from a planned one in one option, layout or dtype gets its own
    launches: run right after the planned call, it hands the kernels what it does with no
    plan at all, and that differs from the planned call's launches."""
    kernels, ops, recorder, _ = _plan_setup(monkeypatch)
    base, variant = (_Step(case, recorder, ops) for case in _VARIANTS[name])
    base_launches = base.run()
    after_base = variant.run()
    kernels._PLANS.clear()
    alone = variant.run()
    assert after_base == alone
    assert alone != base_launches, "the variant must change the launches to test anything"


def test_direct_launch_hands_the_compiled_launcher_triton_s_arguments(monkeypatch):
    """The planned launch calls Triton 3.6's compiled-module launcher with the arguments
    Triton's own CudaLauncher passes it (but the hooks, None where no hook is set, and the
    launch metadata only hooks read), the call's dropout key swapped in. With a launch hook
    set (a chain with calls, or a plain function), or under another Triton, it goes through
    Triton's own call instead."""
    import importlib
    import types

    import triton
    from triton.backends.nvidia.driver import CudaLauncher

    kernels = importlib.import_module("fastlab.kernels.attention")
    launched, via_triton = [], []
    run = CudaLauncher.__new__(CudaLauncher)
    for name, value in dict(launch=lambda *args: launched.append(args), num_ctas=1,
                            global_scratch_size=0, global_scratch_align=1,
                            profile_scratch_size=0, profile_scratch_align=1,
                            launch_cooperative_grid=False, launch_pdl=False).items():
        setattr(run, name, value)

    class Compiled:
        function = 77
        packed_metadata = (4, 1, 0)

        def __getitem__(self, grid):
            return lambda *args: via_triton.append((grid, args))

    Compiled.run = run
    driver = types.SimpleNamespace(active=types.SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: 4242))
    monkeypatch.setattr(kernels.triton.runtime, "driver", driver)
    monkeypatch.setattr(kernels, "_LAUNCHER_TRITON", triton.__version__[:4])
    x, y = torch.zeros(8), torch.ones(3)
    launch = kernels._DirectLaunch((Compiled(), (5, 1, 1), ("C",)), (11, 0, 2.5), 1)
    launch((x, y), 99)
    # Triton's own layer under the compiled kernel's call, with no hooks
    run(5, 1, 1, 4242, 77, (4, 1, 0), None, None, None, x.data_ptr(), y.data_ptr(), 11, 99,
        2.5, "C")
    assert len(launched) == 2 and launched[0] == launched[1]
    assert launched[0][-6:] == (None, x.data_ptr(), y.data_ptr(), 11, 99, 2.5, "C")[1:] \
        or launched[0][-5:] == (x.data_ptr(), y.data_ptr(), 11, 99, 2.5, "C")[1:]
    assert not via_triton

    chain = triton.knobs.runtime.launch_enter_hook
    hook = lambda *args: None  # noqa: E731
    chain.add(hook)
    try:
        launch((x, y), 98)
    finally:
        chain.remove(hook)
    monkeypatch.setattr(triton.knobs.runtime, "launch_exit_hook", hook)
    launch((x, y), 97)
    monkeypatch.setattr(triton.knobs.runtime, "launch_exit_hook", None)
    launch((x, y), 96)
    assert via_triton == [((5, 1, 1), (x, y, 11, 98, 2.5, "C")),
                          ((5, 1, 1), (x, y, 11, 97, 2.5, "C"))]
    assert len(launched) == 3

    monkeypatch.setattr(kernels, "_LAUNCHER_TRITON", "0.0.")
    other = kernels._DirectLaunch((Compiled(), (5, 1, 1), ()), (1,), -1)
    other((x,), 0)
    assert len(via_triton) == 3 and len(launched) == 3


@pytest.mark.gpu
def test_gpu_float32_and_key_lengths():
    _check_once(4, 4, 2, 300, 513, 96, True, torch.float32, kv_lens=[513, 0, 77, 300])


@pytest.mark.gpu
def test_gpu_matches_sdpa_bf16():
    q, k, v = (randn((4, 16, 2048, 128), torch.bfloat16, "cuda", seed=s) for s in (1, 2, 3))
    got = attention(q, k, v, causal=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert math.isfinite(got.float().abs().max().item())


def test_eager_calls_skip_the_custom_op_dispatcher(monkeypatch):
    """The dispatcher costs ~1 ms of host time per training step at small shapes (measured
    on an H100): eager calls must run the ops' bodies directly, with the same results."""
    import importlib

    mod = importlib.import_module("fastlab.ops.attention")  # the package exports a function

    q, k, v = (randn((1, 2, 9, 8), torch.float32, DEVICE, seed=s, requires_grad=True)
               for s in (1, 2, 3))
    want = torch.autograd.grad(mod._attention_fwd(q, k, v, None, *_DENSE, True, 0.3,
                                                   *_NO_OPTIONS)[0].sum(), (q, k, v))

    def refuse(*args, **kwargs):
        raise AssertionError("eager call went through the torch.library dispatcher")

    monkeypatch.setattr(mod._attention_fwd, "op", refuse)
    monkeypatch.setattr(mod._attention_bwd, "op", refuse)
    out = attention(q, k, v, causal=True, scale=0.3)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, causal=True, scale=0.3), out.detach())


def test_launch_specialization_separates_what_triton_compiles_apart():
    """The direct launch reuses a compiled kernel only for arguments Triton would
    specialize alike: a misaligned view, an int of 1, a multiple of 16 and an int64-sized
    value each get their own key; equal properties share one."""
    pytest.importorskip("triton")
    from fastlab.kernels.attention import _specialization

    x = torch.zeros(64, dtype=torch.bfloat16)
    key = _specialization((x, 7, 0.5))
    assert key == _specialization((torch.zeros(32, dtype=torch.bfloat16), 9, 0.25))
    others = [(x[1:], 7, 0.5), (x.float(), 7, 0.5), (x, 1, 0.5), (x, 32, 0.5),
              (x, 2 ** 40 + 1, 0.5), (x, 2 ** 63 + 1, 0.5), (x, 7, 1)]
    keys = {_specialization(args) for args in others}
    assert key not in keys and len(keys) == len(others)
    # the scalars' part is remembered by value and type: 1 and 1.0 stay apart, and a
    # tensor after a scalar is specialized afresh on every call
    assert _specialization((x, 7, 1)) != _specialization((x, 7, 1.0))
    assert _specialization((x, 7, 1.0)) == _specialization((x, 9, 0.25))
    assert _specialization((x, 7, x)) != _specialization((x, 7, x[1:]))
