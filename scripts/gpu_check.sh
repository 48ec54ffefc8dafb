#!/usr/bin/env bash
# The GPU checks in one go (README, "On a GPU"): the CUDA tests, the step table at 224 px
# (scripts/gpu_step.py), the default method's bench cell on the GPU and, with SEEDS=3, its three seeds side by side.
# usage, from the repo root with udaflow importable and the built-in data built (make data):
#   scripts/gpu_check.sh OUTDIR
set -u -o pipefail
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1
start=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - start ))s"; }
stamp setup
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$out/gpu.txt"
# each stage runs under its *_TIMEOUT in seconds; 0 skips it
stage() { local name=$1 limit=$2; shift 2; stamp "$name"; [ "$limit" = 0 ] || timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"; }
stage tests "${TESTS_TIMEOUT:-240}" "$py" -m pytest -q -p no:cacheprovider tests/gpu
# does one GPU repeat every method's bits, and what do the deterministic kernels cost? (REPEAT=0 skips it)
stage repeat "$([ "${REPEAT:-1}" = 0 ] && echo 0 || echo "${REPEAT_TIMEOUT:-150}")" "$py" scripts/gpu_repeat.py
stage step "${STEP_TIMEOUT:-300}" "$py" scripts/gpu_step.py ${STEP_ARGS:-} --out "$out/gpu_step.json"
stage bench "${BENCH_TIMEOUT:-420}" "$py" -m udaflow.cli bench --device cuda --shifts synth:mnist --methods source_only,adamatch --seeds 1 \
  --profile quick --set work_dir=/tmp/udaflow-gpu-runs --out "$out/bench_gpu.json"
# the default method over SEEDS seeds, SEEDS cells at once on the one GPU (SEEDS=0 skips it)
stage seeds "$([ "${SEEDS:-0}" -lt 2 ] && echo 0 || echo "${SEEDS_TIMEOUT:-300}")" "$py" -m udaflow.cli bench --device cuda --shifts synth:mnist \
  --methods adamatch --seeds "${SEEDS:-0}" --jobs "${SEEDS:-1}" --profile quick --set work_dir=/tmp/udaflow-gpu-runs --out "$out/bench_seeds.json"
stamp done
