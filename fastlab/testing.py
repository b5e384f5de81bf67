"""Helpers to test an op against its reference: per-dtype tolerances and fresh inputs.

Used by tests/ and by the GPU checks in benches/, so both judge an op the same way.
"""
from typing import Optional, Sequence, Tuple

import torch

#: (rtol, atol) per dtype for comparing an op with its reference computed in float64.
#: bf16 keeps 8 mantissa bits (2**-8 = 3.9e-3 relative per rounding), fp16 keeps 11.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> Tuple[float, float]:
    """(rtol, atol) for ``dtype``, both multiplied by ``scale`` (for long reductions)."""
    rtol, atol = TOLERANCES[dtype]
    return rtol * scale, atol * scale


def assert_close(actual, expected, dtype: Optional[torch.dtype] = None, scale: float = 1.0,
                 msg: str = "") -> None:
    """Compare ``actual`` with ``expected`` at the tolerance of ``dtype``.

    ``dtype`` defaults to ``actual``'s; ``expected`` may be of a higher precision (it is
    cast to ``actual``'s dtype for the comparison only through float64).
    """
    dtype = dtype or actual.dtype
    rtol, atol = tolerance(dtype, scale)
    torch.testing.assert_close(
        actual.double(), expected.to(actual.device).double(), rtol=rtol, atol=atol,
        equal_nan=True, msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def assert_close_to_max(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float,
                        what: str) -> None:
    """``got`` within ``rtol`` of ``want`` plus ``atol`` times the largest ``|want|``,
    compared in float64; ``what`` names the tensor in the message."""
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def assert_attention_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
                           dtype: torch.dtype, scale: float, tf32: bool) -> None:
    """Compare an attention's (out, lse, dq, dk, dv) with the float64 oracle's: no NaN,
    the LSE's rows without keys (-inf) in the same places, the rest at ``dtype``'s
    tolerance times ``scale``. ``tf32``: fp32 inputs ran TF32 tensor-core products, whose
    2**-11 relative error of the operands' magnitude makes a sum's error scale with the
    tensor's largest values, not each element's."""
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert not torch.isnan(a).any(), f"{name} has NaN"
        if name == "lse":
            assert torch.equal(a.isneginf(), b.isneginf()), "rows without keys differ"
            a, b = a.nan_to_num(0.0, 0.0, 0.0), b.nan_to_num(0.0, 0.0, 0.0)
            assert_close(a, b, torch.float32, scale=scale, msg=name)
        elif tf32:
            atol = 2e-3 * float(b.abs().max())
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-2, atol=atol,
                                       msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert_close(a, b, dtype, scale=scale, msg=name)


def make_generator(seed: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(shape: Sequence[int], dtype=torch.float32, device="cpu", seed: int = 0,
          scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    """Fresh normal samples (never zeros) drawn in float32 then cast, reproducible by seed."""
    g = make_generator(seed, device)
    x = torch.randn(tuple(shape), generator=g, device=device, dtype=torch.float32) * scale
    return x.to(dtype).requires_grad_(requires_grad)


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous layout (last dim strided by 2)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x.detach()
    out = wide[..., ::2]
    return out.requires_grad_(x.requires_grad)
