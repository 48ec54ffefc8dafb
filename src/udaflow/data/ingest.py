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

import math
import os
import shutil
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from udaflow.data.manifest import DOMAIN_NAME, DOMAIN_NAME_RULE, IMAGE_SUFFIXES, MANIFEST_NAME, MAX_SIDE, DataError, describe_image, read_manifest, stratified_split, write_manifest
from udaflow.data.pixels import SKETCH, file_digest

SPLIT_ORDER = ("train", "val", "test")
LAYOUT_HINT = "an ImageFolder has one sub-folder per class (<class>/<image>); a flat folder of images is an unlabelled target"


def check_domain_name(name: str) -> None:
    if not DOMAIN_NAME.match(name):
        raise DataError(f"domain name '{name[:80]}{'...' if len(name) > 80 else ''}': use {DOMAIN_NAME_RULE} (e.g. 'factory-b')")


def shown(path: Path) -> str:
    """`path` as an error message can print it: undecodable bytes and control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(repr(c)[1:-1] if _breaks_lines(c) else c for c in text)


def _breaks_lines(c: str) -> bool:
    """A control character (line break, tab, escape, ...) or a Unicode line/paragraph separator."""
    return unicodedata.category(c) in ("Cc", "Zl", "Zp")


_RESERVED = {MANIFEST_NAME, MANIFEST_NAME + ".tmp"}  # what write_manifest puts at the domain's top
# what file managers, archivers and NAS boxes leave in a folder the user never put there: Windows' thumbnail
# caches and folder settings, macOS's zip resource forks (`__MACOSX/`) and the file Finder writes for a folder's
# custom icon ("Icon\r"), the thumbnails a Synology NAS keeps beside every photo (`@eaDir/`: smaller copies of
# the images, which leaked test images into training), a USB drive's Windows folders; skipped as hidden names
# are, compared case-blind
_OS_LITTER = {"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "__macosx", "@eadir",
              "$recycle.bin", "system volume information", "icon\r"}


def _skipped(path: Path) -> bool:
    """A hidden name (starting with '.') or one of the operating systems' litter: not the user's data."""
    return path.name.startswith(".") or path.name.lower() in _OS_LITTER


def _check_entry(path: Path, root: Path) -> Path:
    """Refuse a name or a link that ingestion cannot copy faithfully; returns the path's real target."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{shown(path)}: the name is not valid UTF-8; rename it") from None
    if any(_breaks_lines(c) for c in path.name):
        raise DataError(f"{shown(path)}: the name holds a control character (a line break, tab, ...); rename it")
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a link chain that loops ("Symlink loop from ...")
        raise DataError(f"{shown(path)}: symlink loop, it never reaches a file; remove it") from None
    if path.is_symlink():
        if not resolved.is_relative_to(root.resolve()):
            raise DataError(f"{shown(path)}: symlink points outside the dataset root ({shown(resolved)}); copy the file in instead")
        if not resolved.exists():
            raise DataError(f"{shown(path)}: broken symlink, its target {shown(resolved)} does not exist; remove it or copy the file in")
    return resolved


def _read_once(path: Path, resolved: Path, seen: dict[Path, Path]) -> None:
    """Refuse a folder reached a second time (through a symlink): a loop, or images read twice."""
    first = seen.setdefault(resolved, path)
    if first != path:
        raise DataError(f"{shown(path)}: the same folder as {shown(first)} (a symlink loop or a duplicate); remove the symlink")


def _images_under(folder: Path, root: Path, recursive: bool = False, seen: dict[Path, Path] | None = None) -> list[Path]:
    """Image files in `folder` (and, `recursive`, in its sub-folders, as torchvision's ImageFolder reads a class).

    Anything that cannot be copied as it is read is refused, naming it: a non-image file, a pipe or
    device, a name that is not valid UTF-8 or holds a control character, a symlink escaping `root`,
    a broken symlink, a folder reached twice through a symlink (a loop, or a class read twice).
    Hidden names (starting with '.') and the operating systems' and NAS's litter (`Thumbs.db`, `desktop.ini`,
    `__MACOSX/`, `@eaDir/`, ...: `_OS_LITTER`) are skipped.
    """
    seen = {} if seen is None else seen
    files = []
    for path in sorted(folder.iterdir()):
        if _skipped(path):
            continue
        resolved = _check_entry(path, root)
        if path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{shown(path)}: not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))}); move it out of the folder")
            files.append(path)
        elif path.is_dir():
            if recursive:
                _read_once(path, resolved, seen)
                files += _images_under(path, root, recursive=True, seen=seen)
        else:
            raise DataError(f"{shown(path)}: not a regular file or folder (a pipe, socket or device); remove it")
    return files


def _refusal_hint(folder: Path, staged: Path, rows: list, report, source: str | None) -> str | None:
    """What to do about a refused folder: the unreadable file, class folders the source lacks, or a source too thin to check against."""
    unreadable = _unreadable_hint(folder, staged, rows)
    first = report.failures[0]
    if unreadable is None and first.suite == "udaflow.classes":  # the source's own classes
        return "name another --source, or leave --source out to ingest the folder alone"
    if unreadable is None and (first.column, first.summary is not None) == ("label", True):  # the class folders the source lacks
        return (
            f"rename (or merge) the class folders under {shown(folder)} to the classes of source '{source}', "
            "or leave --source out to ingest the folder alone (a run pairing it with that source is refused the same way)"
        )
    if unreadable is None and first.column in ("width", "height"):  # GX names the expectation, not the limits
        from udaflow.data.expectations import MIN_SIDE

        small = [r for r in rows if min(r.width, r.height) < MIN_SIDE]
        if small:
            return (f"{shown(folder / small[0].path)} is {small[0].width}x{small[0].height} px: each side must be {MIN_SIDE}-{MAX_SIDE} px; "
                    f"remove or enlarge the {len(small)} image(s) under {MIN_SIDE} px and ingest again")
    return unreadable


def _unreadable_hint(folder: Path, staged: Path, rows: list) -> str | None:
    """For a refused folder with images PIL cannot decode: the first (the user's path) and why, how many more."""
    bad = [r.path for r in rows if not r.decodable]
    if not bad:
        return None
    more = f"; {len(bad) - 1} more cannot be decoded either (e.g. {', '.join(shown(folder / p) for p in bad[1:4])})" if len(bad) > 1 else ""
    return f"{shown(folder / bad[0])} is not a readable image ({_unreadable_reason(staged / bad[0])}){more}: fix or remove it and ingest again"


def _unreadable_reason(file: Path) -> str:
    """Why PIL cannot decode `file` (for an error message)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img.load()
    except UnidentifiedImageError:
        return "not an image format PIL recognises"
    except Exception as exc:  # noqa: BLE001 - the decoder's own words
        return str(exc).strip() or type(exc).__name__
    return "decoding failed"


def stage_folder(source: Path, name: str, data_root: Path, holdout_fraction: float = 0.2, seed: int = 0, val_fraction: float = 0.0) -> Path:
    """Copy an ImageFolder (or flat folder) into data_root/.<name>.ingesting with a manifest; returns that folder.

    Nothing under data_root/<name> is touched: the caller validates the staged copy, then swaps it in.
    A file that does not decode gets `decodable` False in the manifest (the GX suites refuse it);
    on any error the staged copy is removed again.
    """
    check_domain_name(name)
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{shown(source)}: not a directory", LAYOUT_HINT)
    seen = {source.resolve(): source}
    class_dirs = []
    for d in sorted(source.iterdir()):
        if _skipped(d) or not d.is_dir():
            continue
        resolved = _check_entry(d, source)
        if d.name in _RESERVED:
            raise DataError(f"{shown(d)}: a class folder cannot be named '{d.name}', the domain's manifest uses that name; rename it", LAYOUT_HINT)
        _read_once(d, resolved, seen)
        class_dirs.append(d)
    entries: list[tuple[Path, str, Path]] = []
    if class_dirs:
        stray = _images_under(source, source)
        if stray:
            raise DataError(f"{shown(stray[0])}: image outside any class folder in an ImageFolder layout", LAYOUT_HINT)
        labels: dict[str, Path] = {}
        for d in class_dirs:
            files = _images_under(d, source, recursive=True, seen=seen)
            if not files:
                raise DataError(f"{shown(d)}: class '{d.name}' has no images", LAYOUT_HINT)
            # the class is the name as read, in one Unicode form (NFC): macOS and zip tools write 'ü' as 'u' + a combining
            # mark (NFD), which printed the same as the source's class yet was refused as another
            label = unicodedata.normalize("NFC", d.name)
            if label in labels:
                raise DataError(f"{shown(d)}: the same class name as {shown(labels[label])}, written in another Unicode form; "
                                "merge the two folders", LAYOUT_HINT)
            labels[label] = d
            entries += [(f, label, f.relative_to(d)) for f in files]
    else:
        entries = [(f, "", Path(f.name)) for f in _images_under(source, source)]
    if not entries:
        raise DataError(f"{shown(source)}: no images found", LAYOUT_HINT)

    labelled = bool(class_dirs)
    if val_fraction and not labelled:
        raise DataError(f"{source}: a val split needs labels (an ImageFolder <class>/<image>); this folder is unlabelled")
    if holdout_fraction + val_fraction >= 1:
        raise DataError(f"{source}: test fraction {holdout_fraction} + val fraction {val_fraction} leave no train images")
    splits = stratified_split([label for _, label, _ in entries], holdout_fraction, seed, val_fraction) if labelled else ["train"] * len(entries)
    if "train" not in splits:  # each class rounds its test and val shares up: small classes keep nothing for train
        smallest = min(Counter(label for _, label, _ in entries).values())
        raise DataError(f"{shown(source)}: --val-fraction {val_fraction} with test fraction {holdout_fraction} leaves no train images: "
                        f"each class keeps round(images x fraction) of each (the smallest class has {smallest})",
                        "lower --val-fraction, or add images to each class")
    if val_fraction and "val" not in splits:  # each class keeps round(n x fraction) images for val: none for small classes
        counts = Counter(label for _, label, _ in entries).values()
        smallest, largest = min(counts), max(counts)
        every, some = math.ceil(51 / smallest) / 100, math.ceil(51 / largest) / 100  # round(n x f) >= 1 from f = 0.51 / n
        raise DataError(f"{shown(source)}: --val-fraction {val_fraction} keeps no image in a val split: round(images x {val_fraction}) "
                        f"is 0 for every class (the smallest has {smallest})",
                        f"raise --val-fraction to {every:g} or more (a val image of every class"
                        + (f"; {some:g} gives one to the largest, {largest} images" if some < every else "") + "), or add images to each class")
    staged = Path(data_root) / f".{name}.ingesting"
    shutil.rmtree(staged, ignore_errors=True)
    try:
        rows = []
        for (file, label, inside), split in zip(entries, splits):
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise DataError(f"{shown(file)}: cannot be read ({exc.strerror or exc})") from None
            dest = staged / label / inside  # a class's sub-folders are kept: same-named files cannot collide
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            row = describe_image(dest, staged, label, split, shown=Path(shown(file)))
            if max(row.width, row.height) > MAX_SIDE:
                raise DataError(f"{shown(file)}: {row.width}x{row.height} px, over the {MAX_SIDE} px limit; refused from its header, not decoded")
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
    """Images of the ingested folder that another domain of the project holds too: the same file (sha256), or
    the same picture in other bytes (`pixels.pixel_digest`; `reencoded` of `count`)."""

    domain: str
    count: int
    examples: list[tuple[str, str]]  # (path in the new folder, path in `domain`)
    reencoded: int = 0

    def describe(self, name: str) -> str:
        pairs = ", ".join(f"{a} = {self.domain}/{b}" for a, b in self.examples)
        other_bytes = f"; {self.reencoded} of them the same picture in other bytes" if self.reencoded else ""
        return f"{self.count} image(s) of '{name}' are also in domain '{self.domain}' (e.g. {pairs}{other_bytes}); a run pairing the two is refused"


def find_overlaps(staged: Path, data_root: Path, name: str, limit: int = 3) -> list[Overlap]:
    """Leakage against every other domain under data_root: the manifests' checksums, then the decoded pixels of
    the images whose size (either way round: an EXIF turn) both folders hold, so a re-saved copy is found too
    without decoding a domain of other sizes."""
    rows = read_manifest(staged)
    mine: dict[str, str] = {}
    for row in rows:
        mine.setdefault(row.sha256, row.path)
    sizes = {tuple(sorted((r.width, r.height))) for r in rows if r.decodable}
    my_pixels: dict[str, list[str]] | None = None  # digest -> paths; decoded on the first domain with images of a shared size
    found = []
    for other in sorted(Path(data_root).iterdir()):
        if other.name.startswith(".") or other.name == name or not (other / MANIFEST_NAME).is_file():
            continue
        theirs = read_manifest(other)
        shared = [(mine[r.sha256], r.path) for r in theirs if r.sha256 in mine]
        same_size = [r for r in theirs if r.decodable and r.sha256 not in mine and tuple(sorted((r.width, r.height))) in sizes]
        reencoded = []
        if same_size:
            if my_pixels is None:
                my_pixels = {}
                for r in rows:
                    if r.decodable and (digest := file_digest(staged / r.path)) is not None:
                        my_pixels.setdefault(digest, []).append(r.path)
            for r in same_size:
                digest = file_digest(other / r.path)
                for path in my_pixels.get(digest or "", []):
                    # a large image's sketch: the same picture only if every pixel says so
                    if not digest.startswith(SKETCH) or file_digest(other / r.path, exact=True) == file_digest(staged / path, exact=True):
                        reencoded.append((path, r.path))
                        break
        if shared or reencoded:
            found.append(Overlap(other.name, len(shared) + len(reencoded), (shared + reencoded)[:limit], len(reencoded)))
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
    splits: dict[str, int] = field(default_factory=dict)  # images per split (train, val, test)
    classes_without_val: list[str] = field(default_factory=list)  # asked for a val split, too few images of these for one
    source_classes_absent: list[str] = field(default_factory=list)  # a labelled target holding only some of the source's classes: the others
    classes_gone: list[str] = field(default_factory=list)  # a replace: classes the replaced version had and this one lacks
    classes_new: list[str] = field(default_factory=list)  # ... and the other way round
    earlier_commit: str | None = None  # a changed version that a git commit recorded before: a replace back to it
    committed: bool = False  # git's HEAD holds the pointer to this version: nothing to commit


def ingest_domain(
    folder: Path, name: str, data_root: Path, *, source: str | None = None, replace: bool = False,
    holdout_fraction: float = 0.2, seed: int = 0, min_per_class: int = 5, report_dir: Path,
    progress: Callable[[str], None] = lambda _: None, val_fraction: float = 0.0,
) -> IngestResult:
    """Validate `folder` and make it domain `name`, versioned in DVC; on any failure nothing changes.

    - The folder is validated alone (suite `udaflow.domain`); with `source`, also as a target of
      that source (its classes, leakage between the two: suites `udaflow.images`/`udaflow.classes`).
    - An existing domain is replaced only with `replace=True`; the same content again is no new
      version either way. Built-in domains (outputs of dvc.yaml stages) are never replaced here.
    - Overlap with any other domain of the project is reported in `overlaps` (a warning, not an error).
    """
    from udaflow import versioning

    check_domain_name(name)
    data_root = Path(data_root)
    with versioning.ingest_lock(data_root / name):  # a second ingest of the name stops here, before it stages anything
        return _ingest_locked(folder, name, data_root, source, replace, holdout_fraction, seed, val_fraction, report_dir, min_per_class, progress)


def _ingest_locked(folder, name, data_root, source, replace, holdout_fraction, seed, val_fraction, report_dir, min_per_class, progress):
    from udaflow import versioning
    from udaflow.data.expectations import validate_domain, validate_shift

    out = data_root / name
    for domain in (name, *([source] if source is not None and source != name else [])):
        recovered = versioning.recover_interrupted_ingest(data_root / domain)  # an ingest of it killed outright
        if recovered:
            progress(recovered)
    if source is not None:
        if source == name:
            raise DataError(f"--source '{source}' is the domain being ingested: name another domain to check '{name}' against, or leave --source out")
        if not (data_root / source / MANIFEST_NAME).is_file():
            raise DataError(f"source domain '{source}' not found under {data_root}", "build it (`udaflow data build`) or ingest it first, or leave --source out")
        if not any(r.label for r in read_manifest(data_root / source)):
            raise DataError(f"--source '{source}' has no labelled images: a source domain is one with classes",
                            "name a labelled domain (an ImageFolder, a folder per class) as --source, or leave --source out")
    owner = versioning.tracked_by(out)  # a stage output may be listed in dvc.yaml before it is built
    if owner is not None and not owner.endswith(".dvc"):
        raise DataError(
            f"{out}: domain '{name}' is the output of dvc.yaml stage '{owner}' (`udaflow data build`), not a user folder",
            "ingest under another --name",
        )

    staged = stage_folder(folder, name, data_root, holdout_fraction, seed, val_fraction)
    try:
        rows = read_manifest(staged)
        labelled = any(r.label for r in rows)
        progress(f"staged {len(rows)} images ({'labelled' if labelled else 'unlabelled'}); validating")
        report = validate_domain(data_root, staged.name, Path(report_dir) / "domain")
        if report.success and source is not None:
            report = validate_shift(data_root, source, staged.name, Path(report_dir) / f"against-{source}", min_per_class)
        if not report.success:  # a file PIL cannot decode: the hint names it and says why
            about_source = report.failures[0].suite == "udaflow.classes"  # the source's own classes: its folder is named, not this one
            raise DataError(f"{'' if about_source else f'{folder}: '}{report.error().replace(staged.name, name)}",
                            _refusal_hint(Path(folder), staged, rows, report, source))
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
        before = {r.label for r in read_manifest(out) if r.label} if (out / MANIFEST_NAME).is_file() and not same else set()
        with versioning.rollback_on_failure(out, changes_content=not same):  # the same images again: runs reading it need not end first
            os.replace(staged, out)  # identical content too: DVC then records no new version
            progress("versioning with DVC and pushing to the default remote")
            recorded = versioning.version_dataset(out)
        replaced = previous.md5 if previous is not None and recorded.changed else None
        in_git = replaced is not None and versioning.committed_in_git(previous.pointer, replaced, versioning.find_root(out))
        no_val = sorted({r.label for r in rows} - {r.label for r in rows if r.split == "val"}) if val_fraction else []
        absent = []  # the folders' names only (the ingest already checks them against the source's): no label reaches a run
        if source is not None and labelled:
            absent = sorted({r.label for r in read_manifest(data_root / source) if r.label} - {r.label for r in rows if r.label})
        now = {r.label for r in rows if r.label}
        gone, new = (sorted(before - now), sorted(now - before)) if before and now else ([], [])
        earlier = versioning.first_commit_recording(recorded.pointer, recorded.md5, versioning.find_root(out)) if recorded.changed else None
        committed = earlier is not None and versioning.committed_in_git(recorded.pointer, recorded.md5, versioning.find_root(out))
        return IngestResult(out, len(rows), labelled, source, recorded.md5, recorded.pointer, recorded.changed, replaced, in_git, overlaps,
                            dict(sorted(Counter(r.split for r in rows).items(), key=lambda kv: SPLIT_ORDER.index(kv[0]))), no_val, absent,
                            gone, new, earlier, committed)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
