"""Image sets and the label firewall.

A domain split is decoded once per image size, either into a uint8 tensor in memory or (with a
cache folder, what the pipeline and the bench use) into a flat file of rows read per batch
(`store.ImageFile`), so memory stays flat as a domain grows. Batches are drawn by index either
way: no DataLoader workers to fight over two CPU cores.

The firewall is a type: target adaptation data is an `UnlabelledImages`, which has no label
field at all, so no training code can read target labels by accident. Labelled target data
(`LabelledImages`) exists only for evaluation and for the benchmark-only `oracle`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image

from udaflow.data.manifest import DataError, ManifestRow, missing_domain_hint, read_manifest
from udaflow.data.pixels import model_rgb
from udaflow.data.store import ImageFile, Images, content_key
from udaflow.models.preprocess import ImageSpec

_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}

# manifest splits: train (the adaptation pool for a target), test (reported accuracy), val (a target
# split a user chose to label: only the promotion gate reads it); "all" = every row
Split = Literal["train", "val", "test", "all"]


@dataclass(frozen=True)
class UnlabelledImages:
    """Images without labels: (N, 3, H, W) uint8. The only kind of target data training sees."""

    images: Images  # a uint8 tensor or an ImageFile that indexes like one
    domain: str

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class LabelledImages:
    """Images with class indices into `classes`: (N, 3, H, W) uint8 and (N,) int64."""

    images: Images
    labels: torch.Tensor
    classes: tuple[str, ...]
    domain: str

    def __len__(self) -> int:
        return self.images.shape[0]

    def without_labels(self) -> UnlabelledImages:
        return UnlabelledImages(self.images, self.domain)


def decode_image(path: Path | BinaryIO, size: int | ImageSpec) -> np.ndarray:
    """Any PIL-readable image (a path or an open binary file) -> (3, size, size) uint8 RGB (16-bit and
    alpha handled).

    An ImageSpec with a crop fraction resizes to size / crop_pct and centre-crops as timm's evaluation
    transform does in the spec's crop_mode; otherwise the image is resized straight to a square."""
    with Image.open(path) as img:
        return to_model_pixels(img, size)


def to_model_pixels(img: Image.Image, size: int | ImageSpec) -> np.ndarray:
    """A PIL image -> (3, size, size) uint8 RGB, the one conversion every decoded image goes through
    (training, evaluation and the served model). A camera's EXIF orientation is applied first: a phone
    stores a portrait photo as landscape pixels plus a tag saying how to turn them."""
    spec = size if isinstance(size, ImageSpec) else ImageSpec(size)
    img = model_rgb(img)
    size = spec.size
    resample = _RESAMPLE[spec.interpolation]
    if spec.crop_pct is not None:
        scale = int(size / spec.crop_pct)  # timm: floor(size / crop_pct)
        w, h = img.size
        if spec.crop_mode == "squash":  # torchvision's Resize((scale, scale))
            new = (scale, scale)
        elif spec.crop_mode == "border":  # timm's ResizeKeepRatio(longest=1): the longer side to scale
            ratio = max(h / scale, w / scale)
            new = (round(w / ratio), round(h / ratio))
        else:  # the shorter side to scale: torchvision's Resize(int)
            new = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
        if new != img.size:
            img = img.resize(new, resample)
        if spec.crop_mode == "border" and min(new) < size:  # timm's CenterCropOrPad: the mean colour around it
            fill = tuple(round(255 * v) for v in (spec.mean if isinstance(spec.mean, tuple) else (spec.mean,) * 3))
            padded = Image.new("RGB", (max(new[0], size), max(new[1], size)), fill)
            padded.paste(img, ((size - new[0]) // 2 if size > new[0] else 0, (size - new[1]) // 2 if size > new[1] else 0))
            img, new = padded, padded.size
        left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))  # torchvision's CenterCrop
        img = img.crop((left, top, left + size, top + size))
    elif img.size != (size, size):
        img = img.resize((size, size), resample)
    return np.asarray(img).transpose(2, 0, 1).copy()


@dataclass(frozen=True)
class Domain:
    """A domain on disk: its folder and manifest rows."""

    name: str
    root: Path
    rows: tuple[ManifestRow, ...]

    @classmethod
    def open(cls, data_root: Path, name: str) -> "Domain":
        root = Path(data_root) / name
        if not root.is_dir():
            raise DataError(f"{root}: domain '{name}' not found; {missing_domain_hint(root, name)}")
        return cls(name, root, tuple(read_manifest(root)))

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(sorted({r.label for r in self.rows if r.label}, key=_class_key))

    def select(self, split: Split) -> list[ManifestRow]:
        rows = [r for r in self.rows if split == "all" or r.split == split]
        bad = [r.path for r in rows if not r.decodable]
        if bad:
            raise DataError(f"{self.root / bad[0]}: not a decodable image ({len(bad)} such files in '{self.name}')")
        return rows

    def _decoded(self, rows: list[ManifestRow], size: int | ImageSpec):
        for r in rows:
            try:
                yield decode_image(self.root / r.path, size)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DataError(f"{self.root / r.path}: cannot be decoded ({exc}); rebuild or re-ingest '{self.name}'") from None

    def pixels(self, rows: list[ManifestRow], size: int | ImageSpec, cache: Path | None = None) -> Images:
        """The rows' images at size x size: a uint8 tensor, or with `cache` a file of rows there (decoded
        once per content and size, then reused)."""
        if not rows:
            raise DataError(f"{self.root}: no images in the requested split of domain '{self.name}'")
        if cache is None:
            return torch.from_numpy(np.stack(list(self._decoded(rows, size))))
        spec = size if isinstance(size, ImageSpec) else ImageSpec(size)
        key = content_key([(r.path, r.sha256) for r in rows], spec.size, spec.variant)
        path = Path(cache) / f"{self.name}-{spec.size}px-{key}.u8"
        if path.exists():
            return ImageFile(path, spec.size, key)
        return ImageFile.build(path, self._decoded(rows, spec), len(rows), spec.size, key)

    def labelled(self, split: Split, classes: tuple[str, ...], size: int | ImageSpec, cache: Path | None = None) -> LabelledImages:
        rows = self.select(split)
        index = {c: i for i, c in enumerate(classes)}
        unlabelled = [r.path for r in rows if not r.label]
        if unlabelled:
            raise DataError(f"{self.root / unlabelled[0]}: has no label but labelled data was requested")
        unknown = sorted({r.label for r in rows} - set(index))
        if unknown:
            raise DataError(
                f"{self.root}: class(es) {unknown} of domain '{self.name}' are unknown to the source classes {list(classes)}"
            )
        labels = torch.tensor([index[r.label] for r in rows], dtype=torch.int64)
        return LabelledImages(self.pixels(rows, size, cache), labels, classes, self.name)

    def unlabelled(self, split: Split, size: int | ImageSpec, cache: Path | None = None) -> UnlabelledImages:
        # labels are never read here: only paths go to the decoder
        return UnlabelledImages(self.pixels(self.select(split), size, cache), self.name)

    def has_labels(self, split: Split) -> bool:
        rows = self.select(split)
        return bool(rows) and all(r.label for r in rows)


def _class_key(name: str):
    """Numbers in numeric order, then names; a total order, so "1" and "01" (equal as numbers) keep one
    order in every process: sorting a set by a key with ties follows the set's per-process hash order.
    isdecimal, not isdigit: int() refuses digits such as '²'."""
    return (0, int(name), name) if name.isdecimal() else (1, 0, name)


@dataclass(frozen=True)
class ShiftData:
    """Everything one source -> target shift needs, with the firewall in the types.

    source_train / source_val: labelled source splits.
    target_adapt: the unlabelled adaptation pool (what training sees of the target).
    target_eval: labelled target images accuracy is reported on (None when the target has no labels).
    """

    source_train: LabelledImages
    source_val: LabelledImages
    target_adapt: UnlabelledImages
    target_eval: LabelledImages | None
    protocol: str

    @property
    def classes(self) -> tuple[str, ...]:
        return self.source_train.classes


def load_shift(
    data_root: Path, source: str, target: str, image_size: int | ImageSpec, protocol: Literal["transductive", "holdout"] = "holdout",
    cache: Path | None = None,
) -> ShiftData:
    """Load a shift. `holdout`: adapt on target train, report on target test. `transductive`
    (the literature's protocol): adapt on every target image, report accuracy over all of them.
    `cache`: a folder for decoded-row files (read per batch, see store.py); None = in memory."""
    if source == target:
        raise DataError(f"source and target are both '{source}': pick two different domains")
    src, tgt = Domain.open(data_root, source), Domain.open(data_root, target)
    classes = src.classes
    if not classes:
        raise DataError(f"{src.root}: source domain '{source}' has no labelled images")
    adapt_split = "all" if protocol == "transductive" else "train"
    eval_split = "all" if protocol == "transductive" else "test"
    target_eval = tgt.labelled(eval_split, classes, image_size, cache) if tgt.has_labels(eval_split) else None
    return ShiftData(
        source_train=src.labelled("train", classes, image_size, cache),
        source_val=src.labelled("test", classes, image_size, cache),
        target_adapt=tgt.unlabelled(adapt_split, image_size, cache),
        target_eval=target_eval,
        protocol=protocol,
    )


def load_oracle_data(data_root: Path, target: str, classes: tuple[str, ...], image_size: int | ImageSpec, cache: Path | None = None) -> LabelledImages:
    """Target-train WITH labels: for the benchmark-only `oracle` upper bound, never for a candidate."""
    return Domain.open(data_root, target).labelled("train", classes, image_size, cache)
