"""The Triton kernels compile for an sm90 GPU, from the CPU: the interpreter runs the
kernels' Python, not Triton's compiler, so code only the compiler rejects (a return inside
a constexpr branch, a type clash between branches) would otherwise reach the GPU first.
tests/_compile_sm90.py records the launches of each case's forward and backward (or
optimizer step) and compiles them; each case must compile exactly the kernels listed."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ATTENTION = {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
CASES = {
    "causal": ATTENTION,
    "options": ATTENTION,
    "wide": ATTENTION,
    "rms_norm": {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"},
    "rope": {"_rope_kernel"},
    "swiglu": {"_swiglu_fwd_kernel", "_swiglu_bwd_kernel"},
    "cross_entropy": {"_count_valid_kernel", "_cross_entropy_kernel", "_reduce_rows_kernel",
                      "_scale_rows_kernel"},
    "kvcache": {"_append_kernel", "_kvcache_attention_kernel", "_merge_splits_kernel"},
    "adamw": {"_grad_sumsq_kernel", "_finalize_kernel", "_adamw_kernel"},
    # the bench-only warp-specialised Gluon forward (benches/attention_gluon_probe.py)
    "gluon_probe": {"_gluon_fwd"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernels_compile_for_sm90(case):
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, os.path.join(HERE, "_compile_sm90.py"), case],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    names = {line.split()[1] for line in run.stdout.splitlines()
             if line.startswith("compiled ")}
    assert names == CASES[case], run.stdout
