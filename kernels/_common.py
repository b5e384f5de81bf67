"""Helpers shared by the Triton kernels.

Under ``TRITON_INTERPRET=1`` (how CPU CI runs the kernels) three things differ from the GPU:
``tl.dot`` on bfloat16 operands returns wrong values, an fp32 -> bfloat16 cast truncates
instead of rounding to nearest even, and libdevice functions do not run. The helpers here
keep one code path for both: :func:`dot` upcasts bfloat16 operands only when interpreting,
:func:`cast` rounds bfloat16 on the bits only when interpreting, and :func:`log1p` is built
from ``tl.log`` so it runs everywhere.
"""
import os

import torch
import triton
import triton.language as tl

#: True when Triton kernels run in the CPU interpreter rather than on a GPU.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET = tl.constexpr(INTERPRETING)


@triton.jit
def dot(a, b, acc):
    """``acc + a @ b`` with fp32 accumulation, correct under the interpreter for bf16."""
    if _INTERPRET:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounded to nearest even, as the GPU's cast does, also when interpreting."""
    if _INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)  # NaN stays a (quiet) NaN
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def log1p(x):
    """log(1 + x) accurate for tiny x (Kahan's trick: the rounding error of 1 + x cancels).

    With u = fl(1 + x), log(u) * x / (u - 1) is within a few ulps of log1p(x) for all
    x > -1; when u == 1 the answer is x itself.
    """
    u = 1.0 + x
    d = u - 1.0
    safe_d = tl.where(d == 0.0, 1.0, d)
    return tl.where(d == 0.0, x, tl.where(u == float("inf"), u, tl.log(u) * (x / safe_d)))


def launch(kernel):
    """``kernel`` as ``torch.library.wrap_triton`` wraps it, for launches inside a
    ``torch.library.triton_op``: traced, the launch becomes a node Inductor schedules; on
    real tensors it is the plain launch. Under the interpreter the kernel itself (an
    interpreted kernel cannot be traced, and ``wrap_triton`` takes only compiled ones)."""
    if INTERPRETING:
        return kernel
    return torch.library.wrap_triton(kernel)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= max(n, 1) (plain Python: ``triton.next_power_of_2`` goes
    through Triton's function wrapper, microseconds of host time per call)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, host side (``triton.cdiv`` has the same wrapper cost)."""
    return -(-a // b)
