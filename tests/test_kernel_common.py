"""The shared kernel helpers run the same on the GPU and in the CPU interpreter."""
import pytest
import torch
import triton
import triton.language as tl

from fastlab.kernels._common import cast, dot, log1p
from fastlab.testing import randn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _log1p_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, log1p(tl.load(x_ptr + offs, mask=mask)), mask=mask)


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, cast(tl.load(x_ptr + offs, mask=mask), tl.bfloat16), mask=mask)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = dot(a, b, tl.zeros((M, N), dtype=tl.float32))
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


def test_log1p_matches_float64_across_magnitudes():
    x = torch.cat([torch.logspace(-30, 30, 301, dtype=torch.float64),
                   -torch.logspace(-30, -0.01, 101, dtype=torch.float64)])
    x32 = x.float().to(DEVICE)
    y = torch.empty_like(x32)
    _log1p_kernel[(triton.cdiv(x32.numel(), 128),)](x32, y, x32.numel(), BLOCK=128)
    expected = torch.log1p(x32.double().cpu())
    rel = ((y.double().cpu() - expected).abs() / expected.abs()).max().item()
    assert rel < 4e-7, f"max relative error {rel}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dot_accumulates_in_fp32(dtype):
    a = randn((16, 32), dtype, DEVICE, seed=1)
    b = randn((32, 16), dtype, DEVICE, seed=2)
    c = torch.empty(16, 16, device=DEVICE)
    _dot_kernel[(1,)](a, b, c, M=16, K=32, N=16)
    expected = a.double() @ b.double()
    # fp32 operands may go through tf32 on the GPU (10-bit mantissa)
    tol = 2e-2 if dtype == torch.float32 and DEVICE == "cuda" else 1e-4
    torch.testing.assert_close(c.double(), expected, rtol=tol, atol=tol)


def test_cast_to_bf16_rounds_to_nearest_even_like_torch():
    x = torch.cat([randn((1000,), torch.float32, DEVICE, seed=3) * 1e3,
                   torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, float("nan"), float("inf"),
                                 -float("inf"), 0.0, -0.0], device=DEVICE)])
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _cast_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256)
    nan = x.isnan()
    assert torch.equal(y[~nan], x[~nan].to(torch.bfloat16))
    assert y[nan].isnan().all()


def test_next_power_of_2_matches_triton():
    from fastlab.kernels._common import next_power_of_2

    for n in list(range(-3, 1100)) + [2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 3 * 2 ** 40]:
        assert next_power_of_2(n) == triton.next_power_of_2(max(n, 1)), n
