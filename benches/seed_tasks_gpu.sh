#!/usr/bin/env bash
# The seed tasks' reference runs on one GPU: bash benches/seed_tasks_gpu.sh OUT_DIR
# Trains every configs/ file of the addition, copy and thinker results (several small runs
# share the GPU at once), the thinker sweep n_latent {4, 8} x n_step {1, 2, 4}, then writes
# OUT_DIR/seed_tasks.json (per run: config, eval curve, first step and time at each
# threshold, summary) and the sweep's heat map.
set -uo pipefail
out=${1:?usage: seed_tasks_gpu.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
runs=$out/runs
mkdir -p "$runs"
common=(log.out_dir="$runs" log.progress=false)
train() { timeout "${RUN_LIMIT:-240}" python3 -m fastlab.train "$@" "${common[@]}" > "$runs/$name.log" 2>&1; echo "$name rc=$?"; }
name=addition_5digit train configs/addition_5digit.toml log.name=addition_5digit &
name=addition_base16_thinker train configs/addition_base16_thinker.toml log.name=addition_base16_thinker &
name=copy_gpt_dynamic train configs/copy.toml log.name=copy_gpt_dynamic &
name=copy_gpt_none train configs/copy_nocurriculum.toml log.name=copy_gpt_none &
name=copy_thinker_dynamic train configs/copy.toml model.arch=thinker log.name=copy_thinker_dynamic &
name=copy_thinker_none train configs/copy_nocurriculum.toml model.arch=thinker log.name=copy_thinker_none &
wait
timeout "${SWEEP_LIMIT:-200}" python3 -m fastlab.sweep configs/thinker_sweep.toml model.n_latent=4,8 model.n_step=1,2,4 \
  --metric exact_match --parallel 6 "${common[@]}" log.name=thinker_sweep > "$runs/sweep.log" 2>&1
echo "sweep rc=$?"
python3 benches/collect_runs.py "$runs" "$out/seed_tasks.json"
cp "$runs/thinker_sweep/heatmap.png" "$out/thinker_sweep_heatmap.png" 2>/dev/null
cp "$runs/thinker_sweep/results.md" "$out/thinker_sweep_results.md" 2>/dev/null
