"""Property: `ingest_domain` on any folder (random bytes or real images under random names, in random
folder shapes, with symlinks) either succeeds, with a manifest that matches the files byte for
byte, or raises DataError naming the user's folder, and then the project is exactly as before:
no other exception type, no half-written domain, no staged copy, no DVC state left behind."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from udaflow.data.ingest import ingest_domain
from udaflow.data.manifest import DataError, read_manifest

from ingest_project import image_folder, leftovers, make_project, snapshot


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """One project for every example (a fresh one each would dominate the run time): a labelled
    source `src` (classes a, b) to pair with; each example ingests as `fuzz`, replacing the last."""
    root = make_project(tmp_path_factory.mktemp("fuzz") / "proj")
    ingest_domain(image_folder(tmp_path_factory.mktemp("src")), "src", root / "data/raw", report_dir=root / "runs/src")
    return root


def _encode(mode: str, fmt: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


_FORMATS = {  # what each format stores as is
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"], "JPEG": ["L", "RGB"], "BMP": ["1", "L", "P", "RGB"],
    "GIF": ["L", "P"], "TIFF": ["L", "RGB", "RGBA", "I;16", "CMYK"], "WEBP": ["RGB", "RGBA"],
}
_KINDS_OF_IMAGE = [(fmt, mode) for fmt, modes in _FORMATS.items() for mode in modes]


def _images(min_side: int):
    return st.sampled_from(_KINDS_OF_IMAGE).flatmap(
        lambda fm: st.builds(_encode, st.just(fm[1]), st.just(fm[0]), st.tuples(st.integers(min_side, 24), st.integers(min_side, 24)), st.integers(0, 2**32 - 1))
    )


def _damage(data: bytes, cut: float, flip: int) -> bytes:
    data = bytearray(data[: max(1, int(len(data) * cut))])
    data[flip % len(data)] ^= 0xFF
    return bytes(data)


good_images = _images(8)
any_contents = st.one_of(
    _images(4), _images(4),  # real images, some under the 8 px minimum
    st.binary(max_size=300),  # random bytes
    st.builds(_damage, _images(8), st.floats(0.05, 1.0), st.integers(0, 10**6)),  # truncated and/or a flipped byte
)

# Names: anything Linux allows in a folder (no '/', no NUL, not '.' or '..', at most 255 bytes).
_chars = st.characters(codec="utf-8", exclude_characters="/\x00")
_printable = st.characters(codec="utf-8", exclude_characters="/\x00", exclude_categories=("Cc", "Cs"))


def _valid(name: str) -> bool:
    return name not in (".", "..") and len(name.encode()) <= 255


image_suffixes = st.sampled_from([".png", ".PNG", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".TIFF", ".webp"])
plain_stems = st.text(_printable, min_size=1, max_size=10).filter(lambda n: not n.startswith("."))
good_file_names = st.builds(str.__add__, plain_stems, image_suffixes).filter(_valid)
good_dir_names = st.one_of(st.sampled_from(["a", "b", "c", "nested"]), plain_stems).filter(_valid)
any_file_names = st.builds(
    str.__add__,
    st.one_of(plain_stems, st.text(_chars, min_size=1, max_size=10), st.sampled_from([".hidden", "manifest", "x.dvc", " ", "a\nb", "nan"])),
    st.one_of(image_suffixes, st.sampled_from([".txt", ".csv", ""])),
).filter(_valid)
any_dir_names = st.one_of(
    good_dir_names, st.text(_chars, min_size=1, max_size=10).filter(_valid), st.sampled_from(["manifest.csv", ".git", "zz", "a\rb"]),
)


class Link(str):
    """A symlink's target, relative to the link's folder or absolute."""


links = st.sampled_from([".", "..", "../..", "/tmp", "/etc/hostname", "missing.png", "a", "0.png"]).map(Link)


def _folder(files, dirs, max_files: int = 4, max_dirs: int = 2):
    return st.builds(lambda f, d: {**d, **f}, st.dictionaries(*files, max_size=max_files), st.dictionaries(*dirs, max_size=max_dirs))


# A clean folder, which ingestion must accept unless its labels do not fit the source it is paired
# with: flat, or class folders whose images may sit in nested folders.
clean = st.one_of(
    st.dictionaries(good_file_names, good_images, min_size=1, max_size=5),
    st.dictionaries(good_dir_names, _folder((good_file_names, good_images), (good_dir_names, st.dictionaries(good_file_names, good_images, min_size=1, max_size=3))), min_size=1, max_size=3),
)
# Anything: random bytes, damaged images, odd names, symlinks, pipes aside, any folder shape.
_leaf = st.one_of(any_contents, any_contents, links)
wild = st.one_of(
    st.dictionaries(any_file_names, _leaf, min_size=1, max_size=5),
    _folder((any_file_names, _leaf), (any_dir_names, _folder((any_file_names, _leaf), (any_dir_names, st.dictionaries(any_file_names, _leaf, max_size=3))))),
)
folders = st.one_of(clean, wild)


def _write(folder: Path, tree: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in tree.items():
        path = folder / name
        if isinstance(node, Link):
            os.symlink(str(node), path)
        elif isinstance(node, bytes):
            path.write_bytes(node)
        else:
            _write(path, node)


def _user_files(folder: Path) -> dict[str, bytes]:
    """Every non-hidden regular file under `folder` (no symlinks: a successful ingest had none)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith("."):
                p = Path(dirpath, f)
                out[p.relative_to(folder).as_posix()] = p.read_bytes()
    return out


_KINDS = [  # for --hypothesis-show-statistics: which refusals the examples reached
    "control character", "not valid UTF-8", "not an image file", "symlink points outside",
    "broken symlink", "symlink loop", "the same folder as", "not a regular file", "has no images", "no images found",
    "outside any class folder", "class folder cannot be named", "refused before decoding", "px limit", "data validation failed: expect_column_values_to_be_between",
    "data validation failed: expect_column_values_to_be_unique", "that source 'src' does not have",
    "data validation failed: expect_column_values_to_be_in_set on 'mode'", "data validation failed",
]


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tree=folders, paired=st.booleans())
def test_ingest_succeeds_or_raises_data_error_and_changes_nothing(project: Path, tree: dict, paired: bool):
    scratch = Path(tempfile.mkdtemp(prefix="udaflow-fuzz-"))
    try:
        folder = scratch / "user"
        _write(folder, tree)
        before = snapshot(project)
        try:
            result = ingest_domain(
                folder, "fuzz", project / "data/raw", source="src" if paired else None, replace=True, report_dir=scratch / "report",
            )
        except DataError as exc:
            event("refused: " + next((k for k in _KINDS if k in str(exc)), str(exc)[len(str(folder)):][:50]))
            assert str(exc).startswith(str(folder)), exc  # names the folder (and, for one file, the file)
            assert snapshot(project) == before
        else:
            event("accepted")
            out = project / "data/raw/fuzz"
            rows = read_manifest(out)
            files = _user_files(folder)
            assert result.images == len(rows) == len(files) > 0
            assert {r.path: (out / r.path).read_bytes() for r in rows} == files  # every file, byte for byte
            assert all(r.decodable for r in rows) and result.labelled == any(r.label for r in rows)
        assert leftovers(project) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
