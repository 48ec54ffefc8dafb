"""Per-domain manifests: one CSV row per image file.

Columns: path (relative to the domain folder), label (class name, empty when unknown), split
(train | test), sha256, width, height, mode, decodable. The manifest is written in a fixed order
(sorted by path) so the same files always give byte-identical manifests.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from udaflow.data.pixels import pixel_digest

# a domain: a folder under data.root, as `udaflow data ingest --name` makes and params' source / target name it;
# its name goes into file names beside it and into the registered model's (udaflow-<source>-to-<target>)
DOMAIN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DOMAIN_NAME_RULE = "lower-case letters, digits, '-' and '_', starting with a letter or digit, at most 64 characters"

MANIFEST_NAME = "manifest.csv"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_SIDE = 4096  # px: larger images are refused from their header, never decoded (decompression bombs)


class DataError(ValueError):
    """Data that cannot be used; the message names the file and why, `hint` (when one fits) what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class ManifestRow:
    path: str
    label: str
    split: str
    sha256: str
    width: int
    height: int
    mode: str
    decodable: bool


COLUMNS = [f.name for f in fields(ManifestRow)]


def describe_image(file: Path, root: Path, label: str, split: str, shown: Path | None = None) -> ManifestRow:
    """One manifest row. The header is read first: an image over MAX_SIDE px a side is described from
    its header and never decoded (decodable False); one whose header declares more pixels than PIL's
    bomb limit raises DataError naming the file (`shown`, e.g. the user's original, else `file`)."""
    return describe_image_pixels(file, root, label, split, shown, pixels=False)[0]


def describe_image_pixels(file: Path, root: Path, label: str, split: str, shown: Path | None = None,
                          pixels: bool = True) -> tuple[ManifestRow, str | None]:
    """`describe_image`'s row and, from the same decode, the image's `pixels.pixel_digest` (None when it does not
    decode): what finds the same picture stored in other bytes."""
    data = file.read_bytes()
    seen = None
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():  # PIL warns from 89M pixels; the MAX_SIDE check refuses the image in our words
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # parses the header only
        with img:
            width, height, mode, ok = img.width, img.height, img.mode, False
            if max(width, height) <= MAX_SIDE:
                img.load()
                ok = True
                if pixels:
                    seen = pixel_digest(img)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{shown or file}: refused before decoding, its header declares a decompression bomb ({exc})") from None
    except Exception:  # noqa: BLE001 - any decoder failure means "not decodable"
        width, height, mode, ok, seen = 0, 0, "", False, None
    return ManifestRow(file.relative_to(root).as_posix(), label, split, digest, width, height, mode, ok), seen


def write_manifest(root: Path, rows: list[ManifestRow]) -> Path:
    rows = sorted(rows, key=lambda r: r.path)
    out = root / MANIFEST_NAME
    tmp = out.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (int(v) if isinstance(v, bool) else v) for k, v in asdict(row).items()})
    tmp.replace(out)
    return out


def read_manifest(root: Path) -> list[ManifestRow]:
    path = root / MANIFEST_NAME
    if not path.exists():
        raise DataError(f"{path}: no manifest; build the domain with `udaflow data build` or `udaflow data ingest`")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = set(COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing columns {sorted(missing)}")
        return [
            ManifestRow(
                r["path"], r["label"], r["split"], r["sha256"],
                int(r["width"]), int(r["height"]), r["mode"], r["decodable"] in ("1", "True", "true"),
            )
            for r in reader
        ]


def stratified_split(labels: list[str], holdout_fraction: float, seed: int, val_fraction: float = 0.0) -> list[str]:
    """Return 'train'/'test' (and 'val') per item: each class keeps ~holdout_fraction of its items in
    'test' and, with val_fraction > 0, ~val_fraction of them in 'val' (a labelled target split only
    the promotion gate reads), the rest in 'train'.

    Unlabelled items (empty label) are split as one group. Seeded, so splits are reproducible; the
    'test' items do not depend on val_fraction.
    """
    rng = np.random.default_rng(seed)
    splits = ["train"] * len(labels)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    for label in sorted(by_class):
        idx = np.array(by_class[label])
        rng.shuffle(idx)
        n_test = int(round(len(idx) * holdout_fraction))
        n_val = int(round(len(idx) * val_fraction))
        for i in idx[:n_test]:
            splits[i] = "test"
        for i in idx[n_test : n_test + n_val]:
            splits[i] = "val"
    return splits


def missing_domain_hint(root: Path, name: str) -> str:
    """What brings a missing domain folder back: a built-in one is rendered again, an ingested one
    checked out from DVC (its pointer file sits beside the folder), anything else ingested."""
    from udaflow.data.domains import BUILTIN_DOMAINS  # domains imports this module

    if name in BUILTIN_DOMAINS:
        return f"build it with `udaflow data build --domains {name}`"
    pointer = root.with_name(f"{root.name}.dvc")
    if pointer.is_file():
        return f"restore it from DVC with `dvc checkout {pointer}` (`dvc pull {pointer}` when the cache lacks it)"
    if not DOMAIN_NAME.match(name):  # a name ingest refuses (`SHOPB`, `my photos`): the folders that exist, not a command that fails too
        there = sorted(d.name for d in root.parent.iterdir() if d.is_dir() and (d / MANIFEST_NAME).is_file()) if root.parent.is_dir() else []
        return (f"domain names are {DOMAIN_NAME_RULE}; the domains here: {', '.join(there) or 'none'} "
                f"(built-in: {', '.join(BUILTIN_DOMAINS)})")
    return f"ingest your images with `udaflow data ingest PATH --name {name}` (built-in domains: {', '.join(BUILTIN_DOMAINS)})"
