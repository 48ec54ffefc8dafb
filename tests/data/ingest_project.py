"""Helpers shared by the ingestion tests: a project laid out like this repository, and a snapshot of
everything a failed ingest must leave as it was."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from udaflow import versioning

REPO = Path(__file__).resolve().parents[2]


def make_project(root: Path) -> Path:
    """git + DVC + the repository's own .gitignore and a dvc.yaml whose stage outputs `data/raw/builtin`."""
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    versioning.init_repo(root)
    shutil.copyfile(REPO / ".gitignore", root / ".gitignore")
    (root / "dvc.yaml").write_text("stages:\n  build:\n    cmd: 'true'\n    outs:\n      - data/raw/builtin\n")
    (root / "data/raw").mkdir(parents=True)
    return root


def snapshot(project: Path) -> dict:
    """Everything a failed ingest must leave as it was: data/ (every file's bytes, staged copies
    included), the DVC cache, git's view of the work tree, dvc.lock."""
    def tree(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(project)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}

    git = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=project, capture_output=True, text=True, check=True).stdout
    return {"data": tree(project / "data"), "cache": tree(project / ".dvc/cache"), "git": git, "lock": tree(project / "dvc.lock")}


def leftovers(project: Path) -> list[str]:
    """Staged or moved-aside copies an ingest left under data/raw (`.<name>.ingesting`, `.<name>.previous`)."""
    return sorted(p.name for p in (project / "data/raw").iterdir() if p.name.startswith(".") and p.name != ".gitignore")


def write_png(path: Path, value: int, size: int = 16) -> Path:
    """A solid-colour RGB PNG; a distinct `value` gives a distinct file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), (value % 256, value // 256, 7), dtype=np.uint8)).save(path)
    return path


def image_folder(folder: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 6, offset: int = 0) -> Path:
    """A clean ImageFolder: `per_class` distinct 16x16 PNGs per class."""
    for i, label in enumerate(classes):
        for j in range(per_class):
            write_png(folder / label / f"{j}.png", offset + 20 * i + j)
    return folder
