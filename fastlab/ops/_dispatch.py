"""Which implementation an op runs: the Triton/CUDA kernel or the plain-PyTorch reference.

Rule (DESIGN.md): CUDA tensors use the kernel, CPU tensors use the reference. Tests force
either side with :func:`backend` (or the ``FASTLAB_BACKEND`` environment variable), e.g. to
run the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``.
"""
import contextlib
import functools
import os
import threading

import torch

_BACKENDS = ("auto", "kernel", "reference")
_state = threading.local()


def _current() -> str:
    value = getattr(_state, "backend", None) or os.environ.get("FASTLAB_BACKEND", "auto")
    if value not in _BACKENDS:
        raise ValueError(f"FASTLAB_BACKEND must be one of {_BACKENDS}, got {value!r}")
    return value


@contextlib.contextmanager
def backend(name: str):
    """Force ``"kernel"`` or ``"reference"`` (or restore ``"auto"``) inside the block."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    previous = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


def reference_forced() -> bool:
    """True inside ``backend("reference")`` (or with FASTLAB_BACKEND=reference)."""
    return _current() == "reference"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run for these tensors.

    ``auto``: CUDA tensors with Triton installed. ``kernel``: always (CPU tensors need
    ``TRITON_INTERPRET=1``). ``reference``: never.
    """
    mode = _current()
    if mode == "reference":
        return False
    if mode == "kernel":
        if not triton_available():
            raise RuntimeError("backend 'kernel' was forced but triton is not installed")
        on_cpu = any(t.device.type == "cpu" for t in tensors)
        if on_cpu and not interpreting():
            raise RuntimeError(
                "backend 'kernel' on CPU tensors needs TRITON_INTERPRET=1 set before "
                "triton is imported"
            )
        return True
    return triton_available() and all(t.is_cuda for t in tensors)


def eager(*args) -> bool:
    """True outside ``torch.compile`` when no argument is a tensor subclass (fake,
    functional): there an op's Python body may run without the ``torch.library`` dispatcher.
    """
    return not torch.compiler.is_compiling() and all(
        not isinstance(a, torch.Tensor) or type(a) in (torch.Tensor, torch.nn.Parameter)
        for a in args)


def call_op(op, impl, *args):
    """Run a custom op's Python body ``impl`` directly in eager mode on plain tensors.

    Going through the ``torch.library`` dispatcher costs ~100 us of host time per call in
    eager mode, more than the GPU time of a small attention or a decode step. The op is
    only needed where its schema and fake kernel are: under ``torch.compile`` and with
    tensor subclasses; both run the same ``impl``.
    """
    return impl(*args) if eager(*args) else op(*args)
