"""A pretrained timm ViT from a local weights file, adapted at 64 px on a user's ImageFolders of
mixed-size RGB photos (PNG and JPEG), the way a user takes it: a fresh clone, `udaflow data ingest`,
`udaflow run` with `--set`. Nothing is downloaded: the test saves the weights file itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

RUN = [
    "run", "--source", "studio", "--target", "line-b", "--method", "dann",
    "--set", "model.backbone=vit_tiny_patch16_224", "--set", "model.backbone_args.img_size=64",
    "--set", "data.min_per_class=3", "--set", "train.pretrain_steps=6", "--set", "train.adapt_steps=6", "--set", "train.eval_every=3",
    "--set", "train.checkpoint_every=3", "--set", "train.warmup_steps=1", "--set", "train.batch_size=8", "--set", "train.num_threads=1",
]


def photos(root: Path, style: int, seed: int) -> Path:
    """Three classes of mixed-size RGB images (40-120 px a side), half PNG, half JPEG."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate([(220, 40, 40), (40, 200, 60), (50, 60, 230)]):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(12):
            w, h = (int(v) for v in rng.integers(40, 120, 2))
            a = np.full((h, w, 3), 30 if style == 0 else 200, np.uint8)
            a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = colour
            a = np.clip(a + rng.normal(0, 12 if style == 0 else 30, a.shape), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_pretrained_vit_from_a_file_on_mixed_size_photos_at_64px(tmp_path: Path):
    from safetensors.torch import save_file

    clone = tmp_path / "udaflow"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, "PREFECT_HOME": str(tmp_path / "prefect"),
           "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}

    def udaflow(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "udaflow"), *args], cwd=clone, env=env, capture_output=True, text=True, timeout=900)

    torch.manual_seed(0)
    weights = tmp_path / "vit_tiny_64.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0).state_dict().items()},
              str(weights))
    wrong = tmp_path / "vit_tiny_224.safetensors"  # the same model at 224 px: its position embedding does not fit 64 px
    save_file({k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict().items()}, str(wrong))
    shallow = tmp_path / "vit_tiny_64_depth6.safetensors"  # half the blocks: the rest would have trained from random values
    save_file({k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224", img_size=64, depth=6, num_classes=0).state_dict().items()},
              str(shallow))

    for name, style, extra in (("studio", 0, []), ("line-b", 1, ["--source", "studio"])):
        out = udaflow("data", "ingest", str(photos(tmp_path / name, style, seed=style)), "--name", name, *extra)
        assert out.returncode == 0, out.stdout + out.stderr

    # absent or ill-fitting weights: one clear line, exit 2, before anything runs
    for path, message in ((tmp_path / "absent.safetensors", "pretrained weights file not found (model.pretrained)"),
                          (wrong, "tensor 'pos_embed' has shape (1, 197, 192), backbone 'vit_tiny_patch16_224' expects (1, 17, 192)"),
                          (shallow, "72 of backbone 'vit_tiny_patch16_224''s 150 tensors are not in the file (first: 'blocks.6.norm1.weight'")):
        out = udaflow(*RUN, "--set", f"model.pretrained={path}")
        said = " ".join((out.stderr + out.stdout).split())
        assert out.returncode == 2 and message in said and "Traceback" not in out.stderr, out.stdout + out.stderr
        assert said.startswith(f"error: --set model.pretrained: {path}: ") and "hint: save the state_dict of timm.create_model" in said
    assert not (clone / "mlflow/mlflow.db").exists()  # nothing tracked or registered

    out = udaflow(*RUN, "--set", f"model.pretrained={weights}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "udaflow-studio-to-line-b v1 @challenger" in out.stdout
    # the backbone's timm config decides the input, not params.yaml's data.image_size (32)
    assert ("input: 64 px (bicubic resize of the shorter side to 71 px, centre crop), mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5), "
            "from timm's pretrained config of vit_tiny_patch16_224; data.image_size 32 not used") in " ".join(out.stdout.split()), out.stdout

    import mlflow

    from udaflow import tracking

    tracking.configure(f"sqlite:///{clone}/mlflow/mlflow.db", clone / "mlflow/artifacts")
    model = tracking.load_model("models:/udaflow-studio-to-line-b@challenger")  # rebuilt at 64 px from its config.json
    assert model.classes == ["class0", "class1", "class2"]
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3)
    run = mlflow.MlflowClient().get_run(tracking.latest_versions("udaflow-studio-to-line-b")[0].run_id)
    assert run.data.params["model.pretrained"] == str(weights)
    assert any(f.name.startswith("line-b-64px-") for f in (clone / "runs/cache/images").glob("*.u8"))  # decoded once at 64 px

    # the same file name, other weights: another source model, and the first run can no longer be reproduced from it
    import hashlib

    first = run.info.run_id
    assert run.data.tags["udaflow.pretrained_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0).state_dict().items()},
              str(weights))
    out = udaflow(*RUN, "--set", f"model.pretrained={weights}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reused" not in out.stdout.split("source model", 1)[1].splitlines()[0], out.stdout  # trained anew, not the cached one
    out = udaflow("reproduce", first)
    said = " ".join((out.stderr + out.stdout).split())
    assert out.returncode == 2 and said.startswith(f"error: run '{first}' started from other weights than {weights} holds now"), said
    assert not (clone / "runs/reproduce" / first).exists()  # refused before a dataset was restored
