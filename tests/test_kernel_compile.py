"""Triton kernels compiled ahead of time for the H100/H200 (sm_90) on any machine: Triton's
own code generator and its bundled ptxas, no GPU. The interpreter runs the kernels' logic
on the CPU but never compiles them; this catches what only the compiler refuses (a type the
GPU path cannot lower, a constexpr branch that does not build) before a GPU run does.

The test suite runs under TRITON_INTERPRET=1, where ``@triton.jit`` builds interpreted
functions that cannot be compiled, so each case compiles in a child process without it."""
import os
import subprocess
import sys

import pytest
import triton

_PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = pytest.mark.skipif(not os.path.exists(_PTXAS),
                                reason="this Triton build carries no ptxas")


def _jit(kernel):
    """The JITFunction under autotune/heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _compile(kernel, arg_type, constexprs, num_warps=4):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit(kernel)
    signature = {name: "constexpr" if name in constexprs else arg_type(name)
                 for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs))
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps})


def _kvcache_type(name: str) -> str:
    if name in ("Q", "K_cache", "V_cache", "K_new", "V_new", "Out"):
        return "*bf16"
    if name in ("Lengths", "New_lens"):
        return "*i32"
    if name in ("Part_O", "Part_L", "Slopes"):
        return "*fp32"
    return "fp32" if name in ("qk_scale", "softcap_in", "softcap_out") else "i32"


def kvcache_attention(split: bool, window: bool, softcap: bool, alibi: bool) -> None:
    from fastlab.kernels import kvcache_attention as KA

    kernel = _compile(KA._kvcache_attention_kernel, _kvcache_type, dict(
        HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=64, CAUSAL=True, HAS_NEW=True,
        RAGGED_NEW=split, SPLIT=split, WINDOW=window, SOFTCAP=softcap, ALIBI=alibi))
    assert kernel.asm["cubin"]


def _ce_type(name: str) -> str:
    if name in ("logits_ptr", "grad_ptr"):
        return "*bf16"
    if name == "target_ptr":
        return "*i64"
    if name in ("scale_ptr", "loss_ptr", "zloss_ptr"):
        return "*fp32"
    return "fp32" if name in ("label_smoothing", "z_loss") else "i32"


def cross_entropy(fast_exp: bool, single: bool) -> None:
    from fastlab.kernels import cross_entropy as CE

    cfg = CE.launch_config(4000 if single else 128256, 2, 16)
    kernel = _compile(CE._cross_entropy_kernel, _ce_type, dict(
        V=4000 if single else 128256, BLOCK_V=cfg["block_v"], SINGLE_BLOCK=single,
        WRITE_GRAD=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, LANES=False, UNROLL=1,
        FAST_EXP=fast_exp), num_warps=cfg["warps"])
    assert kernel.asm["cubin"]


CASES = {
    **{f"kvcache-{name}-{'split' if split else 'one-pass'}":
       (kvcache_attention, (split, *flags))
       for split in (False, True)
       for name, flags in (("plain", (False, False, False)), ("all", (True, True, True)),
                           ("window", (True, False, False)))},
    **{f"cross_entropy-{'single' if single else 'streaming'}-{'fast' if fast else 'accurate'}":
       (cross_entropy, (fast, single)) for single in (True, False) for fast in (True, False)},
}


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == [f"compiled:{name}" for name in CASES], done.stdout


if __name__ == "__main__":
    for name, (build, args) in CASES.items():
        build(*args)
        print(f"compiled:{name}", flush=True)
