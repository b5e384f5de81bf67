#!/usr/bin/env bash
# Trainer checks on a GPU machine with many cores: bash benches/train_check.sh OUT_DIR
#  1. the default CPU run pinned to 2 cores (taskset), several seeds side by side on
#     disjoint core pairs, as the README states its accuracy and time on a 2-core CPU;
#  2. the default run on the GPU (progress line with NVML utilisation, phase times, MFU);
#  3. the default run with train.cuda_graphs=true;
#  4. a sweep of 4 small configs on the GPU with its heat map (SWEEP=0 skips it).
set -uo pipefail
out=${1:?usage: train_check.sh OUT_DIR}
mkdir -p "$out/runs"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
cpu_args=${CPU_ARGS:-}

pids=()
core=0
for seed in ${SEEDS:-0 1 2 3 4}; do
  ( /usr/bin/time -f "seed $seed wall %e s" env OMP_NUM_THREADS=2 CUDA_VISIBLE_DEVICES= \
      taskset -c $core,$((core + 1)) python3 -m fastlab.train train.device=cpu train.seed=$seed \
      log.out_dir="$out/runs" log.name=cpu-seed$seed $cpu_args > "$out/runs/cpu-seed$seed.log" 2>&1 ) &
  pids+=($!)
  core=$((core + 2))
done

python3 -m fastlab.train log.out_dir="$out/runs" log.name=gpu-default log.every=100 2>&1 \
  | tee "$out/runs/gpu-default.log" | tail -5
python3 -m fastlab.report "$out/runs/gpu-default"
# the same run with the step captured in CUDA graphs (launch-bound small models)
python3 -m fastlab.train log.out_dir="$out/runs" log.name=gpu-cuda-graphs log.every=100 \
  train.cuda_graphs=true 2>&1 | tee "$out/runs/gpu-cuda-graphs.log" | tail -5
python3 -m fastlab.report "$out/runs/gpu-cuda-graphs"
if [ "${SWEEP:-1}" = 1 ]; then
  python3 -m fastlab.sweep model.d_model=64,128 optim.lr=1e-3,3e-3 train.steps=600 \
    log.out_dir="$out/runs" log.name=sweep --parallel 4 2>&1 | tee "$out/runs/sweep.log"
fi

wait "${pids[@]}"
for seed in ${SEEDS:-0 1 2 3 4}; do
  grep -h "final\|wall" "$out/runs/cpu-seed$seed.log"
done | tee "$out/cpu_summary.txt"
tar -czf "$out/runs.tar.gz" --exclude='*.pt' --exclude=tb -C "$out" runs && rm -rf "$out/runs"
