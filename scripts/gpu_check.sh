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
stamp tests
timeout "${TESTS_TIMEOUT:-240}" "$py" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$out/tests.txt"
stamp repeat
# does one GPU repeat a run's bits? adamatch (the default), 30 steps twice, with each attention kernel (REPEAT=0 skips it)
[ "${REPEAT:-1}" = 0 ] || timeout 120 "$py" - <<'PY' 2>&1 | tee "$out/repeat.txt"
import os, sys
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, "tests")
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from conftest import CLASSES, colour_images, tiny_train_config
from udaflow import engine
from udaflow.data.datasets import LabelledImages, UnlabelledImages
from udaflow.methods import create_method
from udaflow.models import build_classifier
xs, ys = colour_images(60, seed=0); xt, _ = colour_images(60, seed=1, shift=20.0)
src, tgt = LabelledImages(xs, ys, CLASSES, "src"), UnlabelledImages(xt, "tgt")
def run():
    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_micro", 3)
    cfg = tiny_train_config(device="cuda", rotation_weight=0.5, num_threads=None)
    return engine.train(clf, create_method("adamatch", clf, {}, None), src, tgt, cfg, steps=30, lr=3e-3, seed=0, auxiliary=True).last_state
for name, backends in (("default", None), ("math", [SDPBackend.MATH]), ("flash", [SDPBackend.FLASH_ATTENTION]),
                       ("efficient", [SDPBackend.EFFICIENT_ATTENTION]), ("cudnn", [SDPBackend.CUDNN_ATTENTION])):
    try:
        if backends is None:
            a, b = run(), run()
        else:
            with sdpa_kernel(backends):
                a, b = run(), run()
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        print(f"sdpa {name}: two runs differ by at most {diff:.3g}", flush=True)
    except Exception as exc:
        print(f"sdpa {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
PY
stamp step
timeout "${STEP_TIMEOUT:-300}" "$py" scripts/gpu_step.py ${STEP_ARGS:-} --out "$out/gpu_step.json" 2>&1 | tee "$out/step.txt"
stamp bench
timeout "${BENCH_TIMEOUT:-420}" "$py" -m udaflow.cli bench --device cuda --shifts synth:mnist --methods source_only,adamatch --seeds 1 \
  --profile quick --set work_dir=/tmp/udaflow-gpu-runs --out "$out/bench_gpu.json" 2>&1 | tee "$out/bench.txt"
stamp seeds
# the default method over SEEDS seeds, SEEDS cells at once on the one GPU (SEEDS=0 skips it)
[ "${SEEDS:-0}" -lt 2 ] || timeout "${SEEDS_TIMEOUT:-300}" "$py" -m udaflow.cli bench --device cuda --shifts synth:mnist --methods adamatch \
  --seeds "$SEEDS" --jobs "$SEEDS" --profile quick --set work_dir=/tmp/udaflow-gpu-runs --out "$out/bench_seeds.json" 2>&1 | tee "$out/seeds.txt"
stamp done
