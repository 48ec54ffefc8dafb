"""Does one GPU repeat a run's bits under train.deterministic, for every method? (README, "On a GPU")

Each method (params.yaml's options and pseudo-label filter, the default backbone, the rotation task) trains
`--steps` steps on the test suite's colour images twice in this process; the two runs' weights are compared
bit for bit. An operation torch has no deterministic CUDA kernel for fails the run (the engine switches
torch's deterministic algorithms on strictly on a GPU): that is reported, not hidden. Then the default
method's step time with train.deterministic on and off, to price the deterministic kernels.

usage, from the repo root with udaflow importable: python scripts/gpu_repeat.py [--steps 30] [--timed-steps 200]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call, as `udaflow` sets it
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
import yaml  # noqa: E402

from conftest import CLASSES, colour_images, tiny_train_config  # noqa: E402
from udaflow import engine  # noqa: E402
from udaflow.data.datasets import LabelledImages, UnlabelledImages  # noqa: E402
from udaflow.methods import create_method, get_method_class, list_methods  # noqa: E402
from udaflow.models import build_classifier  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--timed-steps", type=int, default=200)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script itself")
    args = parser.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    backbone, filters = params["model"]["backbone"], params["train"]["pseudo_labels"]
    xs, ys = colour_images(120, seed=0)
    xt, _ = colour_images(120, seed=1, shift=20.0)
    source, target = LabelledImages(xs, ys, CLASSES, "src"), UnlabelledImages(xt, "tgt")

    def run(name: str, steps: int, deterministic: bool = True):
        torch.manual_seed(0)
        clf = build_classifier(backbone, len(CLASSES))
        method = create_method(name, clf, params["methods"].get(name), filters)
        cfg = tiny_train_config(device=args.device, rotation_weight=params["train"]["rotation_weight"], num_threads=None,
                                deterministic=deterministic, batch_size=64, eval_every=max(10, steps // 4), checkpoint_every=10**6)
        return engine.train(clf, method, source, target, cfg, steps=steps, lr=3e-3, seed=0, auxiliary=True)

    print(f"backbone {backbone}, {args.steps} steps twice per method, batch 64, {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}", flush=True)
    failed = 0
    for name in list_methods():
        if get_method_class(name).uses_target_labels:
            continue
        try:
            a, b = run(name, args.steps).last_state, run(name, args.steps).last_state
            diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
            print(f"{name}: {'the same bits' if diff == 0 else f'two runs differ by up to {diff:.3g}'}", flush=True)
            failed += diff != 0
        except Exception as exc:  # noqa: BLE001 - reported per method
            failed += 1
            print(f"{name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    for deterministic in (True, False):
        result = run("adamatch", args.timed_steps, deterministic)
        print(f"adamatch, deterministic {deterministic}: {1000 * result.seconds / args.timed_steps:.1f} ms a step, "
              f"{result.images_per_s:.0f} img/s over {args.timed_steps} steps", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
