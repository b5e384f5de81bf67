#!/usr/bin/env bash
# `make bench` on a GPU machine: every bench into one folder and its REPORT.md.
#   bash benches/bench_all.sh [OUT_DIR]     (default benches/results/<gpu>-<date>)
# BENCH_PARTS picks what runs (default "kernels e2e extra"): kernels (the kernel benches
# against their peers through benches/gpu_check.sh; SKIP_TESTS=0 runs the GPU tests first),
# e2e (GPT-2 trained by the trainer against a nanoGPT-style loop, with profiles), extra
# (the hierarchical autoencoder and Hugging Face benches where their scripts exist).
# Parts run one after another into the same folder, so a machine with a time limit per
# command can run them as separate calls; the report renders whatever the folder holds.
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower())' 2>/dev/null || echo cpu)
out=${1:-benches/results/${gpu}-$(date +%F)}
parts=${BENCH_PARTS:-"kernels e2e extra"}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if ! python3 -c 'import fastlab._C' 2>/dev/null; then
  FASTLAB_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1 \
    || { tail -30 "$out/install.log"; echo "install failed"; exit 1; }
fi
rc=0
for part in $parts; do
  case $part in
    kernels) SKIP_TESTS=${SKIP_TESTS:-1} bash benches/gpu_check.sh "$out" || rc=1 ;;
    e2e) python3 benches/e2e_gpt2.py --out "$out" --profile --trace-dir "${TRACE_DIR:-$out}" 2>&1 | tee "$out/e2e.log" | tail -20
         [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    extra)
      if [ -f benches/hier_ae_throughput.py ]; then
        python3 benches/hier_ae_throughput.py --out "$out/hier_ae_throughput.json" 2>&1 | tail -10 || rc=1
      fi
      if [ -f benches/bench_hf_llama.py ]; then
        python3 benches/bench_hf_llama.py --out "$out/hf_llama.json" 2>&1 | tail -10 || rc=1
      fi ;;
    *) echo "unknown part $part (kernels, e2e, extra)"; exit 2 ;;
  esac
done
python3 benches/report.py "$out" || rc=1
exit $rc
