"""Shared fixtures for the unit and data tests.

The test machine has two CPU cores shared with other work: with torch's default of two intra-op
threads, tiny ops spend most of their time spinning on the contended cores (a 16-image micro-ViT
step went from ~15 ms to ~1.2 s), so every test runs torch on a single thread.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything
os.environ.pop("MLFLOW_TRACKING_URI", None)  # each test names its own store; a shell's shared server is not one

import pytest
import torch

torch.set_num_threads(1)

from udaflow.config import TrainConfig  # noqa: E402
from udaflow.data.datasets import LabelledImages, UnlabelledImages  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The files that hold a test marked slow run first, in their collected order, then the rest: `make
    test`'s workers (pytest-xdist, a file at a time) then start on the minutes-long end-to-end files and
    end on the second-long ones, instead of one worker finishing a 150 s file while the other waits."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort: the order within each group stays


CLASSES = ("a", "b", "c")
_COLOURS = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220]], dtype=torch.float32)


def colour_images(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy solid-colour 32x32 uint8 images, class i = colour i (i = index % 3): learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    img = _COLOURS[labels][:, :, None, None].expand(n, 3, 32, 32) + shift
    img = img + torch.randn(n, 3, 32, 32, generator=g) * 20.0
    return img.clamp(0, 255).round().to(torch.uint8), labels


class Killed(Exception):
    """Stands in for a kill -9 in the middle of a run."""


def fresh_method(name, options=None, kill_at_call=None, pseudo_labels=None):
    """A seeded micro-ViT classifier and `name`'s method on it; with `kill_at_call`, the method's forward
    raises Killed on that call (a run killed mid-step)."""
    from udaflow.methods import create_method
    from udaflow.models import build_classifier

    torch.manual_seed(0)
    clf = build_classifier("udaflow_vit_micro", 3)
    method = create_method(name, clf, options, pseudo_labels)
    if kill_at_call is not None:
        forward, calls = method.forward, [0]

        def dying_forward(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at_call:
                raise Killed(f"killed at forward call {calls[0]}")
            return forward(*args, **kwargs)

        method.forward = dying_forward
    return clf, method


@pytest.fixture(scope="session")
def tiny_shift() -> tuple[LabelledImages, UnlabelledImages, torch.Tensor]:
    """Labelled source (60 images), unlabelled shifted target (60 images) and the target's true labels."""
    xs, ys = colour_images(60, seed=0)
    xt, yt = colour_images(60, seed=1, shift=20.0)
    return LabelledImages(xs, ys, CLASSES, "src"), UnlabelledImages(xt, "tgt"), yt


def tiny_train_config(**overrides) -> TrainConfig:
    values = dict(
        batch_size=16, eval_every=10, checkpoint_every=10, warmup_steps=2, progress=False,
        lr=3e-3, adapt_lr=3e-3, device="cpu", num_threads=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture
def make_train_config():
    """Factory: the tiny TrainConfig every engine test uses, with keyword overrides."""
    return tiny_train_config


# --- projects for the pipeline tests: a temp git repo with DVC, tiny params, MLflow on temp SQLite ---

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def tiny_params(root) -> dict:
    """params.yaml for a fast pipeline: a micro ViT, tens of steps, everything under `root`."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=str(root / "data/raw"), synth_size=120)
    params["work_dir"] = str(root / "runs")
    params["tracking"] = {"uri": f"sqlite:///{root}/mlflow/mlflow.db", "artifact_root": str(root / "mlflow/artifacts")}
    params["model"]["backbone"] = "udaflow_vit_micro"
    params["train"].update(
        pretrain_steps=30, adapt_steps=12, eval_every=6, checkpoint_every=6, warmup_steps=3,
        batch_size=16, progress=False, num_threads=1,
    )
    params["methods"]["cdtrans"]["refresh_every"] = 6
    params["profiles"]["quick"]["train"] = {"pretrain_steps": 30, "adapt_steps": 12}
    return params


def make_project(root):
    """git init + dvc init + a local DVC remote + tiny params.yaml; returns root."""
    import subprocess

    import yaml

    from udaflow.versioning import init_repo

    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.email", "test@udaflow"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.name", "udaflow tests"], cwd=root, check=True)
    init_repo(root)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(root)))
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=root, check=True)
    return root


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for the whole session; it is slow to start."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from prefect.testing.utilities import prefect_test_harness

    from prefect.settings import PREFECT_API_URL

    from tasks import PRIVATE_API

    with prefect_test_harness(server_startup_timeout=180):
        os.environ[PRIVATE_API] = PREFECT_API_URL.value()  # the session's own, as udaflow's temporary server is a run's
        yield


@pytest.fixture(scope="session")
def new_project():
    """Factory fixture: new_project(path) makes a git + DVC project with tiny params there."""
    return make_project


def make_shift_project(root, scratch, target_size: int):
    """A project with `synth` (120 images) as source and `fonts-b` (another synth rendering, seed 5)
    ingested as target, both versioned in DVC."""
    from udaflow import versioning
    from udaflow.data.domains import build_domain
    from udaflow.data.ingest import ingest_folder

    make_project(root)
    raw = root / "data/raw"
    build_domain("synth", raw, seed=0, synth_size=120)
    versioning.version_dataset(raw / "synth")
    build_domain("synth", scratch, seed=5, synth_size=target_size)
    (scratch / "synth/manifest.csv").unlink()
    ingest_folder(scratch / "synth", "fonts-b", raw, 0.25, 0)
    versioning.version_dataset(raw / "fonts-b")
    return root


@pytest.fixture(scope="session")
def new_shift_project():
    """Factory fixture: new_shift_project(root, scratch, target_size) -> synth -> fonts-b project."""
    return make_shift_project
