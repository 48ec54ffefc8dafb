"""Every bad input of DESIGN.md's "Bad input gets a clear error and loses nothing", through
`ingest_domain` (what `udaflow data ingest` runs) in a project laid out like this repository:
each is refused with one DataError naming the file (or the folder and the failed check), and the
project's data/, DVC cache, pointers and git state are exactly as before; no staged copy is left.
What must be accepted (RGBA, palette, 16-bit, mixed modes, nested folders) is, and decodes right."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from udaflow.data.datasets import decode_image
from udaflow.data.ingest import ingest_domain
from udaflow.data.manifest import DataError, read_manifest

from ingest_project import image_folder, leftovers, make_project, snapshot, write_png

SUFFIXES = ".bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A project holding a labelled source `src` (classes a, b) and a flat target `tgt`."""
    root = make_project(tmp_path_factory.mktemp("bad") / "proj")
    ingest_domain(image_folder(tmp_path_factory.mktemp("src")), "src", root / "data/raw", report_dir=root / "runs/src")
    flat = tmp_path_factory.mktemp("tgt")
    for i in range(6):
        write_png(flat / f"t{i}.png", 500 + i)
    ingest_domain(flat, "tgt", root / "data/raw", report_dir=root / "runs/tgt")
    return root


@pytest.fixture
def project(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of `pristine` (its DVC remote is relative: the copy is self-contained). Every
    bad ingest below tries to replace `tgt` (replace=True), so "nothing changed" covers a live domain."""
    copy = tmp_path / "proj"
    shutil.copytree(pristine, copy, symlinks=True)
    return copy


def _png_header(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature + IHDR declaring width x height, and no pixel data: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def _truncated(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# Each case: build a bad folder under `base` (a clean ImageFolder with classes a, b unless said
# otherwise) and return (folder, the exact message, extra ingest_domain arguments[, the exact hint]).
# For the validation (GX) failures the message is compared up to "; full report: <path>".
Case = Callable[[Path], tuple[Path, str, dict]]


def corrupt(base: Path):
    f = image_folder(base)
    (f / "a/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return f, (
        f"{f}: data validation failed: expect_column_values_to_be_in_set on 'decodable' failed "
        "(e.g. domain=tgt, path=a/bad.png, label=a, split=train, width=0, mode=) (+3 more failed expectations, on the same file)"
    ), {}, f"{f}/a/bad.png is not a readable image (not an image format PIL recognises): fix or remove it and ingest again"


def truncated(base: Path):
    f = image_folder(base)
    _truncated(f / "b/cut.png")
    return f, (
        f"{f}: data validation failed: expect_column_values_to_be_in_set on 'decodable' failed "
        "(e.g. domain=tgt, path=b/cut.png, label=b, split=train, width=0, mode=) (+3 more failed expectations, on the same file)"
    ), {}, f"{f}/b/cut.png is not a readable image (image file is truncated): fix or remove it and ingest again"


def several_corrupt(base: Path):
    f = image_folder(base)
    for p in ("a/bad1.png", "b/bad2.jpg", "b/x/bad3.gif"):
        (f / p).parent.mkdir(exist_ok=True)
        (f / p).write_bytes(f"garbage {p}".encode())
    more = f"{f}/b/bad2.jpg, {f}/b/x/bad3.gif"
    return f, (
        f"{f}: data validation failed: expect_column_values_to_be_in_set on 'decodable' failed "
        "(e.g. domain=tgt, path=a/bad1.png, label=a, split=train, width=0, mode=; domain=tgt, path=b/bad2.jpg, label=b, split=test, width=0, mode=; "
        "domain=tgt, path=b/x/bad3.gif, label=b, split=train, width=0, mode=) (+3 more failed expectations, on the same files)"
    ), {}, f"{f}/a/bad1.png is not a readable image (not an image format PIL recognises); 2 more cannot be decoded either (e.g. {more}): fix or remove it and ingest again"


def non_image_file(base: Path):
    f = image_folder(base)
    (f / "a/notes.txt").write_text("not an image")
    return f, f"{f}/a/notes.txt: not an image file (expected one of {SUFFIXES}); move it out of the folder", {}


def non_image_beside_classes(base: Path):
    f = image_folder(base)
    (f / "LICENSE").write_text("MIT")
    return f, f"{f}/LICENSE: not an image file (expected one of {SUFFIXES}); move it out of the folder", {}


def decompression_bomb(base: Path):
    f = image_folder(base)
    _png_header(f / "b/bomb.png", 20000, 20000)  # 83 bytes; 400 Mpx declared, over PIL's 2 x MAX_IMAGE_PIXELS
    return f, (
        f"{f}/b/bomb.png: refused before decoding, its header declares a decompression bomb "
        "(Image size (400000000 pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS attack.)"
    ), {}


def oversized(base: Path):
    f = image_folder(base)
    _png_header(f / "a/wide.png", 5000, 8)
    return f, f"{f}/a/wide.png: 5000x8 px, over the 4096 px limit; refused from its header, not decoded", {}


def symlink_file_outside(base: Path):
    f = image_folder(base / "user")
    outside = write_png(base / "elsewhere/secret.png", 900)
    os.symlink(outside, f / "a/x.png")
    return f, f"{f}/a/x.png: symlink points outside the dataset root ({outside}); copy the file in instead", {}


def symlink_class_outside(base: Path):
    f = image_folder(base / "user")
    outside = image_folder(base / "elsewhere", classes=("c",), offset=300) / "c"
    os.symlink(outside, f / "c")
    return f, f"{f}/c: symlink points outside the dataset root ({outside}); copy the file in instead", {}


def dotdot_escape(base: Path):
    f = image_folder(base / "user")
    image_folder(base, classes=("other",), offset=400)  # what ../.. reaches: the folder above the dataset
    os.symlink("../..", f / "a/up")
    return f, f"{f}/a/up: symlink points outside the dataset root ({base}); copy the file in instead", {}


def dotdot_to_root(base: Path):
    f = image_folder(base)
    os.symlink("..", f / "a/up")  # inside the root, but a loop: a/up/a/up/...
    return f, f"{f}/a/up: the same folder as {f} (a symlink loop or a duplicate); remove the symlink", {}


def class_read_twice(base: Path):
    f = image_folder(base)
    os.symlink("b", f / "0")  # class 0 = class b's images again (and read first): leakage between classes
    return f, f"{f}/b: the same folder as {f}/0 (a symlink loop or a duplicate); remove the symlink", {}


def broken_symlink(base: Path):
    f = image_folder(base)
    os.symlink("gone.png", f / "a/x.png")
    return f, f"{f}/a/x.png: broken symlink, its target {f}/a/gone.png does not exist; remove it or copy the file in", {}


def symlink_loop(base: Path):
    f = image_folder(base)
    os.symlink("y.png", f / "b/x.png")
    os.symlink("x.png", f / "b/y.png")
    return f, f"{f}/b/x.png: symlink loop, it never reaches a file; remove it", {}


def named_pipe(base: Path):
    f = image_folder(base)
    os.mkfifo(f / "a/stream.png")
    return f, f"{f}/a/stream.png: not a regular file or folder (a pipe, socket or device); remove it", {}


def empty_class(base: Path):
    f = image_folder(base)
    (f / "c/nested/deeper").mkdir(parents=True)
    (f / "c/.DS_Store").write_bytes(b"hidden files do not count")
    return f, f"{f}/c: class 'c' has no images", {}


def empty_target(base: Path):
    f = base / "empty"
    f.mkdir()
    return f, f"{f}: no images found", {"source": "src"}


def target_of_hidden_files_only(base: Path):
    f = base / "hidden"
    write_png(f / ".cache.png", 1)
    return f, f"{f}: no images found", {"source": "src"}


def image_outside_any_class(base: Path):
    f = image_folder(base)
    write_png(f / "stray.png", 600)
    return f, f"{f}/stray.png: image outside any class folder in an ImageFolder layout", {}


def not_a_folder(base: Path):
    return base / "missing", f"{base}/missing: not a directory", {}


def class_named_like_the_manifest(base: Path):
    f = image_folder(base)
    image_folder(f, classes=("manifest.csv",), offset=700)
    return f, f"{f}/manifest.csv: a class folder cannot be named 'manifest.csv', the domain's manifest uses that name; rename it", {}


def line_break_in_a_name(base: Path):
    f = image_folder(base)
    write_png(f / "a/two\nlines.png", 800)  # would split its manifest row in two
    return f, f"{f}/a/two\\nlines.png: the name holds a control character (a line break, tab, ...); rename it", {}


def carriage_return_in_a_class(base: Path):
    f = image_folder(base)
    image_folder(f, classes=("c\r",), offset=820)
    return f, f"{f}/c\\r: the name holds a control character (a line break, tab, ...); rename it", {}


def name_not_utf8(base: Path):
    f = image_folder(base)
    write_png(Path(os.fsdecode(os.fsencode(f / "a") + b"/caf\xe9.png")), 850)  # Latin-1 bytes
    return f, f"{f}/a/caf\\xe9.png: the name is not valid UTF-8; rename it", {}


def duplicate_image(base: Path):
    f = image_folder(base)
    (f / "b/copy.png").write_bytes((f / "a/0.png").read_bytes())
    return f, (
        f"{f}: data validation failed: expect_column_values_to_be_unique on 'sha256' failed "
        "(e.g. domain=tgt, path=a/0.png, label=a, split=train, width=16, mode=RGB; domain=tgt, path=b/copy.png, label=b, split=train, width=16, mode=RGB)"
    ), {}


def target_class_unknown_to_source(base: Path):
    f = image_folder(base, classes=("a", "zz"), offset=1000)
    return f, (
        f"{f}: data validation failed: target 'tgt' has class(es) 'zz' (6 images) that source 'src' does not have; "
        "its classes are 'a', 'b' (expect_column_values_to_be_in_set on 'label')"
    ), {"source": "src"}, (
        f"rename (or merge) the class folders under {f} to the classes of source 'src', "
        "or leave --source out to ingest the folder alone (a run pairing it with that source is refused the same way)"
    )


def one_class_in_two_unicode_forms(base: Path):
    f = image_folder(base, classes=("zwei-\u00fc", "zwei-u\u0308"), offset=1100)  # NFC and NFD: one name on screen
    return f, f"{f}/zwei-\u00fc: the same class name as {f}/zwei-u\u0308, written in another Unicode form; merge the two folders", {}


def image_too_small(base: Path):
    f = image_folder(base)
    write_png(f / "a/thumb.png", 950, size=4)
    return f, (
        f"{f}: data validation failed: expect_column_values_to_be_between on 'width' failed "
        "(e.g. domain=tgt, path=a/thumb.png, label=a, split=train, width=4, mode=RGB) (+1 more failed expectations, on the same file)"
    ), {}, f"{f}/a/thumb.png is 4x4 px: each side must be 8-4096 px; remove or enlarge the 1 image(s) under 8 px and ingest again"


def lab_mode_image(base: Path):
    """A CIELAB TIFF: a mode outside the allowed set (a float grey image, the example until 2026-12-06, is
    now scaled as 32-bit grey images are)."""
    f = image_folder(base)
    Image.new("LAB", (16, 16), (50, 0, 0)).save(f / "b/lab.tif")
    return f, (
        f"{f}: data validation failed: expect_column_values_to_be_in_set on 'mode' failed "
        "(e.g. domain=tgt, path=b/lab.tif, label=b, split=train, width=16, mode=LAB)"
    ), {}


CASES: list[Case] = [
    corrupt, truncated, several_corrupt, non_image_file, non_image_beside_classes, decompression_bomb, oversized,
    symlink_file_outside, symlink_class_outside, dotdot_escape, dotdot_to_root, class_read_twice, broken_symlink,
    symlink_loop, named_pipe, empty_class, empty_target, target_of_hidden_files_only, image_outside_any_class,
    not_a_folder, class_named_like_the_manifest, line_break_in_a_name, carriage_return_in_a_class, name_not_utf8,
    duplicate_image, target_class_unknown_to_source, image_too_small, lab_mode_image, one_class_in_two_unicode_forms,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_refused_naming_the_file_and_changes_nothing(project: Path, tmp_path: Path, case: Case):
    (tmp_path / "user").mkdir()
    folder, message, kw, *hint = case(tmp_path / "user")
    before = snapshot(project)
    with pytest.raises(DataError) as err:
        ingest_domain(folder, "tgt", project / "data/raw", replace=True, report_dir=tmp_path / "report", **kw)
    assert str(err.value).split("; full report: ")[0] == message
    if hint:
        assert err.value.hint == hint[0]
    assert snapshot(project) == before  # data/, the DVC cache, pointers, git's view, dvc.lock
    assert leftovers(project) == []  # no staged or moved-aside copy
    assert [r.path for r in read_manifest(project / "data/raw/tgt")] == [f"t{i}.png" for i in range(6)]


def test_rgba_palette_16bit_and_mixed_modes_are_accepted_and_decode_right(project: Path, tmp_path: Path):
    f = tmp_path / "modes"
    (f / "a").mkdir(parents=True)
    (f / "b").mkdir()
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[...] = (200, 100, 50, 128)
    rgba[:, 8:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(f / "a/rgba.png")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30, 250, 5, 90])
    palette.paste(2, (8, 0, 16, 16))
    palette.save(f / "a/palette.png")
    palette.save(f / "a/palette-transparent.png", transparency=2)  # index 2 = fully transparent
    # the same picture as a GIF would be a duplicate (suite udaflow.domain decodes and compares): one colour apart
    palette.putpalette([0, 0, 0, 10, 200, 30, 250, 5, 91])
    palette.save(f / "b/palette.gif")
    deep = np.zeros((16, 16), dtype=np.uint16)
    deep[:, 4:8], deep[:, 8:12], deep[:, 12:] = 1000, 2000, 4000  # a 12-bit sensor's range in 16 bits
    Image.fromarray(deep).save(f / "a/deep.png")
    deep[15, 12:] = 3000  # below the row the levels are read on: not the PNG's picture again
    Image.fromarray(deep).save(f / "b/deep.tif")
    Image.new("LA", (16, 16), (120, 255)).save(f / "b/la.png")
    Image.new("L", (16, 16), 77).save(f / "b/gray.jpg")
    Image.new("1", (16, 16), 1).save(f / "b/bits.bmp")
    write_png(f / "b/rgb.png", 5)

    result = ingest_domain(f, "modes", project / "data/raw", report_dir=tmp_path / "report")
    out = project / "data/raw/modes"
    assert result.images == 10 and result.labelled and result.changed and leftovers(project) == []
    modes = {r.path: r.mode for r in read_manifest(out)}
    assert modes == {
        "a/deep.png": "I;16", "a/palette-transparent.png": "P", "a/palette.png": "P", "a/rgba.png": "RGBA",
        "b/bits.bmp": "1", "b/deep.tif": "I;16", "b/gray.jpg": "L", "b/la.png": "LA", "b/palette.gif": "P", "b/rgb.png": "RGB",
    }
    assert all(r.decodable and r.width == r.height == 16 for r in read_manifest(out))

    def rgb(path: str) -> np.ndarray:  # (16, 16, 3) as the loaders decode it
        return decode_image(out / path, 16).transpose(1, 2, 0).astype(int)

    px = rgb("a/rgba.png")  # half transparent over black: 200*128/255 ~ 100 ..., the opaque half as is
    assert np.abs(px[:, :8] - (100, 50, 25)).max() <= 1 and (px[:, 8:] == (200, 100, 50)).all()
    for name, right in (("a/palette.png", (250, 5, 90)), ("b/palette.gif", (250, 5, 91))):
        assert (rgb(name)[:, :8] == (10, 200, 30)).all() and (rgb(name)[:, 8:] == right).all()
    px = rgb("a/palette-transparent.png")
    assert (px[:, :8] == (10, 200, 30)).all() and (px[:, 8:] == 0).all()
    for name in ("a/deep.png", "b/deep.tif"):
        px = rgb(name)
        assert (px == px[..., :1]).all()  # grey
        levels = [int(px[0, x, 0]) for x in (0, 4, 8, 12)]  # 16-bit values 0, 1000, 2000, 4000
        assert levels[0] == 0 and levels == sorted(set(levels)) and levels[-1] > 128  # kept apart, not clipped to white
    assert (rgb("b/la.png") == 120).all() and (rgb("b/gray.jpg") == 77).all() and (rgb("b/bits.bmp") == 255).all()
    # a 32-bit "I" image with negative values wrapped around uint8 (-5 became 251 / 255 of its maximum): negatives are black
    signed = np.zeros((16, 16), dtype=np.int32)
    signed[:, :8], signed[:, 8:] = -100, 100
    grey = decode_image(_as_file(Image.fromarray(signed, "I")), 16)[0]
    assert (grey[:, :8] == 0).all() and (grey[:, 8:] == 255).all()


def _as_file(img) -> "io.BytesIO":
    import io

    out = io.BytesIO()
    img.save(out, "TIFF")
    out.seek(0)
    return out


def test_a_transparent_colour_decodes_as_alpha_does_in_every_mode(tmp_path: Path):
    """The same picture, a bar over a transparent background, stored five ways (PNG optimisers switch
    between them): RGBA, LA and a palette's transparent index decoded the background black, a grey or
    RGB image's transparent colour (tRNS) left it white. Now every way decodes to the same pixels."""
    alpha = np.zeros((16, 16), dtype=np.uint8)
    alpha[:, 6:10] = 255  # the bar
    grey = np.where(alpha == 255, 40, 255).astype(np.uint8)  # the bar 40 on a background 255, which is transparent
    stored = {
        "rgba.png": (Image.fromarray(np.dstack([grey] * 3 + [alpha]), "RGBA"), {}),
        "la.png": (Image.fromarray(np.dstack([grey, alpha]), "LA"), {}),
        "grey-trns.png": (Image.fromarray(grey, "L"), {"transparency": 255}),
        "rgb-trns.png": (Image.fromarray(np.dstack([grey] * 3), "RGB"), {"transparency": (255, 255, 255)}),
        "deep-trns.png": (Image.fromarray(grey.astype(np.uint16) * 257), {"transparency": 65535}),
        "palette-trns.png": (Image.fromarray(np.dstack([grey] * 3), "RGB").quantize(2), {}),
    }
    palette, _ = stored["palette-trns.png"]
    stored["palette-trns.png"] = (palette, {"transparency": int(np.asarray(palette)[0, 0])})  # the background's index
    decoded = {}
    for name, (img, kw) in stored.items():
        img.save(tmp_path / name, **kw)
        decoded[name] = decode_image(tmp_path / name, 16)
    assert Image.open(tmp_path / "grey-trns.png").info["transparency"] == 255  # stored as tRNS, not alpha
    for name, px in decoded.items():
        assert (px[:, :, 6:10] == 40).all() and (px[:, :, :6] == 0).all() and (px[:, :, 10:] == 0).all(), name


def test_a_float_grey_image_is_scaled_as_the_readme_says(tmp_path: Path):
    """A 32-bit float grey TIFF (mode F, as scientific cameras and numpy pipelines write them) was refused
    by the mode check although 32-bit grey images are scaled: one in 0-1 is taken as it is, one beyond
    by its own maximum, negatives and NaN are black."""
    unit = np.zeros((16, 16), dtype=np.float32)
    unit[:, 4:8], unit[:, 8:12], unit[:, 12:] = 0.25, 0.5, float("nan")
    unit[:, :2] = -3.0
    grey = decode_image(_as_file(Image.fromarray(unit, "F")), 16)[0]
    assert (grey[:, :4] == 0).all() and (grey[:, 4:8] == 63).all() and (grey[:, 8:12] == 127).all() and (grey[:, 12:] == 0).all()
    wide = np.full((16, 16), 1000.0, dtype=np.float32)
    wide[:, 8:] = 4000.0
    grey = decode_image(_as_file(Image.fromarray(wide, "F")), 16)[0]
    assert (grey[:, :8] == 63).all() and (grey[:, 8:] == 255).all()


def test_nested_folders_are_read_and_hidden_files_skipped(project: Path, tmp_path: Path):
    f = image_folder(tmp_path / "nested", offset=2000)
    write_png(f / "a/batch1/0.png", 2100)  # same file name as a/0.png, one level down
    write_png(f / "b/batch1/deeper/x.png", 2101)
    write_png(f / "b/.thumbs/0.png", 2102)
    (f / "a/.DS_Store").write_bytes(b"\0\0")
    (f / ".git").mkdir()
    (f / "b/Thumbs.db").write_bytes(b"\0\0")  # the operating systems' litter: skipped as hidden files are
    (f / "desktop.ini").write_bytes(b"[.ShellClassInfo]")
    write_png(f / "__MACOSX/a/._0.png", 2103)  # a zip made on a Mac: not a class folder
    # a Synology NAS's thumbnails of each photo (smaller copies: they leaked test images into training),
    # the file Finder writes for a folder's icon, and a USB drive's Windows folders
    write_png(f / "a/@eaDir/0.png/SYNOFILE_THUMB_M.png", 2104)
    (f / "b/Icon\r").write_bytes(b"")
    write_png(f / "$RECYCLE.BIN/a/0.png", 2105)
    (f / "System Volume Information").mkdir()
    result = ingest_domain(f, "nested", project / "data/raw", report_dir=tmp_path / "report")
    rows = read_manifest(project / "data/raw/nested")
    assert result.images == 14 == len(rows)
    assert {(r.path, r.label) for r in rows if "/batch1/" in r.path} == {("a/batch1/0.png", "a"), ("b/batch1/deeper/x.png", "b")}
    assert not [r for r in rows if "/." in r.path]
    for r in rows:
        assert (project / "data/raw/nested" / r.path).read_bytes() == (f / r.path).read_bytes()


def test_an_unlabelled_source_is_refused_before_staging(project: Path, tmp_path: Path):
    """--source names a domain without labels: refused in words before anything is copied (until
    2026-12-04 every labelled target image failed the label check against an empty class list)."""
    before = snapshot(project)
    with pytest.raises(DataError) as err:
        ingest_domain(image_folder(tmp_path / "user"), "new", project / "data/raw", source="tgt", report_dir=tmp_path / "report")
    assert str(err.value) == "--source 'tgt' has no labelled images: a source domain is one with classes"
    assert err.value.hint.startswith("name a labelled domain")
    assert snapshot(project) == before and leftovers(project) == []


def test_an_image_pil_only_warns_about_is_refused_in_one_line_without_its_warning(project: Path, tmp_path: Path, recwarn):
    """100M pixels: PIL warns (DecompressionBombWarning, from 89M) rather than refuses (from 179M); the
    warning printed before udaflow's own error line."""
    f = image_folder(tmp_path / "user")
    _png_header(f / "a/pano.png", 10000, 10000)
    with pytest.raises(DataError) as err:
        ingest_domain(f, "tgt", project / "data/raw", replace=True, report_dir=tmp_path / "report")
    assert str(err.value) == f"{f}/a/pano.png: 10000x10000 px, over the 4096 px limit; refused from its header, not decoded"
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_class_name_in_macos_unicode_form_is_the_source_s_class(project: Path, tmp_path: Path):
    """'zwei-ü' from macOS or a zip is 'u' + a combining mark (NFD): it printed as the source's own class yet was
    refused as one the source lacks. Labels are kept in one form (NFC), and so is the copy's class folder."""
    nfc, nfd = "zwei-\u00fc", "zwei-u\u0308"
    ingest_domain(image_folder(tmp_path / "studio", classes=(nfc, "b"), offset=1200), "studio", project / "data/raw",
                  report_dir=tmp_path / "report")
    result = ingest_domain(image_folder(tmp_path / "mac", classes=(nfd, "b"), offset=1300), "mac", project / "data/raw",
                           source="studio", report_dir=tmp_path / "report")
    assert result.images == 12
    rows = read_manifest(project / "data/raw/mac")
    assert {r.label for r in rows} == {nfc, "b"}
    assert all((project / "data/raw/mac" / r.path).is_file() for r in rows) and (project / "data/raw/mac" / nfc).is_dir()
