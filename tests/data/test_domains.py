"""Built-in domains: deterministic rendering and building, manifests, splits."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from udaflow.data.datasets import Domain, decode_image
from udaflow.data.domains import CLASSES, build_domain, synth_images, usable_fonts
from udaflow.data.manifest import COLUMNS, MANIFEST_NAME, DataError, read_manifest

EXPECTED_COLUMNS = ["path", "label", "split", "sha256", "width", "height", "mode", "decodable"]


def _pixels(images):
    return [np.asarray(img) for img in images]


# ----------------------------------------------------------------------------------------- synth
def test_synth_images_are_deterministic_per_seed():
    a, labels_a = synth_images(30, seed=1)
    b, labels_b = synth_images(30, seed=1)
    c, _ = synth_images(30, seed=2)
    assert labels_a == labels_b == [i % 10 for i in range(30)]
    assert all(img.mode == "RGB" and img.size == (32, 32) for img in a)
    pa, pb, pc = _pixels(a), _pixels(b), _pixels(c)
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb))
    assert sum(np.array_equal(x, z) for x, z in zip(pa, pc)) == 0  # every image differs with another seed
    # image i does not depend on how many images are rendered
    head, _ = synth_images(5, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(head), pa[:5]))
    # and images are not blank: foreground and background contrast
    assert all(x.std() > 10 for x in pa)


def test_usable_fonts_exclude_symbol_and_digitless_fonts():
    fonts = usable_fonts()
    names = [p.name for p in fonts]
    assert len(fonts) >= 5 and all(p.suffix == ".ttf" and p.is_file() for p in fonts)
    font_dir = fonts[0].parent
    excluded = ("cmex10", "cmsy10", "DejaVuSansDisplay", "STIXNonUni", "LastResort")
    present = [e for e in excluded if any(p.name.startswith(e) for p in font_dir.glob("*.ttf"))]
    assert present, "matplotlib ships none of the fonts this test is about"
    for bad in excluded:
        assert not any(n.startswith(bad) for n in names), bad
    assert "DejaVuSans.ttf" in names


# ------------------------------------------------------------------------------------- building
@pytest.fixture(scope="module")
def two_synth_builds(tmp_path_factory):
    roots = [tmp_path_factory.mktemp("synth_a"), tmp_path_factory.mktemp("synth_b")]
    outs = [build_domain("synth", root, synth_size=40) for root in roots]
    return outs


def test_synth_build_is_byte_identical(two_synth_builds):
    a, b = two_synth_builds
    assert a.name == b.name == "synth"
    assert (a / MANIFEST_NAME).read_bytes() == (b / MANIFEST_NAME).read_bytes()
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.png"))
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*.png"))
    assert files_a == files_b and len(files_a) == 40
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert not any(p.name.startswith(".") for p in a.parent.iterdir())  # no half-built folder left


def test_synth_manifest(two_synth_builds):
    root = two_synth_builds[0]
    with (root / MANIFEST_NAME).open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == EXPECTED_COLUMNS == COLUMNS
        raw = list(reader)
    assert [r["path"] for r in raw] == sorted(r["path"] for r in raw)
    rows = read_manifest(root)
    assert len(rows) == 40
    for row in rows:
        file = root / row.path
        assert file.is_file() and row.path.split("/")[0] == row.label
        assert row.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
        assert (row.width, row.height, row.mode, row.decodable) == (32, 32, "RGB", True)
        assert row.split in ("train", "test")
    assert Counter(r.label for r in rows) == {c: 4 for c in CLASSES}
    # ~holdout_fraction of each class in test: round(4 * 0.2) = 1
    assert Counter(r.label for r in rows if r.split == "test") == {c: 1 for c in CLASSES}


def test_synth_split_follows_holdout_fraction(tmp_path):
    out = build_domain("synth", tmp_path, synth_size=50, holdout_fraction=0.4)
    rows = read_manifest(out)
    assert Counter(r.label for r in rows if r.split == "test") == {c: 2 for c in CLASSES}  # 5 * 0.4
    # rebuilding in place replaces the domain
    out = build_domain("synth", tmp_path, synth_size=20)
    assert len(read_manifest(out)) == 20 and len(list(out.rglob("*.png"))) == 20


def test_unknown_builtin_domain(tmp_path):
    with pytest.raises(DataError, match="unknown built-in domain 'svhn'"):
        build_domain("svhn", tmp_path)


def _check_split(rows, fraction=0.2):
    per_class = Counter(r.label for r in rows)
    tests = Counter(r.label for r in rows if r.split == "test")
    for label, n in per_class.items():
        assert tests[label] == int(round(n * fraction)), label


def test_mnist_domain(tmp_path):
    out = build_domain("mnist", tmp_path)
    rows = read_manifest(out)
    assert len(rows) == 5000 and len(list(out.rglob("*.png"))) == 5000
    assert {(r.width, r.height, r.mode, r.decodable) for r in rows} == {(28, 28, "L", True)}
    assert set(r.label for r in rows) == set(CLASSES)
    _check_split(rows)
    with Image.open(out / rows[0].path) as img:
        assert img.mode == "L" and img.size == (28, 28)
    # decoded for training: grey to RGB, resized to 32x32
    arr = decode_image(out / rows[0].path, 32)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.uint8
    assert np.array_equal(arr[0], arr[1]) and np.array_equal(arr[1], arr[2])


def test_mnistm_domain(tmp_path):
    out = build_domain("mnistm", tmp_path)
    rows = read_manifest(out)
    assert len(rows) == 5000
    assert {(r.width, r.height, r.mode, r.decodable) for r in rows} == {(32, 32, "RGB", True)}
    _check_split(rows)
    with Image.open(out / rows[0].path) as img:
        assert img.mode == "RGB" and img.size == (32, 32)
    # colour photo backgrounds, not grey: over 50 images the channels differ clearly
    arrs = []
    for r in rows[:50]:
        with Image.open(out / r.path) as img:
            arrs.append(np.asarray(img).astype(np.int16))
    arr = np.stack(arrs)
    assert np.abs(arr[..., 0] - arr[..., 1]).mean() > 5
    # same labels per index as mnist: file i of mnistm has the class of mnist digit i
    labels = {Path(r.path).stem: r.label for r in rows}
    from udaflow.data.domains import mnist_arrays

    _, y = mnist_arrays()
    assert all(labels[f"{i:05d}"] == str(y[i]) for i in range(0, 5000, 97))


def test_domain_open_errors(tmp_path):
    with pytest.raises(DataError, match="domain 'nowhere' not found"):
        Domain.open(tmp_path, "nowhere")
    (tmp_path / "nomanifest").mkdir()
    with pytest.raises(DataError, match="no manifest"):
        Domain.open(tmp_path, "nomanifest")
