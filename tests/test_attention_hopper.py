"""kernels.attention_hopper: the Hopper TMA-descriptor kernels against the oracles.

On CPU the kernels run in Triton's interpreter (host tensor descriptors and
``warp_specialize`` both run there), called through their launchers directly, since
the op routes only sm_90 devices to them; checked against the float64
:func:`attention_ref` forward and backward on odd lengths, GQA, Sq != Skv, both
descriptor shapes and both ways of computing dQ. On an H200 (marker ``gpu``) the op is
checked at real sizes against float32 SDPA, and the Hopper path must have run.
"""
import pytest
import torch
import torch.nn.functional as F

from fastlab.kernels import attention_hopper as hopper
from fastlab.ops._dispatch import backend
from fastlab.ops.attention import attention, attention_ref
from fastlab.testing import assert_attention_close, randn

ON_GPU = torch.cuda.is_available()
IS_HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] == 9


def _qkv(batch, hq, hkv, q_len, kv_len, d, dtype, layout, device="cpu"):
    """q, k, v (B, H, S, D) in one of three layouts: contiguous, (B, S, H, D) seen as
    (B, H, S, D), or views of one (B, S, 3, H, D) projection (needs hq == hkv and
    q_len == kv_len)."""
    if layout == "qkv":
        qkv = randn((batch, q_len, 3, hq, d), dtype, device, seed=1)
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
    xs = []
    for seed, (h, n) in enumerate(((hq, q_len), (hkv, kv_len), (hkv, kv_len))):
        x = randn((batch, h, n, d), dtype, device, seed=seed + 1)
        if layout == "bshd":
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        xs.append(x)
    return tuple(xs)


def _check_once(batch, hq, hkv, q_len, kv_len, d, causal, dtype, *, layout="contiguous",
                flat=True, atomic=False, monkeypatch=None):
    monkeypatch.setattr(hopper, "FLAT_DESCRIPTORS", flat)
    monkeypatch.setattr(hopper, "DQ_ATOMIC", atomic)
    q, k, v = _qkv(batch, hq, hkv, q_len, kv_len, d, dtype, layout)
    scale = d ** -0.5
    out, lse = hopper.attention_forward(q, k, v, causal, scale)
    grad_out = randn(out.shape, dtype, seed=4)
    grad_lse = randn(lse.shape, torch.float32, seed=5)
    dq, dk, dv = hopper.attention_backward(grad_out, grad_lse, q, k, v, out, lse, causal,
                                           scale)

    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want_out, want_lse = attention_ref(*exact, causal=causal, scale=scale, return_lse=True)
    loss = ((want_out * grad_out.double()).sum()
            + (want_lse.nan_to_num(0.0, 0.0, 0.0) * grad_lse.double()).sum())
    want = (want_out, want_lse) + torch.autograd.grad(loss, exact)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype,) * 3
    assert_attention_close((out, lse, dq, dk, dv), want, dtype, 2.0, tf32=False)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,kv_len", [(48, 48), (37, 53), (53, 37)])
def test_matches_float64_reference(q_len, kv_len, causal, dtype, monkeypatch):
    _check_once(1, 2, 2, q_len, kv_len, 64, causal, dtype, monkeypatch=monkeypatch)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 1)])
def test_grouped_heads(hq, hkv, causal, monkeypatch):
    _check_once(2, hq, hkv, 37, 53, 64, causal, torch.bfloat16, monkeypatch=monkeypatch)


def test_head_dim_128(monkeypatch):
    _check_once(1, 2, 1, 21, 45, 128, True, torch.float16, monkeypatch=monkeypatch)


@pytest.mark.parametrize("layout", ["contiguous", "bshd", "qkv"])
@pytest.mark.parametrize("flat", [False, True])
def test_layouts_and_descriptor_shapes(layout, flat, monkeypatch):
    """Lengths that are multiples of the test tiles take flat descriptors when allowed;
    both shapes, on each layout (the qkv views are the GPT-2 projection's)."""
    _check_once(2, 2, 2, 64, 64, 64, True, torch.bfloat16, layout=layout, flat=flat,
                monkeypatch=monkeypatch)


def test_flat_descriptors_only_where_lengths_divide():
    q, k, v = _qkv(1, 2, 2, 64, 64, 64, torch.float32, "qkv")
    assert hopper._descriptors((q, k, v), (64, 64))[2]
    assert not hopper._descriptors((q, k, v), (64, 48))[2]
    strided = torch.empty(1, 2, 64, 128)[..., :64]  # rows 128 apart: no flat view
    assert hopper._flat_view(strided.transpose(1, 2).contiguous().transpose(1, 2)) is not None
    assert hopper._flat_view(strided)[1] == [128, 1]
    assert hopper._flat_view(torch.empty(4, 2, 64, 64)[::2]) is None  # batches apart


@pytest.mark.parametrize("causal", [False, True])
def test_atomic_dq(causal, monkeypatch):
    _check_once(2, 4, 2, 37, 53, 64, causal, torch.bfloat16, atomic=True,
                monkeypatch=monkeypatch)


def test_rows_without_keys_are_zero_not_nan(monkeypatch):
    q_len, kv_len = 45, 13
    out, lse, dq, _, _ = _check_once(1, 2, 2, q_len, kv_len, 64, True, torch.float32,
                                     monkeypatch=monkeypatch)
    empty = q_len - kv_len
    assert (out[:, :, :empty] == 0).all() and (dq[:, :, :empty] == 0).all()
    assert lse[:, :, :empty].isneginf().all() and lse[:, :, empty:].isfinite().all()


def test_not_covered_off_hopper():
    """CPU tensors, the interpreter, and the module switch keep the portable kernels."""
    q, k, v = _qkv(1, 2, 2, 48, 48, 64, torch.bfloat16, "contiguous")
    assert not hopper.covers(q, k, v)


# ----------------------------------------------------------------------------------------
# GPU: the op at real sizes
# ----------------------------------------------------------------------------------------

#: bf16 against float32 SDPA: O carries one bf16 rounding (2**-8 relative) plus P's;
#: gradients sum S terms of rounded products, so their bound is relative to their
#: largest value.
_OUT_TOL = dict(atol=2e-2, rtol=2e-2)
_GRAD_REL = 2e-2

_GPU_SHAPES = [(4, 16, 16, 4096, 4096, 128, "contiguous"), (8, 16, 16, 2048, 2048, 64, "contiguous"),
               (16, 16, 16, 1024, 1024, 64, "contiguous"), (16, 12, 12, 1024, 1024, 64, "qkv"),
               (2, 16, 4, 1000, 1500, 128, "contiguous"), (2, 8, 2, 1500, 700, 64, "bshd")]


def _sdpa_reference(q, k, v, causal):
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kk, vv = (x.repeat_interleave(group, dim=1) for x in (k32, v32))
    mask = None
    if causal:
        shift = k.shape[2] - q.shape[2]
        i = torch.arange(q.shape[2], device=q.device)[:, None]
        j = torch.arange(k.shape[2], device=q.device)[None, :]
        mask = j <= i + shift
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q32, kk, vv, attn_mask=mask)
    return out, (q32, k32, v32)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="gpu: the Hopper path needs an sm_90 device")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,hq,hkv,q_len,kv_len,d,layout", _GPU_SHAPES)
def test_gpu_real_sizes(b, hq, hkv, q_len, kv_len, d, layout, causal):
    if not causal and q_len > 2048:
        pytest.skip("one non-causal long case is enough")
    q, k, v = (x.requires_grad_() for x in _qkv(b, hq, hkv, q_len, kv_len, d,
                                                 torch.bfloat16, layout, "cuda"))
    grad_out = randn((b, hq, q_len, d), torch.bfloat16, "cuda", seed=4)
    before = dict(hopper.CALLS)
    with backend("kernel"):
        out, lse = attention(q, k, v, causal=causal, return_lse=True)
        out.backward(grad_out)
    assert hopper.CALLS["forward"] == before.get("forward", 0) + 1, "Hopper forward not taken"
    assert hopper.CALLS["backward"] == before.get("backward", 0) + 1, "Hopper backward not taken"

    want, exact = _sdpa_reference(q, k, v, causal)
    want.backward(grad_out.float())
    torch.testing.assert_close(out.float(), want, **_OUT_TOL)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float()[:, :1], exact[1][:, :1]) * d ** -0.5
    if causal:
        shift = kv_len - q_len
        i = torch.arange(q_len, device="cuda")[:, None]
        j = torch.arange(kv_len, device="cuda")[None, :]
        scores = scores.masked_fill(j > i + shift, float("-inf"))
    torch.testing.assert_close(lse[:, :1], torch.logsumexp(scores, -1), atol=1e-3, rtol=1e-4)
    for name, got, ref in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad),
                              (x.grad for x in exact)):
        atol = _GRAD_REL * float(ref.abs().max())
        torch.testing.assert_close(got.float(), ref, atol=atol, rtol=5e-2,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="gpu: the Hopper path needs an sm_90 device")
def test_gpu_same_as_portable_kernels(monkeypatch):
    """Hopper and portable kernels agree closely (same algorithm, different tiling), and
    the switch routes to the portable ones."""
    q, k, v = (x.requires_grad_() for x in _qkv(2, 12, 12, 1024, 1024, 64, torch.bfloat16,
                                                 "qkv", "cuda"))
    grad_out = randn((2, 12, 1024, 64), torch.bfloat16, "cuda", seed=4)
    results = []
    for on in (True, False):
        monkeypatch.setattr(hopper, "HOPPER", on)
        before = hopper.CALLS["forward"]
        with backend("kernel"):
            out, lse = attention(q, k, v, causal=True, return_lse=True)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        assert hopper.CALLS["forward"] == before + int(on)
        results.append((out, lse) + grads)
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2 * float(b.abs().max()),
                                   rtol=2e-2)
