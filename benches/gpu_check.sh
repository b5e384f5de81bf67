#!/usr/bin/env bash
# Run on a GPU machine whose python3 already has CUDA torch, triton, pytest,
# pytest-benchmark and nvidia-ml-py:
#   bash benches/gpu_check.sh OUT_DIR [BENCH_FILE ...]
# Installs fastlab (with the CUDA extension) into that python, runs the GPU tests (marker
# `gpu`) and the benches (all of benches/ unless files are named), and writes logs and JSON
# into OUT_DIR. SKIP_TESTS=1 runs the benches only; TEST_FILES="tests/a.py ..." narrows
# the tests. On an H100 the GPU tests take ~6 minutes (autotuning at real sizes) and the
# benches 2-4 minutes per file group: split them over calls of under 10 minutes.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [BENCH_FILE ...]}
shift
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(benches)
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} 2>&1 | tee "$out/env.txt"

if ! python3 -c 'import torch, fastlab._C' 2>/dev/null; then
  FASTLAB_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1 \
    || { tail -30 "$out/install.log"; echo "install failed"; exit 1; }
fi
python3 -c 'import torch, fastlab, fastlab.kernels, fastlab._C; print("fastlab", fastlab.__version__)'

# One pytest process per test file: a crash in one file (a segfault in an extension, say)
# loses only that file's results. TEST_FILES picks files; SKIP_TESTS=1 runs benches only.
tests_rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  : > "$out/tests.log"
  for f in ${TEST_FILES:-tests/test_*.py}; do
    python3 -m pytest "$f" -m gpu -v -rfs -p no:cacheprovider >> "$out/tests.log" 2>&1
    echo "$f: rc=$? $(tail -1 "$out/tests.log")"
  done | tee "$out/tests_summary.txt"
  # rc 5: the file has no GPU tests (all deselected); anything else but 0 is a failure
  grep -Eq ": rc=([1-46-9]|[0-9]{2,})" "$out/tests_summary.txt" && tests_rc=1
fi

python3 -m pytest "${benches[@]}" -q -rs -p no:cacheprovider \
  --benchmark-timer benches._harness.cuda_timer --benchmark-min-rounds 5 \
  --benchmark-json "$out/pytest-benchmark.json" --fastlab-json "$out/benches.json" \
  2>&1 | tee "$out/benches.log" | tail -${BENCH_TAIL:-40}
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc benches rc=$bench_rc"
exit $(( tests_rc != 0 ? tests_rc : bench_rc ))
