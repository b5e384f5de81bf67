"""The attention kernels compile for an sm90 GPU, from the CPU: the interpreter runs the
kernels' Python, not Triton's compiler, so code only the compiler rejects (a return inside
a constexpr branch, a type clash between branches) would otherwise reach the GPU first.
tests/_compile_sm90.py records the launches of a forward and backward and compiles each
at its widest kept tile."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("case", ["causal", "options", "wide"])
def test_attention_kernels_compile_for_sm90(case):
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, os.path.join(HERE, "_compile_sm90.py"), case],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = [line for line in run.stdout.splitlines() if line.startswith("compiled ")]
    names = sorted(line.split()[1] for line in compiled)
    assert names == ["_bwd_dkdv_kernel", "_bwd_dq_kernel", "_fwd_kernel"], run.stdout
