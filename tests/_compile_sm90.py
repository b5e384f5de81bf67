"""Compile the attention kernels for an sm90 GPU without one: every launch the launchers
make for a set of calls is recorded (instead of run) and handed to Triton's compiler,
which runs to a cubin on the CPU. Catches what the interpreter cannot (code that only the
compiler rejects: constexpr rules, types, shared memory). Run with TRITON_INTERPRET=0:

    python tests/_compile_sm90.py CASE ...      (prints one line per compiled kernel)
"""
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import fastlab.kernels.attention as A
from fastlab.ops.attention import dropout_threshold

_DTYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
           torch.int32: "*i32", torch.int64: "*i64"}


def _signature(plain, args, constexprs):
    sig = {}
    for name, a in zip(plain.arg_names, args):
        if isinstance(a, torch.Tensor):
            sig[name] = _DTYPES[a.dtype]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            sig[name] = "i32" if -2 ** 31 <= a < 2 ** 31 else "i64"
        else:
            sig[name] = "fp32"
    for name in constexprs:
        sig[name] = "constexpr"
    return sig


def record(fn):
    """The launches ``fn()`` makes: (kernel, positional args, constexprs, candidates)."""
    launches = []

    def fake(tuned, plain, interpret_config, grid, key, *args, **kwargs):
        named = dict(zip(plain.arg_names, args), **kwargs)
        kept = A._keep(tuned.configs, named)
        launches.append((plain, args, kwargs, kept))
    real, A._launch = A._launch, fake
    try:
        fn()
    finally:
        A._launch = real
    return launches


def compile_all(launches, pick):
    """Compile each launch at the candidates ``pick`` selects from the kept ones."""
    for plain, args, kwargs, kept in launches:
        for config in pick(kept):
            constexprs = {**kwargs, **config.kwargs}
            src = ASTSource(fn=plain, signature=_signature(plain, args, constexprs),
                            constexprs=constexprs)
            t0 = time.time()
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=config.num_warps,
                                                   num_stages=config.num_stages))
            print(f"compiled {plain.fn.__name__} {config} shared "
                  f"{compiled.metadata.shared} B in {time.time() - t0:.1f}s", flush=True)


def _inputs(b, hq, hkv, s, d, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, s, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    return q, k, v


def _case(name):
    """The calls of one case: forward and backward through the launchers."""
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
        # the widest tile kept: the most registers and shared memory
        compile_all(record(_case(case)),
                    lambda kept: [max(kept, key=lambda c: (c.kwargs["BLOCK_M"]
                                                           * c.kwargs["BLOCK_N"],
                                                           c.num_stages))])
