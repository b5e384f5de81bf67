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
    if torch.compiler.is_compiling():
        return False
    # a plain loop: a generator under all() costs twice the host time, on every op call
    for a in args:
        if isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TENSORS:
            return False
    return True


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _needs_grad(args) -> bool:
    if not torch.is_grad_enabled():
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return False


class Op:
    """One fastlab op: its ``torch.library`` op, fake kernel and autograd, and the eager
    fast path that runs its Python body without the dispatcher.

    Kinds (:func:`define_op`, :func:`extension_op`):

    * ``triton``: :func:`torch.library.triton_op`, whose body launches its kernels through
      :func:`fastlab.kernels._common.launch` (``wrap_triton``), so Inductor sees and
      schedules them. Under ``TRITON_INTERPRET=1`` an interpreted kernel cannot be traced
      (its launch would read fake tensors' data), so there it is a custom op instead.
    * ``custom``: :func:`torch.library.custom_op`, opaque to the compiler (bodies whose
      kernels are launched without ``wrap_triton``, and reference-only ops).
    * ``extension``: an op the C++ extension defines (schema and kernels); only its fake
      kernel and autograd are registered here.

    Calling the op: on plain tensors outside ``torch.compile`` the body runs directly
    (under an :class:`torch.autograd.Function` built from the same ``backward`` and
    ``setup_context`` when a gradient is wanted): the dispatcher costs ~100 us of host time
    per eager call, more than the GPU time of a small attention or a decode step. Under
    ``torch.compile`` and with tensor subclasses the call goes through the registered op.
    Ops that write into buffers (``mutates_args``) take no ``backward``: ``register_autograd``
    accepts functional ops only, so their callers wrap them in an ``autograd.Function``.
    """

    def __init__(self, name: str, impl, *, fake, mutates_args=(), kind: str = "custom",
                 backward=None, setup_context=None):
        if (backward is None) != (setup_context is None):
            raise ValueError(f"{name}: backward and setup_context go together")
        if backward is not None and mutates_args:
            raise ValueError(f"{name}: register_autograd accepts functional ops only")
        self.name = name
        self.kind = kind
        if kind == "extension":
            # the extension names the module of its fakes: extension_op's caller
            torch.library.register_fake(name, _stacklevel=3)(fake)
            self.op = getattr(torch.ops.fastlab, name.split("::")[1])
        elif kind in ("triton", "custom"):
            define = torch.library.triton_op if kind == "triton" else torch.library.custom_op
            self.op = define(name, impl, mutates_args=tuple(mutates_args))
            # the same fake for both kinds (triton_op would trace the body for it)
            self.op.register_fake(fake)
        else:
            raise ValueError(f"{name}: kind must be 'triton', 'custom' or 'extension', "
                             f"got {kind!r}")
        self._body = impl if kind != "triton" else _without_wrap_triton(impl)
        self._function = None
        if backward is not None:
            torch.library.register_autograd(name, backward, setup_context=setup_context)
            if impl is not None:
                self._function = _eager_function(name, impl, backward, setup_context)

    def __call__(self, *args):
        if self._body is None or not eager(*args):
            return self.op(*args)
        if self._function is not None and _needs_grad(args):
            return self._function.apply(*args)
        return self._body(*args)


def _without_wrap_triton(impl):
    """``impl`` with ``wrap_triton`` handing back the plain kernels, as the triton_op's own
    eager call does: on real tensors the traceable wrapper only adds host time."""
    from torch._library.triton import set_wrap_triton_enabled

    @functools.wraps(impl)
    def run(*args):
        with set_wrap_triton_enabled(False):
            return impl(*args)

    return run


def _eager_function(name: str, impl, backward, setup_context):
    """The eager path's autograd: the op's body with its registered backward."""

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name.split("::")[1], (torch.autograd.Function,),
                dict(forward=staticmethod(forward), backward=staticmethod(backward)))


def triton_op_supported() -> bool:
    """Whether a ``triton`` op is a ``torch.library.triton_op`` here (Triton installed and
    the kernels compiled, not interpreted)."""
    return triton_available() and not interpreting()


def define_op(name: str, *, fake, mutates_args=(), triton: bool = False, backward=None,
              setup_context=None):
    """Decorator: the op ``name`` ("fastlab::...") from its Python body, schema inferred
    from the body's annotations, as an :class:`Op`. ``triton=True``: the body launches
    Triton kernels through ``fastlab.kernels._common.launch`` (a ``triton_op`` where
    :func:`triton_op_supported`). ``backward``/``setup_context`` as for
    ``torch.library.register_autograd``."""
    kind = "triton" if triton and triton_op_supported() else "custom"

    def build(impl) -> Op:
        return Op(name, impl, fake=fake, mutates_args=mutates_args, kind=kind,
                  backward=backward, setup_context=setup_context)

    return build


def extension_op(name: str, *, fake, backward=None, setup_context=None) -> Op:
    """The :class:`Op` of ``name``, defined with its kernels by the C++ extension."""
    return Op(name, None, fake=fake, kind="extension", backward=backward,
              setup_context=setup_context)
