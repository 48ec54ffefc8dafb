"""Import a user's image folder as a domain.

`<class>/<image>` (ImageFolder layout) gives a labelled domain; a flat folder of images gives an
unlabelled one (all rows `train`: an adaptation pool with no holdout). Files are copied under
data/raw/<name>/ with a manifest; the original folder is never modified.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

from udaflow.data.manifest import IMAGE_SUFFIXES, DataError, describe_image, stratified_split, write_manifest

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def check_domain_name(name: str) -> None:
    if not _NAME.match(name):
        raise DataError(f"domain name '{name}': use lower-case letters, digits, '-' and '_' (e.g. 'factory-b')")


def _images_under(folder: Path, root: Path) -> list[Path]:
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        resolved = path.resolve()
        if path.is_symlink() and not resolved.is_relative_to(root.resolve()):
            raise DataError(f"{path}: symlink points outside the dataset root ({resolved}); copy the file in instead")
        if path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})")
            files.append(path)
    return files


def ingest_folder(
    source: Path, name: str, data_root: Path, holdout_fraction: float = 0.2, seed: int = 0,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Copy an ImageFolder (or flat folder) into data_root/name with a manifest; returns the domain folder.

    The copy is staged beside the domain and `check(staged_folder)` (validation) runs on it first:
    if it raises, the staged copy is removed and data_root/name is left exactly as it was.
    """
    check_domain_name(name)
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: not a directory")
    class_dirs = [d for d in sorted(source.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    entries: list[tuple[Path, str]] = []
    if class_dirs:
        for d in class_dirs:
            files = _images_under(d, source)
            if not files:
                raise DataError(f"{d}: class '{d.name}' has no images")
            entries += [(f, d.name) for f in files]
        stray = _images_under(source, source)
        if stray:
            raise DataError(f"{stray[0]}: image outside any class folder in an ImageFolder layout")
    else:
        entries = [(f, "") for f in _images_under(source, source)]
    if not entries:
        raise DataError(f"{source}: no images found")

    labelled = bool(class_dirs)
    splits = stratified_split([label for _, label in entries], holdout_fraction, seed) if labelled else ["train"] * len(entries)
    out = Path(data_root) / name
    tmp = Path(data_root) / f".{name}.ingesting"
    if tmp.exists():
        shutil.rmtree(tmp)
    rows = []
    for (file, label), split in zip(entries, splits):
        rel = Path(label) / file.name if label else Path(file.name)
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, dest)
        rows.append(describe_image(dest, tmp, label, split))
    write_manifest(tmp, rows)
    if check is not None:
        try:
            check(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
