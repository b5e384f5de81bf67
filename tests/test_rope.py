"""fastlab.ops.apply_rotary against Hugging Face's apply_rotary_pos_emb in float64.

Both paths (the Triton kernel under the interpreter, forced with backend("kernel"), and the
reference) with GQA head counts, odd sequence lengths and head dims of odd halves, the
(B, H, S, D) transposed views Llama's attention makes, and cos/sin of (B, S, D), (1, S, D)
and (S, D). Tolerances against float64: fp32 rtol 1e-5, atol 1e-6 of the largest value;
bf16 rtol 1e-2, atol 8e-3 of the largest value (one bf16 rounding of the result against
the reference path's three).
"""
import pytest
import torch

from fastlab.ops import apply_rotary, apply_rotary_ref, backend
from fastlab.testing import assert_close_to_max

TOLS = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 8e-3)}


pytestmark = pytest.mark.usefixtures("interpreter_only")


def _close(got, want, dtype, what):
    assert_close_to_max(got, want, *TOLS[dtype], what)


def _cos_sin(batch, seq, dim, layout, dtype, theta=10000.0):
    """Llama's cos and sin (both halves from one set of frequencies) at random positions."""
    positions = torch.randint(0, 50, (1 if layout != "batch" else batch, seq)).double()
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2).double() / dim)
    emb = torch.cat([positions[..., None] * inv_freq] * 2, dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    return (cos[0], sin[0]) if layout == "2d" else (cos, sin)


def _run(fn, q, k, cos, sin):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    qo, ko = fn(q, k, cos, sin)
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(t.shape, generator=g).to(t.device, t.dtype) for t in (qo, ko)]
    torch.autograd.backward((qo, ko), grads)
    return qo.detach(), ko.detach(), q.grad, k.grad


def _check_once(path, batch, heads, kv_heads, seq, dim, dtype, layout="batch",
                cos_dtype=None):
    # (B, S, H, D) projections seen through the transposed (B, H, S, D) views
    q = torch.randn(batch, seq, heads, dim).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, kv_heads, dim).to(dtype).transpose(1, 2)
    cos, sin = _cos_sin(batch, seq, dim, layout, cos_dtype or dtype)
    with backend(path):
        got = _run(apply_rotary, q, k, cos, sin)
    want = _run(apply_rotary_ref, q.double(), k.double(), cos.double(), sin.double())
    out_dtype = torch.promote_types(dtype, cos.dtype)
    assert got[0].dtype == got[1].dtype == out_dtype and got[2].dtype == q.dtype
    assert got[0].shape == q.shape and got[1].shape == k.shape
    check = torch.bfloat16 if torch.bfloat16 in (dtype, cos.dtype) else torch.float32
    for name, g, w in zip(("q", "k", "dq", "dk"), got, want):
        _close(g, w, check, name)


@pytest.mark.parametrize("shape", [(2, 6, 2, 7, 10), (1, 3, 3, 5, 64), (3, 4, 1, 1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_matches_float64(path, dtype, shape):
    _check_once(path, *shape, dtype)


@pytest.mark.parametrize("layout", ["shared", "2d"])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_cos_sin_shared_by_the_batch(path, layout):
    _check_once(path, 3, 4, 2, 9, 12, torch.float32, layout=layout)


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_bf16_q_fp32_cos_under_autocast(path):
    """Llama under autocast with fp32 weights: bf16 projections and fp32 cos/sin give fp32
    rotations, as Hugging Face's products do."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _check_once(path, 2, 4, 2, 7, 16, torch.bfloat16, cos_dtype=torch.float32)


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_seq_major_layout(path):
    """unsqueeze_dim=2: q and k as (B, S, H, D)."""
    q, k = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 2, 8)
    cos, sin = _cos_sin(2, 7, 8, "batch", torch.float32)
    with backend(path):
        qo, ko = apply_rotary(q, k, cos, sin, unsqueeze_dim=2)
    wq, wk = apply_rotary_ref(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    torch.testing.assert_close(qo, wq.transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ko, wk.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_only_q_feeds_the_loss():
    q = torch.randn(1, 2, 5, 6, requires_grad=True)
    k = torch.randn(1, 1, 5, 6, requires_grad=True)
    cos, sin = _cos_sin(1, 5, 6, "batch", torch.float32)
    for path in ("kernel", "reference"):
        with backend(path):
            dq, dk = torch.autograd.grad(apply_rotary(q, k, cos, sin)[0].sum(), (q, k),
                                         allow_unused=True)
        want = torch.autograd.grad(apply_rotary_ref(q, k, cos, sin)[0].sum(), q)[0]
        torch.testing.assert_close(dq, want, rtol=1e-6, atol=1e-6)
        assert dk is None or not dk.any()


def test_validation_errors_are_clear():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = _cos_sin(2, 5, 8, "batch", torch.float32)
    for fn in (apply_rotary, apply_rotary_ref):
        with pytest.raises(ValueError, match="head dim .* must be even, got 7"):
            fn(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
        with pytest.raises(ValueError, match="cos and sin must have shape"):
            fn(q, k, cos[:, :4], sin[:, :4])
        with pytest.raises(ValueError, match="k must match q's batch"):
            fn(q, k[:, :, :4], cos, sin)
        with pytest.raises(ValueError, match="q must be 4-D"):
            fn(q[0], k, cos, sin)
        with pytest.raises(ValueError, match="q and k must share a dtype"):
            fn(q, k.double(), cos, sin)
        with pytest.raises(ValueError, match="unsqueeze_dim must be"):
            fn(q, k, cos, sin, unsqueeze_dim=0)
        with pytest.raises(ValueError, match="must not require grad"):
            fn(q, k, cos.requires_grad_(), sin)
        cos.requires_grad_(False)


def test_compiles_without_graph_breaks():
    q = torch.randn(2, 4, 5, 8, requires_grad=True)
    k = torch.randn(2, 2, 5, 8, requires_grad=True)
    cos, sin = _cos_sin(2, 5, 8, "shared", torch.float32)

    def loss(fn, a, b):
        qo, ko = fn(a, b, cos, sin)
        return qo.square().sum() + (ko * 3).sum()

    compiled = torch.compile(lambda a, b: loss(apply_rotary, a, b), backend="aot_eager",
                             fullgraph=True)
    got = torch.autograd.grad(compiled(q, k), (q, k))
    want = torch.autograd.grad(loss(apply_rotary_ref, q, k), (q, k))
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_opcheck():
    from fastlab.ops.rope import _rope_fwd

    cos, sin = _cos_sin(2, 5, 8, "batch", torch.float32)
    q = torch.randn(2, 5, 4, 8).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 2, 5, 8, requires_grad=True)
    torch.library.opcheck(_rope_fwd.op, (q, k, cos, sin))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_sizes_against_float64(dtype):
    batch, heads, kv_heads, seq, dim = 2, 32, 8, 2048, 64
    q = torch.randn(batch, seq, heads, dim).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, kv_heads, dim).to(dtype).transpose(1, 2)
    cos, sin = _cos_sin(batch, seq, dim, "batch", dtype)
    got = [t.cpu() for t in _run(apply_rotary, q.cuda(), k.cuda(), cos.cuda(), sin.cuda())]
    want = _run(apply_rotary_ref, q.double(), k.double(), cos.double(), sin.double())
    for name, g, w in zip(("q", "k", "dq", "dk"), got, want):
        _close(g, w, dtype, name)
