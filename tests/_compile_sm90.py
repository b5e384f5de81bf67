"""Compile the Triton kernels for an sm90 GPU without one: every launch a set of calls
makes is recorded (instead of run) and handed to Triton's compiler, which runs to a cubin
on the CPU. Catches what the interpreter cannot (code that only the compiler rejects:
constexpr rules, types of branches). Run with TRITON_INTERPRET=0:

    python tests/_compile_sm90.py CASE ...      (prints one line per compiled kernel)

Every case records at Triton's own launch (``JITFunction.run``) and compiles with the
argument specialization Triton's JIT gives a GPU launch; an autotuned kernel compiles at
the widest tile its pruning keeps (the most registers and shared memory).
"""
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import JITFunction, create_function_from_signature

import fastlab.kernels.attention as A
from fastlab.ops.attention import dropout_threshold

TARGET = GPUTarget("cuda", 90, 32)

def _compile_one(fn, src, options):
    t0 = time.time()
    compiled = triton.compile(src, target=TARGET, options=options)
    print(f"compiled {fn.fn.__name__} warps {compiled.metadata.num_warps} stages "
          f"{compiled.metadata.num_stages} shared {compiled.metadata.shared} B in "
          f"{time.time() - t0:.1f}s", flush=True)
    return compiled


def _run_compiles(fn, *args, grid=None, warmup=None, **kwargs):
    """Stands in for JITFunction.run and compiles as it does for an sm90 GPU: Triton's own
    binder specializes the arguments (integers equal to 1 become constants; pointers and
    integers divisible by 16 are marked so). Without it loads are not vectorized and loops
    are not pipelined: not the kernel the GPU runs."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    source = GluonASTSource if fn.is_gluon() else ASTSource
    return _compile_one(fn, source(fn, signature, constexprs, attrs), options.__dict__)


def _autotuned_compiles(tuner, *args, **kwargs):
    """Stands in for Autotuner.run: the widest candidate its pruning keeps, remembered as
    the best (fastlab's attention launcher reads it)."""
    tuner.nargs = dict(zip(tuner.arg_names, args))  # what Autotuner.run sets for pruning
    configs = tuner.prune_configs(kwargs)
    tuner.best_config = max(configs, key=lambda c: (math.prod(c.kwargs.values()),
                                                    c.num_stages))
    tuner.fn.run(*args, **kwargs, **tuner.best_config.all_kwargs())


def record_triton(fn):
    """Run ``fn()`` with every Triton launch compiled for sm90 instead of run."""
    from fastlab.ops import _dispatch

    saved = (JITFunction.run, Autotuner.run, _dispatch.interpreting,
             torch.cuda.get_device_properties)
    JITFunction.run = _run_compiles
    Autotuner.run = _autotuned_compiles
    _dispatch.interpreting = lambda: True  # lets backend("kernel") take CPU tensors
    torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(
        multi_processor_count=132)
    try:
        with _dispatch.backend("kernel"):
            fn()
    finally:
        (JITFunction.run, Autotuner.run, _dispatch.interpreting,
         torch.cuda.get_device_properties) = saved


def _case(name):
    """Forward and backward of one op on small CPU inputs, through its kernel path."""
    import fastlab.ops as ops
    from fastlab.nn.kvcache import KVCache
    from fastlab.optim import AdamW

    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    def backward(*outs):
        torch.autograd.backward([o.float().sum() for o in outs])

    if name == "rms_norm":
        return lambda: backward(ops.rms_norm(rand(37, 200), rand(200)))
    if name == "rope":
        def run():
            cos, sin = torch.randn(2, 16, 32, generator=g).unbind(0)
            backward(*ops.apply_rotary(rand(2, 4, 16, 32), rand(2, 2, 16, 32), cos, sin))
        return run
    if name == "swiglu":
        return lambda: backward(ops.swiglu(rand(37, 96), rand(37, 96)))
    if name == "cross_entropy":
        def run():
            target = torch.randint(0, 1000, (37,), generator=g)
            backward(ops.cross_entropy(rand(37, 1000), target, z_loss=1e-4,
                                       label_smoothing=0.1))
            backward(ops.fused_linear_cross_entropy(rand(37, 64), rand(1000, 64), target))
        return run
    if name == "kvcache":
        def run():
            # a prefill appended to the cache, then one decode step over it (split keys)
            cache = KVCache(2, 2, 2048, 64, torch.bfloat16, "cpu")
            k, v = (torch.randn(2, 2, 1500, 64, generator=g).bfloat16() for _ in range(2))
            with torch.no_grad():
                cache.append(k, v)
                k, v = (torch.randn(2, 2, 1, 64, generator=g).bfloat16() for _ in range(2))
                ops.attention_with_kvcache(torch.randn(2, 4, 1, 64, generator=g).bfloat16(),
                                           cache, k, v)
        return run
    if name == "gluon_probe":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from benches.attention_gluon_probe import VARIANTS, gluon_attention

        def run():
            for d in (64, 128):
                q, k, v = _inputs(1, 2, 2, 256, d, torch.bfloat16)
                for variant in VARIANTS:
                    gluon_attention(q, k, v, True, *variant)
            gluon_attention(q, k, v, False, 128, 128, 2, 2, True)
            gluon_attention(q, k, v, False, 128, 128, 2, 1, True)
        return run
    if name == "adamw":
        def run():
            params = [torch.nn.Parameter(torch.randn(33, 7, generator=g)) for _ in range(3)]
            for p in params:
                p.grad = torch.randn_like(p)
            AdamW(params, lr=1e-3, max_grad_norm=1.0).step()
        return run
    return _attention_case(name)


def _inputs(b, hq, hkv, s, d, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, s, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    return q, k, v


def _attention_case(name):
    """Attention forward and backward through fastlab's launchers."""
    dtype = torch.bfloat16
    if name == "causal":
        q, k, v = _inputs(2, 4, 2, 1024, 64, dtype)
        opts = dict(kv_lens=None, causal=True, scale=0.125)
    elif name == "options":  # every option flag on, a padded head dim, key lengths
        q, k, v = _inputs(2, 4, 4, 300, 40, dtype)
        opts = dict(kv_lens=torch.tensor([300, 17]), causal=True, scale=0.2,
                    window=(64, -1), softcap=20.0, alibi_slopes=torch.rand(4),
                    dropout_p=0.1, dropout_key=3, dropout_threshold=dropout_threshold(0.1))
    elif name == "wide":  # int64 row offsets
        A._INT32_OFFSETS = 1
        q, k, v = _inputs(1, 2, 2, 512, 128, dtype)
        opts = dict(kv_lens=None, causal=False, scale=0.1)
    else:
        raise SystemExit(f"unknown case {name!r}")

    def run():
        out, lse = A.attention_forward(q, k, v, **opts)
        A.attention_backward(torch.randn_like(out), None, q, k, v, out, lse, **opts)
    return run


if __name__ == "__main__":
    for case in sys.argv[1:]:
        record_triton(_case(case))
