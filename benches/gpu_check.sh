#!/usr/bin/env bash
# Run on a GPU machine whose python3 already has CUDA torch, triton, pytest,
# pytest-benchmark and nvidia-ml-py:
#   bash benches/gpu_check.sh OUT_DIR [BENCH_FILE ...]
# Installs fastlab (with the CUDA extension) into that python, runs the GPU tests (marker
# `gpu`) and the benches (all of benches/ unless files are named), and writes logs and JSON
# into OUT_DIR. SKIP_TESTS=1 runs the benches only.
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

tests_rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest tests -m gpu -v -rfs -p no:cacheprovider --junitxml="$out/tests.xml" 2>&1 \
    | tee "$out/tests.log" | tail -40
  tests_rc=${PIPESTATUS[0]}
fi

python3 -m pytest "${benches[@]}" -q -rs -p no:cacheprovider \
  --benchmark-timer benches._harness.cuda_timer --benchmark-min-rounds 5 \
  --benchmark-json "$out/pytest-benchmark.json" --fastlab-json "$out/benches.json" \
  2>&1 | tee "$out/benches.log" | tail -${BENCH_TAIL:-40}
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc benches rc=$bench_rc"
exit $(( tests_rc != 0 ? tests_rc : bench_rc ))
