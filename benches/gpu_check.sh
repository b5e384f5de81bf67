#!/usr/bin/env bash
# Run on a GPU machine whose python3 already has CUDA torch, triton, pytest,
# pytest-benchmark and nvidia-ml-py:  bash benches/gpu_check.sh OUT_DIR [pytest -k expr]
# Installs fastlab (with the CUDA extension) into that python, runs the GPU tests and the
# benches, and writes logs and JSON into OUT_DIR.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [KEYWORDS]}
keywords=${2:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
kflag=()
[ -n "$keywords" ] && kflag=(-k "$keywords")

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} 2>&1 | tee "$out/env.txt"

FASTLAB_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1
status=$?
tail -5 "$out/install.log"
[ $status -eq 0 ] || { echo "install failed"; exit $status; }
python3 -c 'import fastlab, fastlab.kernels; print("fastlab", fastlab.__version__)'

python3 -m pytest tests -q -rs "${kflag[@]}" --junitxml="$out/tests.xml" 2>&1 | tee "$out/tests.log" | tail -40
tests_rc=${PIPESTATUS[0]}

python3 -m pytest benches -q -rs "${kflag[@]}" -p no:cacheprovider \
  --benchmark-timer benches._harness.cuda_timer --benchmark-min-rounds 5 \
  --benchmark-json "$out/pytest-benchmark.json" --fastlab-json "$out/benches.json" \
  2>&1 | tee "$out/benches.log" | tail -60
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc benches rc=$bench_rc"
exit $(( tests_rc != 0 ? tests_rc : bench_rc ))
