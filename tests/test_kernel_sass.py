"""benches/kernel_sass.py on the CPU: it compiles the attention kernels as Triton's JIT does
for an sm90 GPU (arguments specialized: strides of 1 constant, 16-byte alignment known), so
its counts are those of the kernels Triton builds for the GPU from the same call. Checked at
the D128 tiles the autotuner picked on H100 and H200 for B4 H16 S4096 D128
(benches/results/h100-2026-12-06/passes.log)."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "benches", "kernel_sass.py")

TUNED_D128 = {"fwd": (64, 64, 4, 3), "dq": (128, 64, 8, 3), "dkdv": (64, 128, 8, 2)}
NAMES = {"fwd": "_fwd_kernel", "dq": "_bwd_dq_kernel", "dkdv": "_bwd_dkdv_kernel"}


def _run(*argv):
    # a process of its own: Triton's compiler, not the interpreter the other tests run
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, SCRIPT, *argv], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("sass") / "rows.json"
    tiles = [f"--tile={k}={','.join(map(str, t))}" for k, t in TUNED_D128.items()]
    run = _run("--shape", "1,2,1024,128", "--dtype", "bf16", *tiles, "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out) as f:
        return {r["kernel"]: r for r in json.load(f)["rows"]}


def test_the_tiles_asked_for_are_the_tiles_compiled(rows):
    assert set(rows) == set(NAMES.values())
    for key, (block_m, block_n, warps, stages) in TUNED_D128.items():
        r = rows[NAMES[key]]
        assert (tuple(r["block"]), r["warps"], r["stages"]) == ((block_m, block_n), warps,
                                                                 stages)


def test_compiled_as_the_gpu_compiles_them(rows):
    """With the JIT's specialization the tile loads are vectorized 16-byte async copies
    into shared memory, multi-buffered by the software pipeliner (without it, as a plain
    compile of the same source gives, every load is a scalar LDG and nothing is
    pipelined); the matmuls are wgmma (HGMMA)."""
    for name, r in rows.items():
        sass = r["sass"]
        assert sass.get("HGMMA", 0) > 0, name
        assert sass.get("LDGSTS", 0) > 0, f"{name}: no async copies, loads not pipelined"
        assert r["registers"] is not None and r["registers"] <= 255
    fwd = rows["_fwd_kernel"]
    assert fwd["stack_bytes"] == 0, "the D128 forward spills at its tuned tile"
    # K and V tiles (64 x 128 bf16, 16 KB each) three deep, and the query tile
    assert fwd["shared"] >= 3 * 2 * 64 * 128 * 2


def test_the_forward_issues_one_exponential_per_probability(rows):
    """The special-function unit's work: one MUFU.EX2 per score of the 64 x 64 tile (per
    thread: 4096 / 128 = 32) in each of the two unrolled key loops (masked and full), and
    one per row for each loop's rescale factor."""
    assert rows["_fwd_kernel"]["sass"]["MUFU.EX2"] == 2 * (64 * 64 // 128) + 4


@pytest.mark.parametrize("argv, message", [
    (["--tile", "fwd=64,64"], "--tile: want fwd=BLOCK_M,BLOCK_N,WARPS,STAGES"),
    (["--tile", "bwd=64,64,4,3"], "--tile: kernel must be one of"),
    (["--shape", "1,2,0,64"], "--shape: want four positive integers"),
    (["--tile", "fwd=48,64,4,3"], "--tile: (48, 64, 4, 3) is not a candidate of _fwd_kernel"),
])
def test_bad_options_fail_at_parse_time(argv, message):
    run = _run(*argv)
    assert run.returncode == 2
    assert "error:" in run.stderr and message in run.stderr, run.stderr
