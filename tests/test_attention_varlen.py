"""fastlab.ops.attention_varlen: packed ragged sequences against a float64 oracle.

The oracle is :func:`attention_ref` run on each sequence alone in float64, differentiated
by autograd: independent of the packed reference and of the kernels. Lengths are ragged
and include 0 and 1, queries longer and shorter than keys (bottom-right causal per
sequence), GQA, head dims that need padding.
"""
import pytest
import torch

from fastlab.ops import attention, attention_ref, attention_varlen, attention_varlen_ref
from fastlab.ops._dispatch import backend
from fastlab.testing import assert_attention_close, assert_close, randn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

#: (query lengths, key lengths) of the packed batches: empty sequences, single tokens,
#: q_len > kv_len (causal rows that see nothing) and q_len < kv_len.
RAGGED = ([5, 0, 1, 19, 9, 3], [7, 4, 1, 19, 0, 11])


def _offsets(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32, device=DEVICE).cumsum(0).int()


def _tol_scale(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 2000.0 if ON_GPU else 4.0
    return 2.0


def _inputs(q_lens, k_lens, hq, hkv, d, dtype):
    q = randn((sum(q_lens), hq, d), dtype, DEVICE, seed=1, requires_grad=True)
    k = randn((sum(k_lens), hkv, d), dtype, DEVICE, seed=2, requires_grad=True)
    v = randn((sum(k_lens), hkv, d), dtype, DEVICE, seed=3, requires_grad=True)
    grad_out = randn(q.shape, dtype, DEVICE, seed=4)
    grad_lse = randn((hq, sum(q_lens)), torch.float32, DEVICE, seed=5)
    return q, k, v, grad_out, grad_lse


def _grads(out, lse, grad_out, grad_lse, leaves):
    # rows that see no key have lse = -inf; their LSE gradient is taken as 0
    loss = ((out.double() * grad_out.double()).sum()
            + (lse.nan_to_num(0.0, 0.0, 0.0).double() * grad_lse.double()).sum())
    return torch.autograd.grad(loss, leaves)


def _oracle(q, k, v, q_lens, k_lens, causal, scale=None, alibi_slopes=None, **options):
    """float64 output and LSE of each sequence alone, packed back: differentiable."""
    outs, lses = [], []
    qs, ks = q.split(q_lens), k.split(k_lens)
    for b, (qb, kb, vb) in enumerate(zip(qs, ks, v.split(k_lens))):
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            options["alibi_slopes"] = alibi_slopes[b]
        elif alibi_slopes is not None:
            options["alibi_slopes"] = alibi_slopes
        o, l = attention_ref(*(x.transpose(0, 1)[None] for x in (qb, kb, vb)), causal=causal,
                             scale=scale, return_lse=True, **options)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def _check_once(q_lens, k_lens, hq, hkv, d, causal, dtype, *, impl="kernel", scale=None,
                **options):
    """Forward, LSE and gradients against the float64 oracle. With dropout the oracle is
    the packed reference in float64 (its random numbers are those of sequence b)."""
    q, k, v, grad_out, grad_lse = _inputs(q_lens, k_lens, hq, hkv, d, dtype)
    cu_q, cu_k = _offsets(q_lens), _offsets(k_lens)
    with backend(impl):
        out, lse = attention_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens),
                                    causal=causal, scale=scale, return_lse=True, **options)
        got = (out, lse) + _grads(out, lse, grad_out, grad_lse, (q, k, v))
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    if options.get("dropout_p", 0.0) > 0:
        with backend("reference"):
            want_out, want_lse = attention_varlen(*exact, cu_q, cu_k, max(q_lens), max(k_lens),
                                                  causal=causal, scale=scale,
                                                  return_lse=True, **options)
    else:
        want_out, want_lse = _oracle(*exact, q_lens, k_lens, causal, scale, **options)
    want = (want_out, want_lse) + _grads(want_out, want_lse, grad_out, grad_lse, exact)

    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (hq, sum(q_lens)) and lse.dtype == torch.float32
    assert_attention_close(got, want, dtype, _tol_scale(dtype),
                           tf32=dtype == torch.float32 and ON_GPU)
    return got


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (3, 1)])
def test_reference_matches_each_sequence_alone(hq, hkv, causal):
    _check_once(*RAGGED, hq, hkv, 5, causal, torch.float32, impl="reference")


def test_equal_lengths_match_the_dense_op():
    q = randn((3, 2, 11, 8), torch.float32, DEVICE, seed=1)
    k = randn((3, 1, 13, 8), torch.float32, DEVICE, seed=2)
    v = randn((3, 1, 13, 8), torch.float32, DEVICE, seed=3)
    dense = attention_ref(q, k, v, causal=True)
    packed = [x.transpose(1, 2).reshape(-1, x.shape[1], 8) for x in (q, k, v)]
    got = attention_varlen_ref(*packed, _offsets([11] * 3), _offsets([13] * 3), 11, 13,
                               causal=True)
    torch.testing.assert_close(got, dense.transpose(1, 2).reshape(-1, 2, 8))


def test_reference_backward_gradcheck():
    q, k, v, _, _ = _inputs([3, 0, 4], [2, 3, 5], 2, 1, 3, torch.float64)
    cu_q, cu_k = _offsets([3, 0, 4]), _offsets([2, 3, 5])

    def fn(q, k, v):
        out, lse = attention_varlen(q, k, v, cu_q, cu_k, 4, 5, causal=True, return_lse=True)
        return out, lse.nan_to_num(0.0, 0.0, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def _bad(q_lens=(3, 2), k_lens=(4, 1), q_shape=None, dtype=torch.float32, cu_q=None,
         cu_k=None, max_q=None, max_k=None, **kwargs):
    q = torch.randn(q_shape or (sum(q_lens), 4, 8)).to(dtype)
    k = torch.randn(sum(k_lens), 2, 8).to(dtype)
    attention_varlen(q, k, k.clone(), _offsets(list(q_lens)) if cu_q is None else cu_q,
                     _offsets(list(k_lens)) if cu_k is None else cu_k,
                     max(q_lens) if max_q is None else max_q,
                     max(k_lens) if max_k is None else max_k, **kwargs)


@pytest.mark.parametrize("args,error,match", [
    (dict(cu_q=torch.tensor([0, 3, 5])), TypeError, "cu_seqlens_q must be int32"),
    (dict(cu_k=torch.tensor([0, 4, 5], dtype=torch.int32)[None]), ValueError,
     r"cu_seqlens_k must have shape \(batch \+ 1,\)"),
    (dict(cu_q=torch.tensor([0, 6, 5], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must be non-decreasing"),
    (dict(cu_q=torch.tensor([1, 3, 5], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q\[0\] must be 0"),
    (dict(cu_k=torch.tensor([0, 4, 4], dtype=torch.int32)), ValueError,
     r"cu_seqlens_k\[-1\] \(4\) must equal the number of tokens of k/v \(5\)"),
    (dict(cu_k=torch.tensor([0, 5], dtype=torch.int32)), ValueError,
     "cu_seqlens_q and cu_seqlens_k must have the same shape"),
    (dict(max_q=2), ValueError, r"max_seqlen_q \(2\) must be at least the longest"),
    (dict(max_k=3), ValueError, r"max_seqlen_k \(3\) must be at least the longest"),
    (dict(max_k=-1), ValueError, "max_seqlen_k must be a non-negative int"),
    (dict(max_q=2.5), ValueError, "max_seqlen_q must be a non-negative int"),
    (dict(q_shape=(5, 3, 8)), ValueError, "multiple of k/v heads"),
    (dict(q_shape=(1, 5, 4, 8)), ValueError, "q must be 3-D"),
    (dict(dtype=torch.int64), TypeError, "q must be float16"),
    (dict(scale=-1.0), ValueError, "scale must be a positive"),
    (dict(window=(1, -5)), ValueError, "window must be a pair"),
    (dict(alibi_slopes=torch.ones(3, 4)), ValueError, r"\(batch, heads\) = \(2, 4\)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
])
@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_bad_inputs(args, error, match, impl):
    with backend(impl), pytest.raises(error, match=match):
        _bad(**args)


def test_cpu_tensors_use_reference_by_default():
    q, k, v, _, _ = _inputs(*RAGGED, 2, 1, 8, torch.float32)
    cu_q, cu_k = _offsets(RAGGED[0]), _offsets(RAGGED[1])
    got = attention_varlen(q, k, v, cu_q, cu_k, 19, 19, causal=True)
    torch.testing.assert_close(got, attention_varlen_ref(q, k, v, cu_q, cu_k, 19, 19,
                                                         causal=True))


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_module_packed_input_matches_each_sequence_alone(impl):
    from fastlab.nn import Attention

    torch.manual_seed(0)
    layer = Attention(12, n_head=3, n_kv_head=1, causal=True).to(DEVICE)
    lengths = [4, 1, 0, 7]
    x = randn((sum(lengths), 12), torch.float32, DEVICE, seed=1, requires_grad=True)
    with backend(impl):
        got = layer(x, cu_seqlens=_offsets(lengths), max_seqlen=7)
        (dx,) = torch.autograd.grad(got.square().sum(), (x,))
    want = torch.cat([layer(xb[None])[0] for xb in x.split(lengths) if len(xb)])
    (dx_want,) = torch.autograd.grad(want.square().sum(), (x,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv,d", [(2, 2, 16), (3, 1, 5)])
def test_kernel_matches_each_sequence_alone(hq, hkv, d, causal):
    _check_once(*RAGGED, hq, hkv, d, causal, torch.float32)


def _slopes(*shape):
    return torch.rand(shape, generator=torch.Generator().manual_seed(7)).to(DEVICE) * 0.5


@pytest.mark.parametrize("causal,window", [(True, (4, -1)), (False, (3, 2)), (False, (0, -1))])
def test_kernel_sliding_window(causal, window):
    _check_once(*RAGGED, 2, 1, 16, causal, torch.float32, window=window)


def test_kernel_softcap_and_alibi():
    _check_once(*RAGGED, 3, 1, 8, True, torch.float32, softcap=1.5,
                alibi_slopes=_slopes(len(RAGGED[0]), 3))
    _check_once(*RAGGED, 2, 2, 8, False, torch.float32, alibi_slopes=_slopes(2))


def test_kernel_dropout_with_every_option():
    _check_once(*RAGGED, 2, 1, 16, True, torch.float32, window=(6, -1), softcap=2.0,
                alibi_slopes=_slopes(2), dropout_p=0.2, dropout_seed=11)


def test_dropout_numbers_follow_the_sequence_not_the_packing():
    """Sequence b of a packed batch drops what batch row b of the dense op drops."""
    q = randn((3, 2, 13, 16), torch.float32, DEVICE, seed=1)
    k = randn((3, 1, 13, 16), torch.float32, DEVICE, seed=2)
    v = randn((3, 1, 13, 16), torch.float32, DEVICE, seed=3)
    options = dict(causal=True, dropout_p=0.4, dropout_seed=3, dropout_offset=8)
    packed = [x.transpose(1, 2).reshape(-1, x.shape[1], 16) for x in (q, k, v)]
    with backend("kernel"):
        dense = attention(q, k, v, **options)
        got = attention_varlen(*packed, _offsets([13] * 3), _offsets([13] * 3), 13, 13,
                               **options)
    torch.testing.assert_close(got, dense.transpose(1, 2).reshape(-1, 2, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_low_precision(dtype):
    _check_once(*RAGGED, 4, 2, 24, True, dtype)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_opcheck(impl):
    q, k, v, _, _ = _inputs([5, 0, 9], [3, 6, 9], 2, 1, 16, torch.float32)
    cu_q, cu_k = _offsets([5, 0, 9]), _offsets([3, 6, 9])
    args = (None, cu_q, cu_k, None, 9, 9, True, 0.25, -1, -1, 0.0, 0.0, 0)
    with backend(impl):
        torch.library.opcheck(torch.ops.fastlab.attention_fwd.default, (q, k, v, *args))
        out, lse = torch.ops.fastlab.attention_fwd(q, k, v, *args)
        torch.library.opcheck(torch.ops.fastlab.attention_bwd.default,
                              (torch.randn_like(out), torch.randn_like(lse), q.detach(),
                               k.detach(), v.detach(), out.detach(), lse.detach(), *args))


def test_torch_compile_fullgraph():
    q, k, v, _, _ = _inputs(*RAGGED, 2, 1, 16, torch.float32)
    cu_q, cu_k = _offsets(RAGGED[0]), _offsets(RAGGED[1])

    def step(q, k, v):
        out, lse = attention_varlen(q, k, v, cu_q, cu_k, 19, 19, causal=True,
                                    return_lse=True)
        return out.square().sum() + lse.nan_to_num(0.0, 0.0, 0.0).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with backend("kernel"):
        eager = torch.autograd.grad(step(q, k, v), (q, k, v))
        traced = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------
# GPU: real sizes, offsets on the device (no host sync reads them)
# ---------------------------------------------------------------------------------------

def _gpu_lengths(n: int, longest: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, longest + 1, (n,), generator=g).tolist()
    lengths[0] = longest
    return lengths


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,longest,causal", [
    (8, 8, 128, 1024, True),
    (8, 2, 64, 777, True),
    (4, 4, 256, 300, False),
    (4, 1, 16, 129, True),
])
def test_gpu_real_sizes(hq, hkv, d, longest, causal, dtype):
    q_lens = _gpu_lengths(8, longest, 1)
    k_lens = _gpu_lengths(8, longest, 2) if not causal else q_lens
    _check_once(q_lens, k_lens, hq, hkv, d, causal, dtype)


@pytest.mark.gpu
def test_gpu_options():
    lengths = _gpu_lengths(8, 700, 3)
    _check_once(lengths, lengths, 8, 2, 64, True, torch.bfloat16, window=(128, -1),
                softcap=30.0, alibi_slopes=_slopes(8, 8), dropout_p=0.1, dropout_seed=2)
