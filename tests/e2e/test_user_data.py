"""A new user's own data, taken the way they take it: a fresh `git clone` of this repository (its real
.gitignore, dvc.yaml with stages, params.yaml, DVC remote), no built-in data, the `udaflow` command in
a subprocess. Ingest a labelled source and an unlabelled target under new names, run, reproduce,
then new target content (a new version), the same content (none), and a push that fails (no trace)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from udaflow.data.domains import build_domain

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# the real params.yaml, made small from the command line the way a user would try it first
SMALL = [
    "--set", "model.backbone=udaflow_vit_micro", "--set", "train.pretrain_steps=30", "--set", "train.adapt_steps=12",
    "--set", "train.eval_every=6", "--set", "train.checkpoint_every=6", "--set", "train.warmup_steps=3",
    "--set", "train.batch_size=16", "--set", "train.num_threads=1",
]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fresh") / "udaflow"
    subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    # each `udaflow run` starts Prefect's temporary server; keep it away from the session's harness
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**base, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")), "DO_NOT_TRACK": "1"}


@pytest.fixture(scope="module")
def user_folders(tmp_path_factory) -> dict[str, Path]:
    """What a user brings: a labelled ImageFolder, a flat folder of target images, and a later flat folder."""
    scratch = tmp_path_factory.mktemp("user-data")
    build_domain("synth", scratch / "labelled", seed=0, synth_size=120)
    (scratch / "labelled/synth/manifest.csv").unlink()
    out = {"labelled": scratch / "labelled/synth"}
    for key, seed in (("camera", 5), ("camera-v2", 11)):
        build_domain("synth", scratch / key, seed=seed, synth_size=60)
        flat = scratch / f"{key}-flat"
        flat.mkdir()
        for f in sorted((scratch / key / "synth").glob("*/*.png")):
            (flat / f"img-{f.parent.name}{f.stem}.png").write_bytes(f.read_bytes())
        out[key] = flat
    return out


def udaflow(clone: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "udaflow"), *args], cwd=clone, env=env, capture_output=True, text=True, timeout=900)


def git_status(clone: Path) -> list[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone, capture_output=True, text=True, check=True)
    return sorted(out.stdout.splitlines())


def state(clone: Path) -> tuple:
    """data/, the DVC cache and git's view: what a failed ingest must leave exactly as it was."""
    def files(folder: Path) -> list[tuple[str, int]]:
        return sorted((str(p.relative_to(clone)), p.stat().st_size) for p in folder.rglob("*")) if folder.exists() else []

    pointers = {p.name: p.read_text() for p in (clone / "data/raw").glob("*.dvc")}
    return files(clone / "data"), files(clone / ".dvc/cache"), git_status(clone), pointers


def test_bring_your_own_data_in_a_fresh_clone(clone: Path, env: dict, user_folders: dict[str, Path]):
    assert not (clone / "data/raw").exists()  # no built-in data: nothing but the user's own

    # a labelled source needs no other domain; the target is checked against it (classes, leakage)
    out = udaflow(clone, env, "data", "ingest", str(user_folders["labelled"]), "--name", "my-digits")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "120 labelled images" in out.stdout and "new version" in out.stdout
    out = udaflow(clone, env, "data", "ingest", str(user_folders["camera"]), "--name", "my-camera", "--source", "my-digits")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "60 unlabelled images" in out.stdout and "as a target of 'my-digits'" in out.stdout
    first_md5 = re.search(r"my-camera\.dvc -> ([0-9a-f]{32}\.dir)", out.stdout).group(1)

    dvc_status = subprocess.run([str(BIN / "dvc"), "status", "data/raw/my-digits.dvc", "data/raw/my-camera.dvc"], cwd=clone, capture_output=True, text=True)
    assert dvc_status.returncode == 0 and "up to date" in dvc_status.stdout, dvc_status.stdout + dvc_status.stderr
    assert any((clone / "dvc-remote").rglob("*.dir"))  # pushed to the project's default remote
    assert git_status(clone) == ["?? data/raw/my-camera.dvc", "?? data/raw/my-digits.dvc"]  # the pointers, no images

    out = udaflow(clone, env, "run", "--source", "my-digits", "--target", "my-camera", "--method", "dann", *SMALL)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "udaflow-my-digits-to-my-camera v1 @challenger" in out.stdout
    # progress a person can follow in a log: plain lines, through Prefect's print capture
    assert "pretrain my-digits: 30/30 steps (100%)" in out.stderr and "adapt dann: 12/12 steps (100%)" in out.stderr
    run_id = re.search(r"MLflow run id\W+([0-9a-f]{32})", out.stdout).group(1)
    # a run with --set is not what dvc.yaml describes: dvc.lock stays as committed
    assert git_status(clone) == ["?? data/raw/my-camera.dvc", "?? data/raw/my-digits.dvc"]

    out = udaflow(clone, env, "reproduce", run_id)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reproduced: identical metrics" in out.stdout

    subprocess.run(["git", "add", "data/raw"], cwd=clone, check=True)
    subprocess.run(["git", "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "my data"], cwd=clone, check=True)

    # new target content: refused without --replace, and a push that fails leaves no trace
    before = state(clone)
    out = udaflow(clone, env, "data", "ingest", str(user_folders["camera-v2"]), "--name", "my-camera")
    assert out.returncode == 2 and "already exists with other content" in out.stderr and "--replace" in out.stderr
    assert state(clone) == before
    blocker = clone.parent / "not-a-folder"
    blocker.write_text("")
    (clone / ".dvc/config.local").write_text(f"['remote \"local\"']\n    url = {blocker / 'remote'}\n")
    out = udaflow(clone, env, "data", "ingest", str(user_folders["camera-v2"]), "--name", "my-camera", "--replace")
    assert out.returncode == 2 and "could not push to the default DVC remote 'local'" in out.stderr, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "ImageFolder" not in out.stderr  # the hint fits the error
    assert state(clone) == before
    (clone / ".dvc/config.local").unlink()

    out = udaflow(clone, env, "data", "ingest", str(user_folders["camera-v2"]), "--name", "my-camera", "--replace")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "new version" in out.stdout and f"replaced version {first_md5}" in out.stdout
    assert "git checkout HEAD -- data/raw/my-camera.dvc" in out.stdout
    assert git_status(clone) == [" M data/raw/my-camera.dvc"]

    out = udaflow(clone, env, "data", "ingest", str(user_folders["camera-v2"]), "--name", "my-camera")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "unchanged" in out.stdout and "no retrain triggered" in out.stdout
    assert git_status(clone) == [" M data/raw/my-camera.dvc"]

    # back to the committed first version: said as such, not "new version"
    commit = subprocess.run(["git", "log", "-1", "--format=%h"], cwd=clone, capture_output=True, text=True, check=True).stdout.strip()
    out = udaflow(clone, env, "data", "ingest", str(user_folders["camera"]), "--name", "my-camera", "--replace")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"my-camera.dvc -> {first_md5} (an earlier version again, as commit {commit} recorded it;" in out.stdout, out.stdout
    assert git_status(clone) == [] and "record it in git" not in out.stdout  # HEAD's pointer again: nothing to commit
