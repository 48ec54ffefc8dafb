"""The Great Expectations suites: a clean shift passes; each bad input fails the named expectation."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from udaflow.data.domains import build_domain
from udaflow.data.expectations import validate_shift
from udaflow.data.ingest import ingest_domain, ingest_folder
from udaflow.data.manifest import DataError


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gx") / "raw"
    build_domain("synth", root, seed=0, synth_size=100)
    other = tmp_path_factory.mktemp("other")
    build_domain("synth", other, seed=7, synth_size=60)
    (other / "synth" / "manifest.csv").unlink()
    ingest_folder(other / "synth", "target", root, 0.3, 0)
    return root


@pytest.fixture
def root(clean_root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "raw"
    shutil.copytree(clean_root, copy)
    return copy


def _rows(domain: Path) -> list[dict]:
    with (domain / "manifest.csv").open() as fh:
        return list(csv.DictReader(fh))


def _failed(report) -> set[str]:
    return {f.expectation for f in report.failures}


def test_clean_shift_passes_and_writes_gx_result_and_data_docs(root: Path, tmp_path: Path):
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    assert report.success, report.error()
    assert report.statistics["images"] == 160 and report.statistics["failed"] == 0
    payload = json.loads(report.result_json.read_text())
    assert payload["success"] is True and set(payload["suites"]) == {"udaflow.images", "udaflow.classes"}
    assert report.data_docs.name == "index.html" and report.data_docs.exists()
    assert list((tmp_path / "out/data_docs").rglob("validations/udaflow/images/**/*.html"))


def test_undecodable_png_fails_and_names_the_file(root: Path, tmp_path: Path):
    victim = _rows(root / "target")[3]["path"]
    (root / "target" / victim).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    assert not report.success
    assert "expect_column_values_to_be_in_set" in _failed(report)  # decodable in {True}
    assert "expect_column_pair_values_to_be_equal" in _failed(report)  # checksum no longer the manifest's
    assert victim in report.error()


def test_image_leaked_between_target_train_and_test_fails(root: Path, tmp_path: Path):
    rows = _rows(root / "target")
    train = next(r for r in rows if r["split"] == "train")
    test = next(r for r in rows if r["split"] == "test")
    shutil.copyfile(root / "target" / train["path"], root / "target" / test["path"])
    ingest_src = tmp_path / "leaky"
    shutil.copytree(root / "target", ingest_src)
    (ingest_src / "manifest.csv").unlink()
    # re-describe so the manifest is honest about the duplicate: only the leak is left to catch
    from udaflow.data.manifest import describe_image, write_manifest

    write_manifest(root / "target", [describe_image(root / "target" / r["path"], root / "target", r["label"], r["split"]) for r in rows])
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    assert _failed(report) == {"expect_column_values_to_be_unique"}
    assert "sha256" in report.error() and test["path"] in report.error()


def test_image_shared_between_source_and_target_fails(root: Path, tmp_path: Path):
    src = _rows(root / "synth")[0]
    tgt = _rows(root / "target")[0]
    shutil.copyfile(root / "synth" / src["path"], root / "target" / tgt["path"])
    from udaflow.data.manifest import describe_image, write_manifest

    write_manifest(root / "target", [describe_image(root / "target" / r["path"], root / "target", r["label"], r["split"]) for r in _rows(root / "target")])
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    assert _failed(report) == {"expect_column_values_to_be_unique"}
    assert report.error().startswith(f"data validation failed: 1 image(s) of target 'target' are also in source 'synth' (e.g. target/{tgt['path']} = synth/{src['path']}); "
                                     "a target must be images the source does not hold (expect_column_values_to_be_unique on 'sha256')")


def _resave(src: Path, dest: Path, how: str) -> None:
    """`src`'s picture into `dest` in other bytes: the kinds of copy a file checksum misses."""
    from PIL import Image, PngImagePlugin

    with Image.open(src) as img:
        img.load()
        if how == "metadata":  # a PNG re-saved by a tool that adds a text chunk and compresses harder
            info = PngImagePlugin.PngInfo()
            info.add_text("Software", "an image editor")
            img.save(dest, format="PNG", pnginfo=info, compress_level=9)
        elif how == "bmp":  # another lossless format under the same name
            img.save(dest, format="BMP")
        elif how == "turned":  # stored turned, with the EXIF tag that shows it upright (as phones write photos)
            exif = Image.Exif()
            exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
            img.transpose(Image.Transpose.ROTATE_90).save(dest, format="PNG", exif=exif)


@pytest.mark.parametrize("how", ["metadata", "bmp", "turned"])
def test_the_same_picture_in_other_bytes_across_target_train_and_test_fails_in_words(root: Path, tmp_path: Path, how: str):
    from udaflow.data.manifest import describe_image, write_manifest

    rows = _rows(root / "target")
    train = next(r for r in rows if r["split"] == "train")
    test = next(r for r in rows if r["split"] == "test")
    _resave(root / "target" / train["path"], root / "target" / test["path"], how)
    write_manifest(root / "target", [describe_image(root / "target" / r["path"], root / "target", r["label"], r["split"]) for r in rows])
    assert _rows(root / "target")[rows.index(test)]["sha256"] != next(r for r in _rows(root / "target") if r["path"] == train["path"])["sha256"]
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    assert [(f.expectation, f.column) for f in report.failures] == [("expect_column_values_to_be_unique", "pixels")]
    error = report.error()
    assert "1 image(s) repeat another's picture in other bytes" in error and "decode to the same pixels" in error
    assert {f"target/{train['path']}", f"target/{test['path']}"} <= set(error.replace(" and ", " ").replace("(e.g. ", " ").split())
    assert "a copy inside domain 'target' (" in error and "scores a model on what it trained on" in error
    # the same check stops `udaflow data ingest` of such a folder alone (suite udaflow.domain), before anything is copied in
    folder = tmp_path / "resaved"
    shutil.copytree(root / "target", folder)
    (folder / "manifest.csv").unlink()
    with pytest.raises(DataError, match="repeat another's picture in other bytes") as refused:
        ingest_domain(folder, "again", root, holdout_fraction=0.3, report_dir=tmp_path / "ingest")
    assert str(refused.value).startswith(f"{folder}: data validation failed: 1 image(s) repeat another's picture in other bytes (e.g. again/")
    assert not (root / "again").exists() and not list(root.glob(".again*"))


def test_a_source_image_re_saved_into_the_target_fails_as_a_leak_and_a_byte_copy_beside_it_does_not_hide_it(root: Path, tmp_path: Path):
    from udaflow.data.manifest import describe_image, write_manifest

    src = _rows(root / "synth")[0]
    rows = _rows(root / "target")
    _resave(root / "synth" / src["path"], root / "target" / rows[0]["path"], "metadata")
    write_manifest(root / "target", [describe_image(root / "target" / r["path"], root / "target", r["label"], r["split"]) for r in rows])
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    assert [(f.expectation, f.column) for f in report.failures] == [("expect_column_values_to_be_unique", "pixels")]
    assert "target 'target' holds source images; a target must be images the source does not hold" in report.error()
    assert report.hint().endswith("take the copies out of the folder that holds them and make it that domain's new version "
                                  "(`udaflow data ingest DIR --name NAME --replace`)")
    assert f"synth/{src['path']}" in report.error() and f"target/{rows[0]['path']}" in report.error()
    # a byte-for-byte copy as well: the checksum check names it first, and the re-saved one is still counted
    shutil.copyfile(root / "synth" / src["path"], root / "target" / rows[1]["path"])
    write_manifest(root / "target", [describe_image(root / "target" / r["path"], root / "target", r["label"], r["split"]) for r in rows])
    report = validate_shift(root, "synth", "target", tmp_path / "out2")
    assert [f.column for f in report.failures] == ["sha256", "pixels"]
    assert report.error().startswith("data validation failed: 1 image(s) of target 'target' are also in source 'synth'")
    assert "1 image(s) repeat another's picture in other bytes" in report.failures[1].describe()


@pytest.mark.parametrize("second", ["copy", "twin"])
def test_large_images_are_compared_by_sketch_then_by_every_pixel(root: Path, tmp_path: Path, second: str):
    """Photos from 256 px a side are digested from box averages first: a re-saved photo is still caught, and a
    photo with the same sketch but other pixels (two pixels of one box traded) is not taken for a copy."""
    import numpy as np

    from udaflow.data.manifest import describe_image, write_manifest

    rows = _rows(root / "target")
    train = next(r for r in rows if r["split"] == "train")
    test = next(r for r in rows if r["split"] == "test")
    photo = np.random.default_rng(3).integers(0, 256, (260, 320, 3), dtype=np.uint8)
    photo[5, 6:8] = 100
    Image.fromarray(photo).save(root / "target" / train["path"], format="PNG")
    if second == "twin":
        photo[5, 6, 1], photo[5, 7, 1] = 90, 110
    Image.fromarray(photo).save(root / "target" / test["path"], format="BMP" if second == "copy" else "PNG")
    write_manifest(root / "target", [describe_image(root / "target" / r["path"], root / "target", r["label"], r["split"]) for r in rows])
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    if second == "copy":
        assert [(f.expectation, f.column) for f in report.failures] == [("expect_column_values_to_be_unique", "pixels")]
        assert "1 image(s) repeat another's picture in other bytes" in report.error()
    else:
        assert report.success, report.error()


def test_one_pixel_apart_is_not_the_same_picture(root: Path, tmp_path: Path):
    from PIL import Image

    from udaflow.data.manifest import describe_image, write_manifest

    rows = _rows(root / "target")
    train = next(r for r in rows if r["split"] == "train")
    test = next(r for r in rows if r["split"] == "test")
    with Image.open(root / "target" / train["path"]) as img:
        near = img.convert("RGB")
    near.putpixel((0, 0), tuple((v + 1) % 256 for v in near.getpixel((0, 0))))
    near.save(root / "target" / test["path"])
    write_manifest(root / "target", [describe_image(root / "target" / r["path"], root / "target", r["label"], r["split"]) for r in rows])
    assert validate_shift(root, "synth", "target", tmp_path / "out").success


def test_target_class_unknown_to_the_source_fails(root: Path, tmp_path: Path):
    folder = tmp_path / "with_new_class"
    shutil.copytree(root / "target", folder)
    (folder / "manifest.csv").unlink()
    (folder / "eleven").mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 40, 10, 200)).save(folder / "eleven" / f"{i}.png")
    ingest_folder(folder, "target", root, 0.3, 0)
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    assert "expect_column_values_to_be_in_set" in _failed(report)
    assert "has class(es) 'eleven' (3 images) that source 'synth' does not have" in report.error()
    # the way out of this failure, not of a domain changed since its ingest (a probe's `dvc checkout <data.root>/<name>`)
    assert report.hint() == ("nothing was trained, versioned or registered; pair the target with a source that has those classes, "
                             "or ingest the target again without them (`udaflow data ingest DIR --name NAME --replace`)")


def test_too_few_images_per_source_class_fails(root: Path, tmp_path: Path):
    report = validate_shift(root, "synth", "target", tmp_path / "out", min_per_class=50)
    assert _failed(report) == {"expect_column_values_to_be_between"}
    assert report.failures[0].suite == "udaflow.classes"
    # in the source's terms, naming its folder (the count per class: 100 images over 10 classes, 80% train)
    assert report.error().startswith(f"data validation failed: source 'synth' ({root / 'synth'}) has too few images of a class: '0' has ")
    assert "each source class needs at least 50 (data.min_per_class)" in report.error()


def test_a_source_with_one_class_fails_in_words(root: Path, tmp_path: Path):
    from udaflow.data.manifest import read_manifest, write_manifest

    write_manifest(root / "synth", [dataclasses.replace(r, label="0") for r in read_manifest(root / "synth")])
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    summaries = [f.summary for f in report.failures if f.suite == "udaflow.classes"]
    assert summaries == [f"source 'synth' ({root / 'synth'}) has one class ('0'): a source domain is labelled, a folder per class, "
                         "with two classes or more"]


def test_a_file_gone_since_the_manifest_names_the_file_and_the_way_back(root: Path, tmp_path: Path):
    victim = _rows(root / "target")[5]["path"]
    (root / "target" / victim).unlink()
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    first = report.failures[0]
    assert first.expectation == "expect_column_pair_values_to_be_equal"
    assert first.summary == (f"{root / 'target' / victim} is missing since domain 'target' was built or ingested: its checksum is not the "
                             f"manifest's; `dvc checkout {root / 'target'}` restores the versioned files, or ingest the folder again")


def test_a_file_put_in_a_domain_after_its_manifest_is_named_and_dvcignore_d_files_are_not(root: Path, tmp_path: Path):
    """A probe put notes.txt (and a truncated PNG) into an ingested domain: only the manifest's files were read, so
    the run's DVC commit versioned them into a new version of the domain and a model was registered."""
    from udaflow.versioning import init_repo

    init_repo(root)
    (root / ".dvcignore").write_text("# editors\n.DS_Store\n__pycache__/\n*.sw[po]\n")
    (root / "target" / ".DS_Store").write_bytes(b"\x00finder")
    (root / "target" / "__pycache__").mkdir()
    (root / "target" / "__pycache__" / "x.pyc").write_bytes(b"\x00")
    assert validate_shift(root, "synth", "target", tmp_path / "out").success  # what DVC leaves out of the version
    label = _rows(root / "target")[0]["path"].split("/")[0]
    (root / "target" / label / "notes.txt").write_text("hello\n")
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    first = report.failures[0]
    assert first.expectation == "expect_column_pair_values_to_be_equal"
    assert first.summary == (f"{root / 'target' / label / 'notes.txt'} is not in the manifest of domain 'target': it was put in the folder "
                             "after the domain was built or ingested, and a run would version it unchecked; remove it, or ingest a "
                             "folder that holds it with --replace")
    # its other failures (decodable, mode, sizes, split) are that file's too: said so, not read as more problems
    assert f"(+{len(report.failures) - 1} more failed expectations, on the same file); full report: " in report.error()
    (root / "target" / label / "notes.txt").unlink()
    assert validate_shift(root, "synth", "target", tmp_path / "out").success


def test_wrong_image_size_and_mode_fail(root: Path, tmp_path: Path):
    rows = _rows(root / "target")
    Image.new("CMYK", (4, 4)).save(root / "target" / rows[0]["path"].replace(".png", ".tif"))
    Image.new("LAB", (32, 32)).save(root / "target" / "odd.tiff")  # CIELAB: no allowed mode (a float grey image is, since 6c15b4c)
    from udaflow.data.manifest import describe_image, write_manifest

    extra = [describe_image(root / "target" / "odd.tiff", root / "target", "", "train")]
    small = root / "target" / rows[1]["path"]
    Image.new("RGB", (4, 4)).save(small)
    write_manifest(root / "target", [describe_image(root / "target" / r["path"], root / "target", r["label"], r["split"]) for r in rows] + extra)
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    failed = _failed(report)
    assert "expect_column_values_to_be_between" in failed  # 4x4 image
    assert "expect_column_values_to_be_in_set" in failed  # mode LAB


def test_missing_domain_is_a_data_error(root: Path, tmp_path: Path):
    with pytest.raises(DataError, match="nope"):
        validate_shift(root, "synth", "nope", tmp_path / "out")


def test_label_check_reads_only_labelled_target_rows(root: Path, tmp_path: Path):
    """The row conditions (GX Condition objects): an empty target label is not checked, a source row
    never is, a target label unknown to the source is, alone."""
    from udaflow.data.manifest import read_manifest, write_manifest

    rows = read_manifest(root / "target")
    rows[0] = dataclasses.replace(rows[0], label="")
    rows[1] = dataclasses.replace(rows[1], label="zz")
    write_manifest(root / "target", rows)
    report = validate_shift(root, "synth", "target", tmp_path / "out")
    assert [(f.expectation, f.column) for f in report.failures] == [("expect_column_values_to_be_in_set", "label")]
    assert [(e["domain"], e["path"]) for e in report.failures[0].examples] == [("target", rows[1].path)]
    assert report.failures[0].summary.startswith("target 'target' has class(es) 'zz' (1 image) that source 'synth' does not have; its classes are '0', '1',")
    payload = json.loads(report.result_json.read_text())["suites"]["udaflow.images"]["results"]
    label_check = next(r for r in payload if r["expectation_config"]["kwargs"].get("column") == "label")
    assert label_check["result"]["unexpected_count"] == 1 and label_check["result"]["element_count"] == 59  # target rows with a label
