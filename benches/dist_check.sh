#!/usr/bin/env bash
# Data parallelism on 2 GPUs against 1: bash benches/dist_check.sh OUT_DIR
#  1. the GPT preset (benches/gpt_dist.toml) on 1 GPU, then under torchrun on 2 GPUs with
#     DDP and with FSDP2, same global batch and seed;
#  2. cross world sizes: each run's directory is copied without its newest checkpoint and
#     resumed from the one before on the other world size (2 -> 1 for DDP and FSDP2,
#     1 -> 2 for both), so the resumed steps can be laid over the original run's;
#  3. benches/dist_compare.py: loss-curve differences, tokens/s, scaling efficiency -> JSON
#     and a plot.
# PRESET, STEPS, CKPT (checkpoint interval), EXTRA (more key=value) and RESUMES change the runs;
# a CPU dry run: EXTRA="train.device=cpu model.n_layer=1 ..." STEPS=10 CKPT=4.
set -uo pipefail
out=${1:?usage: dist_check.sh OUT_DIR}
mkdir -p "$out/runs"
out=$(cd "$out" && pwd)
runs=$out/runs
cd "$(dirname "$0")/.."
# NVLink multicast stays off in NCCL, PyTorch and NVSHMEM
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
python3 -c "import fastlab.kernels" || { echo "install fastlab first: pip install --no-build-isolation -e ."; exit 1; }
preset=${PRESET:-benches/gpt_dist.toml}
steps=${STEPS:-250}
ckpt=${CKPT:-100}
read -r -a extra <<< "${EXTRA:-}"

train() {  # NAME NPROC [key=value ...]
  local name=$1 nproc=$2
  shift 2
  local launch=(python3 -m fastlab.train)
  if [ "$nproc" -gt 1 ]; then
    launch=(python3 -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m fastlab.train)
  fi
  local t0=$SECONDS
  timeout "${RUN_TIMEOUT:-240}" "${launch[@]}" "$preset" log.out_dir="$runs" log.name="$name" \
    train.steps="$steps" checkpoint.every="$ckpt" checkpoint.keep=3 "${extra[@]}" "$@" \
    > "$runs/$name.log" 2>&1
  local rc=$?
  echo "$name nproc=$nproc rc=$rc wall=$((SECONDS - t0))s" | tee -a "$out/runs.txt"
  tail -3 "$runs/$name.log"
}

resume_elsewhere() {  # FROM NAME NPROC [key=value ...]: FROM's newest checkpoint dropped
  local from=$1 name=$2
  shift 2
  rm -rf "${runs:?}/$name"
  cp -r "$runs/$from" "$runs/$name"
  rm -f "$(ls "$runs/$name"/ckpt-*.pt | sort | tail -1)"
  train "$name" "$@"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl",
    ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-",
    "gpus", torch.cuda.device_count())'
  nvidia-smi topo -m; env | grep -E "NVLS|MULTICAST" | sort; } > "$out/env.txt" 2>&1
cat "$out/env.txt"

train single 1
train ddp 2 train.dist=ddp
train fsdp 2 train.dist=fsdp
# RESUMES picks the cross-world-size runs (default: all four)
for which in ${RESUMES:-ddp-to-1 fsdp-to-1 single-to-2ddp single-to-2fsdp}; do
  case $which in
    ddp-to-1) resume_elsewhere ddp ddp-to-1 1 ;;
    fsdp-to-1) resume_elsewhere fsdp fsdp-to-1 1 ;;
    single-to-2ddp) resume_elsewhere single single-to-2ddp 2 train.dist=ddp ;;
    single-to-2fsdp) resume_elsewhere single single-to-2fsdp 2 train.dist=fsdp ;;
    *) echo "unknown resume run $which" ;;
  esac
done

python3 benches/dist_compare.py "$runs" "$out/dist.json" --plot "$out/dist_loss.png" \
  2>&1 | tee "$out/dist_compare.txt"
tar -czf "$out/runs.tar.gz" --exclude='*.pt' -C "$out" runs && rm -rf "$runs"
