"""What `stage_folder` (the first step of `udaflow data ingest`) reads from a user's folder:
nested class folders are included, decompression bombs are refused from their header."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from udaflow.data import manifest
from udaflow.data.ingest import stage_folder
from udaflow.data.manifest import DataError, read_manifest


def _png(path: Path, value: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def test_images_in_nested_folders_under_a_class_are_included_not_dropped(tmp_path: Path):
    src = tmp_path / "user"
    for label in ("0", "1"):
        _png(src / label / "a.png", 10)
        _png(src / label / "batch1" / "a.png", 20)  # same file name, one level down
        _png(src / label / "batch1" / "deeper" / "b.png", 30)
    staged = stage_folder(src, "nested", tmp_path / "data")
    rows = read_manifest(staged)
    assert sorted(r.path for r in rows) == sorted(
        f"{label}/{p}" for label in ("0", "1") for p in ("a.png", "batch1/a.png", "batch1/deeper/b.png")
    )
    assert {r.label for r in rows if r.path.startswith("1/")} == {"1"}
    assert all((staged / r.path).is_file() for r in rows)


def test_an_oversized_image_is_refused_from_its_header_without_decoding(tmp_path: Path, monkeypatch):
    src = tmp_path / "user"
    _png(src / "0" / "ok.png", 10)
    _png(src / "1" / "ok.png", 10)
    big = src / "1" / "huge.png"
    Image.new("L", (manifest.MAX_SIDE + 1, 8)).save(big)  # tiny file, header says 4097 px wide

    decoded = []
    real_load = Image.Image.load

    def spying_load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", spying_load)
    with pytest.raises(DataError, match=r"huge\.png: 4097x8 px, over the 4096 px limit; refused from its header"):
        stage_folder(src, "big", tmp_path / "data")
    assert (manifest.MAX_SIDE + 1, 8) not in decoded
    assert not (tmp_path / "data" / ".big.ingesting").exists()  # nothing half-staged left behind


def test_a_decompression_bomb_header_is_refused_naming_the_file(tmp_path: Path, monkeypatch):
    src = tmp_path / "user"
    _png(src / "0" / "ok.png", 10, size=8)
    _png(src / "1" / "bomb.png", 10, size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 = 4096 > 2 x 100: PIL's bomb error, from the header
    with pytest.raises(DataError, match=r"user/1/bomb\.png: refused before decoding"):
        stage_folder(src, "bomb", tmp_path / "data")
    assert not (tmp_path / "data" / ".bomb.ingesting").exists()
