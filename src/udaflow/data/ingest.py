"""Import a user's image folder as a domain, all or nothing.

`<class>/<image>` (ImageFolder layout) gives a labelled domain; a flat folder of images gives an
unlabelled one (all rows `train`: an adaptation pool with no holdout). Files are copied under
data/raw/<name>/ with a manifest; the original folder is never modified.

`ingest_domain` is what `udaflow data ingest` runs: stage a copy beside the domain, validate it
(alone, and against a source when one is named), then swap it in and version it in DVC inside
`versioning.rollback_on_failure`, so any failure leaves data/, the pointers, the .gitignore files
and the DVC cache as they were.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from udaflow.data.manifest import IMAGE_SUFFIXES, MANIFEST_NAME, MAX_SIDE, DataError, describe_image, read_manifest, stratified_split, write_manifest

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
LAYOUT_HINT = "an ImageFolder has one sub-folder per class (<class>/<image>); a flat folder of images is an unlabelled target"


def check_domain_name(name: str) -> None:
    if not _NAME.match(name):
        raise DataError(f"domain name '{name}': use lower-case letters, digits, '-' and '_' (e.g. 'factory-b')")


def _images_under(folder: Path, root: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (and, `recursive`, in its sub-folders, as torchvision's ImageFolder reads a class)."""
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        resolved = path.resolve()
        if path.is_symlink() and not resolved.is_relative_to(root.resolve()):
            raise DataError(f"{path}: symlink points outside the dataset root ({resolved}); copy the file in instead")
        if path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))}); move it out of the folder")
            files.append(path)
        elif recursive and path.is_dir():
            files += _images_under(path, root, recursive=True)
    return files


def stage_folder(source: Path, name: str, data_root: Path, holdout_fraction: float = 0.2, seed: int = 0) -> Path:
    """Copy an ImageFolder (or flat folder) into data_root/.<name>.ingesting with a manifest; returns that folder.

    Nothing under data_root/<name> is touched: the caller validates the staged copy, then swaps it in.
    """
    check_domain_name(name)
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: not a directory", LAYOUT_HINT)
    class_dirs = [d for d in sorted(source.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    entries: list[tuple[Path, str]] = []
    if class_dirs:
        for d in class_dirs:
            files = _images_under(d, source, recursive=True)
            if not files:
                raise DataError(f"{d}: class '{d.name}' has no images", LAYOUT_HINT)
            entries += [(f, d.name, f.relative_to(d)) for f in files]
        stray = _images_under(source, source)
        if stray:
            raise DataError(f"{stray[0]}: image outside any class folder in an ImageFolder layout", LAYOUT_HINT)
    else:
        entries = [(f, "", Path(f.name)) for f in _images_under(source, source)]
    if not entries:
        raise DataError(f"{source}: no images found", LAYOUT_HINT)

    labelled = bool(class_dirs)
    splits = stratified_split([label for _, label, _ in entries], holdout_fraction, seed) if labelled else ["train"] * len(entries)
    staged = Path(data_root) / f".{name}.ingesting"
    shutil.rmtree(staged, ignore_errors=True)
    try:
        rows = []
        for (file, label, inside), split in zip(entries, splits):
            dest = staged / label / inside  # a class's sub-folders are kept: same-named files cannot collide
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, dest)
            row = describe_image(dest, staged, label, split, shown=file)
            if max(row.width, row.height) > MAX_SIDE:
                raise DataError(f"{file}: {row.width}x{row.height} px, over the {MAX_SIDE} px limit; refused from its header, not decoded")
            rows.append(row)
        write_manifest(staged, rows)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def ingest_folder(source: Path, name: str, data_root: Path, holdout_fraction: float = 0.2, seed: int = 0) -> Path:
    """Copy a folder in as data_root/name (replacing it), without validation or versioning: for fixtures and builders."""
    staged = stage_folder(source, name, data_root, holdout_fraction, seed)
    out = Path(data_root) / name
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staged, out)
    return out


@dataclass(frozen=True)
class Overlap:
    """Images of the ingested folder that another domain of the project holds too (same sha256)."""

    domain: str
    count: int
    examples: list[tuple[str, str]]  # (path in the new folder, path in `domain`)

    def describe(self, name: str) -> str:
        pairs = ", ".join(f"{a} = {self.domain}/{b}" for a, b in self.examples)
        return f"{self.count} image(s) of '{name}' are also in domain '{self.domain}' (e.g. {pairs}); a run pairing the two is refused"


def find_overlaps(staged: Path, data_root: Path, name: str, limit: int = 3) -> list[Overlap]:
    """Leakage against every other domain under data_root, by the manifests' checksums."""
    mine: dict[str, str] = {}
    for row in read_manifest(staged):
        mine.setdefault(row.sha256, row.path)
    found = []
    for other in sorted(Path(data_root).iterdir()):
        if other.name.startswith(".") or other.name == name or not (other / MANIFEST_NAME).is_file():
            continue
        shared = [(mine[r.sha256], r.path) for r in read_manifest(other) if r.sha256 in mine]
        if shared:
            found.append(Overlap(other.name, len(shared), shared[:limit]))
    return found


@dataclass(frozen=True)
class IngestResult:
    path: Path
    images: int
    labelled: bool
    validated_against: str | None  # the source the pairing checks ran against, if any
    md5: str = ""  # DVC hash of the domain now
    pointer: str = ""  # the git-tracked file recording it
    changed: bool = False  # a new DVC version
    replaced: str | None = None  # DVC hash of the content this ingest replaced
    replaced_in_git: bool = False  # git's HEAD holds the pointer to the replaced content
    overlaps: list[Overlap] = field(default_factory=list)


def ingest_domain(
    folder: Path, name: str, data_root: Path, *, source: str | None = None, replace: bool = False,
    holdout_fraction: float = 0.2, seed: int = 0, min_per_class: int = 5, report_dir: Path,
    progress: Callable[[str], None] = lambda _: None,
) -> IngestResult:
    """Validate `folder` and make it domain `name`, versioned in DVC; on any failure nothing changes.

    - The folder is validated alone (suite `udaflow.domain`); with `source`, also as a target of
      that source (its classes, leakage between the two: suites `udaflow.images`/`udaflow.classes`).
    - An existing domain is replaced only with `replace=True`; the same content again is no new
      version either way. Built-in domains (outputs of dvc.yaml stages) are never replaced here.
    - Overlap with any other domain of the project is reported in `overlaps` (a warning, not an error).
    """
    from udaflow import versioning
    from udaflow.data.expectations import validate_domain, validate_shift

    check_domain_name(name)
    data_root = Path(data_root)
    out = data_root / name
    if source is not None:
        if source == name:
            raise DataError(f"--source '{source}' is the domain being ingested: name another domain to check '{name}' against, or leave --source out")
        if not (data_root / source / MANIFEST_NAME).is_file():
            raise DataError(f"source domain '{source}' not found under {data_root}", "build it (`udaflow data build`) or ingest it first, or leave --source out")
    owner = versioning.tracked_by(out)  # a stage output may be listed in dvc.yaml before it is built
    if owner is not None and not owner.endswith(".dvc"):
        raise DataError(
            f"{out}: domain '{name}' is the output of dvc.yaml stage '{owner}' (`udaflow data build`), not a user folder",
            "ingest under another --name",
        )

    staged = stage_folder(folder, name, data_root, holdout_fraction, seed)
    try:
        rows = read_manifest(staged)
        labelled = any(r.label for r in rows)
        progress(f"staged {len(rows)} images ({'labelled' if labelled else 'unlabelled'}); validating")
        report = validate_domain(data_root, staged.name, Path(report_dir) / "domain")
        if report.success and source is not None:
            report = validate_shift(data_root, source, staged.name, Path(report_dir) / f"against-{source}", min_per_class)
        if not report.success:
            raise DataError(f"{folder}: {report.error().replace(staged.name, name)}")
        overlaps = find_overlaps(staged, data_root, name)

        same = out.is_dir() and (out / MANIFEST_NAME).is_file() and (out / MANIFEST_NAME).read_bytes() == (staged / MANIFEST_NAME).read_bytes()
        if out.exists() and not same and not replace:
            current = versioning.dataset_version(out)
            raise DataError(
                f"{out}: domain '{name}' already exists with other content"
                + (f" (DVC {current.md5}, recorded in {current.pointer})" if current else ""),
                "pass --replace to make this folder its new version (the current one stays in the DVC cache and remote), or pick a new --name",
            )
        previous = versioning.dataset_version(out) if out.exists() else None
        with versioning.rollback_on_failure(out):
            os.replace(staged, out)  # identical content too: DVC then records no new version
            progress("versioning with DVC and pushing to the default remote")
            recorded = versioning.version_dataset(out)
        replaced = previous.md5 if previous is not None and recorded.changed else None
        in_git = replaced is not None and versioning.committed_in_git(previous.pointer, replaced, versioning.find_root(out))
        return IngestResult(out, len(rows), labelled, source, recorded.md5, recorded.pointer, recorded.changed, replaced, in_git, overlaps)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
