"""`ingest_domain` in a project laid out like this repository (its .gitignore and a dvc.yaml with stages):
new names, re-ingests, --replace, refusals, leakage warnings, and all-or-nothing on any failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from udaflow import versioning
from udaflow.data.domains import build_domain
from udaflow.data.ingest import ingest_domain
from udaflow.data.manifest import DataError, read_manifest

from ingest_project import REPO, image_folder, leftovers, make_project, snapshot


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """git + DVC + the repository's own .gitignore and a dvc.yaml whose stage outputs `data/raw/builtin`."""
    return make_project(tmp_path / "proj")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A labelled ImageFolder (synth, 60 images), a flat unlabelled folder, and a changed flat folder."""
    scratch = tmp_path_factory.mktemp("user")
    build_domain("synth", scratch / "a", seed=0, synth_size=60)
    labelled = scratch / "a/synth"
    (labelled / "manifest.csv").unlink()
    out = {"labelled": labelled}
    for key, seed in (("flat", 5), ("flat-v2", 11)):
        build_domain("synth", scratch / key, seed=seed, synth_size=30)
        flat = scratch / f"{key}-flat"
        flat.mkdir()
        for f in sorted((scratch / key / "synth").glob("*/*.png")):
            shutil.copyfile(f, flat / f"{f.parent.name}-{f.name}")
        out[key] = flat
    return out


def ingest(project: Path, folder: Path, name: str, **kw):
    kw.setdefault("report_dir", project / "runs/ingest" / name)
    return ingest_domain(folder, name, project / "data/raw", seed=0, **kw)


def test_new_names_are_versioned_in_the_real_layout(project: Path, folders):
    # labelled, with no other domain in the project: validated on its own
    src = ingest(project, folders["labelled"], "my-source")
    assert src.labelled and src.images == 60 and src.changed and src.pointer == "data/raw/my-source.dvc"
    assert src.md5.endswith(".dir") and (project / "data/raw/my-source.dvc").read_text().count(src.md5) == 1
    tgt = ingest(project, folders["flat"], "my-target", source="my-source")
    assert not tgt.labelled and tgt.validated_against == "my-source" and tgt.changed
    assert {r.split for r in read_manifest(project / "data/raw/my-target")} == {"train"}
    # DVC finds both pointers (the repository's .gitignore must not hide data/raw/ from it) ...
    assert [k.rsplit(":", 1)[-1] for k in versioning.status(project)] == ["build"]  # only the never-built stage output
    assert versioning.dataset_version(project / "data/raw/my-target").md5 == tgt.md5
    # ... and git sees only the pointers, not the images
    untracked = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "data"], cwd=project, capture_output=True, text=True).stdout
    assert sorted(untracked.split()[1::2]) == ["data/raw/my-source.dvc", "data/raw/my-target.dvc"]
    assert any((project / "dvc-remote").rglob("*.dir"))  # pushed


def test_reingest_needs_replace_and_keeps_the_old_version_restorable(project: Path, folders):
    first = ingest(project, folders["flat"], "tgt")
    again = ingest(project, folders["flat"], "tgt")
    assert not again.changed and again.md5 == first.md5 and again.replaced is None

    before = snapshot(project)
    with pytest.raises(DataError, match="already exists with other content") as err:
        ingest(project, folders["flat-v2"], "tgt")
    assert "--replace" in err.value.hint
    assert snapshot(project) == before

    subprocess.run(["git", "add", "data/raw/tgt.dvc"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tgt v1"], cwd=project, check=True)
    new = ingest(project, folders["flat-v2"], "tgt", replace=True)
    assert new.changed and new.md5 != first.md5 and new.replaced == first.md5 and new.replaced_in_git
    # the old version comes back the way the CLI says: the committed pointer + dvc checkout
    subprocess.run(["git", "checkout", "HEAD", "--", "data/raw/tgt.dvc"], cwd=project, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "checkout", "data/raw/tgt.dvc"], cwd=project, check=True, capture_output=True)
    assert versioning.dataset_version(project / "data/raw/tgt").md5 == first.md5


def test_refusals_name_the_problem_and_change_nothing(project: Path, folders):
    ingest(project, folders["labelled"], "src")
    before = snapshot(project)
    with pytest.raises(DataError, match="output of dvc.yaml stage 'build'"):
        ingest(project, folders["flat"], "builtin")
    with pytest.raises(DataError, match="is the domain being ingested"):
        ingest(project, folders["flat"], "src", source="src")
    with pytest.raises(DataError, match="source domain 'nosuch' not found"):
        ingest(project, folders["flat"], "tgt", source="nosuch")
    with pytest.raises(DataError, match="domain name 'Bad Name'"):
        ingest(project, folders["flat"], "Bad Name")
    assert snapshot(project) == before
    assert not list((project / "data/raw").glob(".*"))  # no staged copy left behind


def test_overlap_with_any_domain_is_reported_and_refused_when_paired(project: Path, folders, tmp_path: Path):
    ingest(project, folders["labelled"], "src")
    ingest(project, folders["flat"], "other")
    leaky = tmp_path / "leaky"
    shutil.copytree(folders["flat-v2"], leaky)
    shutil.copyfile(next(folders["labelled"].glob("3/*.png")), leaky / "copied.png")
    shutil.copyfile(sorted(folders["flat"].glob("*.png"))[0], leaky / "copied-too.png")
    result = ingest(project, leaky, "tgt")
    assert [(o.domain, o.count) for o in result.overlaps] == [("other", 1), ("src", 1)]
    assert result.overlaps[1].examples[0][0] == "copied.png" and result.overlaps[1].examples[0][1].startswith("3/")
    assert "a run pairing the two is refused" in result.overlaps[0].describe("tgt")
    # pairing them: the leakage check refuses, and `tgt` stays as it was
    before = snapshot(project)
    with pytest.raises(DataError, match="expect_column_values_to_be_unique on 'sha256'"):
        ingest(project, leaky, "tgt", source="src", replace=True)
    assert snapshot(project) == before


def test_an_image_re_saved_in_other_bytes_is_an_overlap_too_and_refused_when_paired(project: Path, folders, tmp_path: Path):
    from PIL import Image, PngImagePlugin

    ingest(project, folders["labelled"], "src")
    leaky = tmp_path / "leaky"
    shutil.copytree(folders["flat-v2"], leaky)
    original = sorted(folders["labelled"].glob("7/*.png"))[0]
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "exported again")
    with Image.open(original) as img:
        img.convert("RGB").save(leaky / "exported.png", pnginfo=info, compress_level=1)  # other bytes, the same picture
    assert (leaky / "exported.png").read_bytes() != original.read_bytes()
    result = ingest(project, leaky, "tgt")
    assert [(o.domain, o.count, o.reencoded) for o in result.overlaps] == [("src", 1, 1)]
    assert result.overlaps[0].examples == [("exported.png", f"7/{original.name}")]
    assert result.overlaps[0].describe("tgt") == (f"1 image(s) of 'tgt' are also in domain 'src' (e.g. exported.png = src/7/{original.name}; "
                                                  "1 of them the same picture in other bytes); a run pairing the two is refused")
    before = snapshot(project)
    with pytest.raises(DataError, match="target 'tgt' holds source images"):
        ingest(project, leaky, "tgt", source="src", replace=True)
    assert snapshot(project) == before


def test_a_re_saved_photo_is_an_overlap_and_a_photo_with_its_sketch_but_other_pixels_is_not(project: Path, tmp_path: Path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(4)
    photos = tmp_path / "photos"
    for label in ("a", "b"):
        (photos / label).mkdir(parents=True)
        for i in range(2):
            photo = rng.integers(0, 256, (264, 300, 3), dtype=np.uint8)
            photo[0, :2] = 100
            Image.fromarray(photo).save(photos / label / f"{i}.png")
    ingest(project, photos, "big")
    target = tmp_path / "target"
    target.mkdir()
    with Image.open(photos / "a/0.png") as img:
        img.save(target / "copy.bmp")  # the same picture, other bytes
    with Image.open(photos / "b/1.png") as img:
        twin = np.asarray(img).copy()
    twin[0, 0, 2], twin[0, 1, 2] = 101, 99  # two pixels of one 2 x 2 box: its average, so the sketch, unchanged
    Image.fromarray(twin).save(target / "twin.png")
    Image.fromarray(rng.integers(0, 256, (264, 300, 3), dtype=np.uint8)).save(target / "own.png")
    result = ingest(project, target, "tgt")
    assert [(o.domain, o.count, o.reencoded, o.examples) for o in result.overlaps] == [("big", 1, 1, [("copy.bmp", "a/0.png")])]


def test_a_failed_push_after_the_copy_leaves_everything_as_it_was(project: Path, folders, tmp_path: Path):
    ingest(project, folders["flat"], "tgt")
    # a remote that cannot be written (a path under a regular file: refused even for root)
    (tmp_path / "not-a-folder").write_text("")
    (project / ".dvc/config.local").write_text(f"['remote \"local\"']\n    url = {tmp_path / 'not-a-folder' / 'remote'}\n")
    before = snapshot(project)
    for name, replace in (("new-name", False), ("tgt", True)):
        with pytest.raises(versioning.VersioningError, match="could not push to the default DVC remote 'local'"):
            ingest(project, folders["labelled"], name, replace=replace)
        assert snapshot(project) == before, name
    assert not [p for p in os.listdir(project / "data/raw") if p.startswith(".") and p != ".gitignore"]


def test_a_failed_ingest_undoes_its_own_writes_and_not_another_process_s(project: Path, folders, monkeypatch):
    """Another name's ingest (its lock is its own) and a hand-made `dvc commit` of a stage may finish while this
    ingest is inside its all-or-nothing block. Its rollback deleted every cache object new since it began and
    wrote back the .gitignore and dvc.lock it had read: the other version's objects (never pushed) were lost,
    its .gitignore line and a stage's dvc.lock entry undone. The same images under two names share their objects."""
    real = versioning.version_dataset
    theirs: dict[str, object] = {}

    def racing(path, *args, **kwargs):
        if Path(path).name != "mine":
            return real(path, *args, **kwargs)
        # another process's ingest finishing meanwhile, of the same images: the cache objects are shared
        theirs["result"] = ingest(project, folders["labelled"], "theirs")
        (project / "dvc.lock").write_text("schema: '2.0'\nstages:\n  other:\n    cmd: 'true'\n")  # and a `dvc commit` of a stage
        theirs["lock"] = (project / "dvc.lock").read_bytes()
        theirs["snapshot"] = snapshot(project)
        real(path, *args, **kwargs)  # this ingest's `dvc add`, then its push fails
        raise versioning.VersioningError(f"{path}: could not push to the default DVC remote")

    monkeypatch.setattr(versioning, "version_dataset", racing)
    with pytest.raises(versioning.VersioningError, match="could not push"):
        ingest(project, folders["labelled"], "mine")
    monkeypatch.undo()
    assert not (project / "data/raw/mine").exists() and not (project / "data/raw/mine.dvc").exists()
    assert (project / "dvc.lock").read_bytes() == theirs["lock"]
    after, during = snapshot(project), theirs["snapshot"]
    assert after["cache"] == during["cache"]  # theirs all there, none of this ingest's own
    assert after["data"] == {k: v for k, v in during["data"].items() if "/mine" not in k and "/.mine" not in k}
    assert after["git"] == during["git"].replace("?? data/raw/mine.dvc\n", "")
    assert not [k for k in versioning.status(project) if "theirs" in k]
    assert versioning.dataset_version(project / "data/raw/theirs").md5 == theirs["result"].md5
    assert ingest(project, folders["labelled"], "mine").changed  # and this one goes through on a retry


def test_a_replacing_ingest_waits_for_the_runs_reading_the_domain(project: Path, folders, capfd, tmp_path: Path):
    """A run holds its domains from validation to its gate (`domains_in_use`): `--replace` waits for it,
    saying so, instead of swapping the folder under it (it trained on the old images, then evaluated and
    gated on the new ones). A run starting while an ingest waits to replace, or swaps, is refused in one line."""
    import fcntl
    import threading
    import time

    ingest(project, folders["flat"], "tgt")
    folder, release = project / "data/raw/tgt", tmp_path / "release"
    reader = (f"import time; from pathlib import Path; from udaflow import versioning\n"
              f"folder, release = Path({str(folder)!r}), Path({str(release)!r})\n"
              "with versioning.domains_in_use([folder]):\n"
              "    before = (folder / 'manifest.csv').read_bytes(); print('holding', flush=True)\n"
              "    while not release.exists(): time.sleep(0.05)\n"
              "    print('same' if (folder / 'manifest.csv').read_bytes() == before else 'changed', flush=True)\n")
    run = subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, text=True)
    assert run.stdout.readline().strip() == "holding"
    done: dict[str, object] = {}
    replacing = threading.Thread(target=lambda: done.update(result=ingest(project, folders["flat-v2"], "tgt", replace=True)))
    replacing.start()
    marker = project / ".dvc/tmp/udaflow-ingest/tgt.replacing"
    for _ in range(1200):  # until the ingest holds its marker: it is waiting for the run
        time.sleep(0.05)
        if marker.exists():
            with open(marker) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.flock(fh, fcntl.LOCK_UN)
                except BlockingIOError:
                    break
    else:
        raise AssertionError("the replacing ingest never reached its swap")
    with pytest.raises(versioning.VersioningError, match="an ingest or a build of 'tgt' is replacing it"):
        with versioning.domains_in_use([folder]):  # a run starting now: refused, so it cannot keep the ingest waiting
            pass
    time.sleep(0.5)
    assert replacing.is_alive()  # still waiting for the run
    release.write_text("")
    assert run.stdout.read().strip() == "same" and run.wait() == 0  # the folder stayed as the run read it, to its end
    replacing.join(120)
    assert done["result"].changed and "waiting for the udaflow run(s) reading 'tgt' to finish" in capfd.readouterr().err


def test_dvc_repro_stages_and_the_bench_hold_their_domains_against_a_replace(project: Path, folders, tmp_path: Path, monkeypatch):
    """`udaflow stage ...` (what `dvc repro` runs) and `udaflow bench` hold their domains' in-use locks
    while they read them, as a pipeline run does: until 2026-12-06 a `--replace` swapped the folder under
    them. Each step is replaced by a probe that tries the lock a replacing ingest takes."""
    import fcntl

    from typer.testing import CliRunner

    from udaflow import bench, cli, steps

    ingest(project, folders["labelled"], "src")
    build_domain("synth", tmp_path / "other", seed=3, synth_size=60)
    (tmp_path / "other/synth/manifest.csv").unlink()
    ingest(project, tmp_path / "other/synth", "tgt", source="src")
    locks = project / ".dvc/tmp/udaflow-ingest"
    held: dict[str, list[str]] = {}

    def probe(step, result=None):
        def check(*args, **kwargs):
            held[step] = []
            for name in ("src", "tgt"):
                with open(locks / f"{name}.in-use", "a+") as fh:  # the lock `--replace` waits on
                    try:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        fcntl.flock(fh, fcntl.LOCK_UN)
                    except BlockingIOError:
                        held[step].append(name)
            return result
        return check

    class Report:
        success, statistics = True, {}

    class Outcome:
        path, cached = Path("model.pt"), True

    monkeypatch.setattr(steps, "validate_datasets", probe("validate", Report()))
    monkeypatch.setattr(steps, "pretrain", probe("pretrain", Outcome()))
    monkeypatch.setattr(steps, "adapt", probe("adapt", Outcome()))
    monkeypatch.setattr(steps, "drop_checkpoint", lambda cfg: None)
    monkeypatch.setattr(steps, "evaluate", probe("evaluate", {}))
    monkeypatch.setattr(bench, "run_bench", probe("bench", []))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(source="src", target="tgt", work_dir=str(tmp_path / "runs"))
    params["data"]["root"] = str(project / "data/raw")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("validate", "pretrain", "adapt", "evaluate"):
        result = CliRunner().invoke(cli.app, ["stage", stage, "--params", str(tmp_path / "params.yaml")])
        assert result.exit_code == 0, result.output
        if stage == "pretrain":  # the stage's output (dvc.yaml's), and the cache it came from
            assert " ".join(result.output.split()) == f"source model: {tmp_path}/runs/src-to-tgt/source_model.pt (read from the cache model.pt)"
    result = CliRunner().invoke(cli.app, ["bench", "--shifts", "src:tgt", "--methods", "dann", "--out", str(tmp_path / "b.json"),
                                          "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert held == {step: ["src", "tgt"] for step in ("validate", "pretrain", "adapt", "evaluate", "bench")}
    for name in ("src", "tgt"):  # and let go after
        with open(locks / f"{name}.in-use", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_val_fraction_keeps_a_labelled_val_split_the_adaptation_pool_never_sees(project: Path, folders, tmp_path: Path):
    """`data ingest --val-fraction`: a stratified labelled `val` split (the promotion gate's), the same
    `test` split as without it, validated by the GX suites; the target's adaptation pool leaves it out."""
    from udaflow.data.datasets import Domain, load_shift

    ingest(project, folders["labelled"], "src-a")
    build_domain("synth", tmp_path, seed=3, synth_size=60)
    (tmp_path / "synth/manifest.csv").unlink()
    result = ingest(project, tmp_path / "synth", "tgt-v", source="src-a", val_fraction=0.25)
    assert result.labelled and result.validated_against == "src-a"
    rows = read_manifest(project / "data/raw/tgt-v")
    by_split = {s: [r for r in rows if r.split == s] for s in ("train", "val", "test")}
    assert len(by_split["val"]) == 20 and all(r.label for r in by_split["val"])  # round(6 per class x 0.25) = 2 per class
    assert {r.label for r in by_split["val"]} == {r.label for r in rows}  # stratified: every class has val images
    from udaflow.data.manifest import stratified_split

    labels = [r.label for r in rows]
    assert [s == "test" for s in stratified_split(labels, 0.2, 0)] == [r.split == "test" for r in rows]  # test does not move
    shift = load_shift(project / "data/raw", "src-a", "tgt-v", 32, "holdout")
    assert len(shift.target_adapt) == len(by_split["train"])
    assert Domain.open(project / "data/raw", "tgt-v").has_labels("val")
    with pytest.raises(DataError, match="a val split needs labels"):
        ingest(project, folders["flat"], "flat-v", val_fraction=0.2)
    assert result.splits == {"train": 30, "val": 20, "test": 10} and result.classes_without_val == []


def test_val_fraction_too_small_for_the_classes_is_refused_or_named(project: Path, tmp_path: Path):
    """round(images x fraction) is 0 for a small class: no val split at all is refused (the user asked for
    one), a class without val images is named in the result (the CLI warns)."""
    small = tmp_path / "small"
    image_folder(small, classes=("a", "b"), per_class=3)
    before = snapshot(project)
    with pytest.raises(DataError, match=r"--val-fraction 0.1 keeps no image in a val split: .* \(the smallest has 3\)") as err:
        ingest(project, small, "vf3", val_fraction=0.1)
    assert err.value.hint == "raise --val-fraction to 0.17 or more (a val image of every class), or add images to each class"
    assert snapshot(project) == before
    image_folder(small, classes=("c",), per_class=10, offset=100)
    result = ingest(project, small, "vf3", val_fraction=0.1)
    assert result.classes_without_val == ["a", "b"] and result.splits["val"] == 1


def test_a_target_without_some_source_classes_is_named_as_partial(project: Path, tmp_path: Path):
    """A labelled target holding only some of its source's classes is ingested, and the classes it lacks are
    named (the CLI warns: the methods and validators assume every source class is there)."""
    image_folder(tmp_path / "src", classes=("a", "b", "c"), per_class=10)
    ingest(project, tmp_path / "src", "src-p")
    image_folder(tmp_path / "part", classes=("a", "b"), per_class=10, offset=200)
    assert ingest(project, tmp_path / "part", "tgt-p", source="src-p").source_classes_absent == ["c"]
    image_folder(tmp_path / "part", classes=("c",), per_class=10, offset=300)
    assert ingest(project, tmp_path / "part", "tgt-p", source="src-p", replace=True).source_classes_absent == []
    assert ingest(project, tmp_path / "part", "tgt-alone").source_classes_absent == []  # no source named: nothing to compare
    # a replace that changes the class set says which classes went and came (a probe's source lost two, unsaid)
    shutil.rmtree(tmp_path / "src" / "c")
    image_folder(tmp_path / "src", classes=("d",), per_class=10, offset=400)
    result = ingest(project, tmp_path / "src", "src-p", replace=True)
    assert (result.classes_gone, result.classes_new) == (["c"], ["d"])
    image_folder(tmp_path / "src", classes=("a",), per_class=12, offset=500)  # more images, the same classes
    result = ingest(project, tmp_path / "src", "src-p", replace=True)
    assert result.changed and (result.classes_gone, result.classes_new) == ([], [])


def test_a_val_fraction_that_leaves_no_train_images_is_refused(project: Path, tmp_path: Path):
    """Each class rounds its test and val shares: 30 images at 0.2 + 0.79 kept 6 + 24 and no train image,
    the ingest succeeded, and the run failed later on 'no images in the requested split'."""
    folder = tmp_path / "thirty"
    image_folder(folder, classes=("a",), per_class=30)
    image_folder(folder, classes=("b",), per_class=30, offset=40)  # distinct images: 20 apart a class otherwise
    before = snapshot(project)
    with pytest.raises(DataError, match=r"--val-fraction 0.79 with test fraction 0.2 leaves no train images: .*smallest class has 30") as err:
        ingest(project, folder, "vf79", val_fraction=0.79)
    assert err.value.hint == "lower --val-fraction, or add images to each class"
    assert snapshot(project) == before
    assert ingest(project, folder, "vf79", val_fraction=0.5).splits == {"train": 18, "val": 30, "test": 12}


KILLED_INGEST = """
import os, signal, sys
from pathlib import Path
from udaflow import versioning
from udaflow.data.ingest import ingest_domain

project, folder, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
die = lambda *_, **__: os.kill(os.getpid(), signal.SIGKILL)
if where == "before-dvc":  # the new copy is in place, DVC has recorded nothing
    versioning.version_dataset = die
elif where == "after-dvc":  # `dvc add` rewrote the pointer and pushed; the old folder is still aside
    real = versioning.version_dataset
    versioning.version_dataset = lambda *a, **k: (real(*a, **k), die())
elif where == "cleanup":  # finished: killed while deleting the replaced folder
    rmtree = versioning.shutil.rmtree
    versioning.shutil.rmtree = lambda p, *a, **k: die() if str(p).endswith(".discard") and k.get("ignore_errors") else rmtree(p, *a, **k)
name = sys.argv[4] if len(sys.argv) > 4 else "tgt"
ingest_domain(folder, name, project / "data/raw", seed=0, replace=True, report_dir=project / "runs/ingest" / name)
"""


@pytest.mark.parametrize("where", ["before-dvc", "after-dvc", "cleanup"])
def test_an_ingest_killed_outright_is_rolled_back_by_the_next_one(project: Path, folders, where: str):
    """SIGKILL leaves no chance to roll back: the journal the ingest wrote first lets the next ingest of
    the name do it. Killed before it had finished, the previous version is back in place, its pointer,
    .gitignore and dvc.lock byte for byte; killed while cleaning up after finishing, the new one stands."""
    first = ingest(project, folders["flat"], "tgt")
    before = {k: v for k, v in snapshot(project).items() if k != "cache"}  # the killed `dvc add` may leave cache objects; `dvc gc` takes them
    killed = subprocess.run([sys.executable, "-c", KILLED_INGEST, str(project), str(folders["flat-v2"]), where], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert any(p.startswith(".tgt.") for p in os.listdir(project / "data/raw")), "the kill left nothing to recover"
    said: list[str] = []
    if where == "cleanup":
        after = ingest(project, folders["flat-v2"], "tgt", replace=True, progress=said.append)
        assert not after.changed and after.md5 != first.md5  # the killed ingest's version was already whole
        assert not [line for line in said if "rolled back" in line]
    else:
        note = versioning.recover_interrupted_ingest(project / "data/raw/tgt")
        assert note and "rolled back" in note and "the previous version is in place" in note
        assert {k: v for k, v in snapshot(project).items() if k != "cache"} == before
        assert versioning.dataset_version(project / "data/raw/tgt").md5 == first.md5
        # and the next ingest, the way a user retries, then goes through
        again = ingest(project, folders["flat-v2"], "tgt", replace=True, progress=said.append)
        assert again.changed and again.replaced == first.md5
    assert not [p for p in os.listdir(project / "data/raw") if p.startswith(".") and p != ".gitignore"]


def test_a_new_name_s_ingest_killed_after_dvc_add_leaves_no_folder_or_pointer(project: Path, folders):
    ingest(project, folders["flat"], "tgt")
    before = {k: v for k, v in snapshot(project).items() if k != "cache"}
    killed = subprocess.run([sys.executable, "-c", KILLED_INGEST, str(project), str(folders["flat-v2"]), "after-dvc", "brand-new"],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert (project / "data/raw/brand-new.dvc").exists()  # `dvc add` ran (the repository's .gitignore already hides the folder)
    note = versioning.recover_interrupted_ingest(project / "data/raw/brand-new")
    assert "rolled back" in note and "'brand-new' did not exist before it, and does not now" in note, note  # not "the previous version"
    assert {k: v for k, v in snapshot(project).items() if k != "cache"} == before


def _a_target_whose_replacement_was_killed(project: Path, folders, tmp_path: Path):
    """Source `src` and labelled target `tgt` ingested, then a `--replace` of `tgt` killed outright
    after `dvc add`: the half-done version is what DVC sees now. Returns the first `tgt` ingest."""
    ingest(project, folders["labelled"], "src")
    build_domain("synth", tmp_path / "other", seed=3, synth_size=60)
    (tmp_path / "other/synth/manifest.csv").unlink()
    first = ingest(project, tmp_path / "other/synth", "tgt", source="src")
    killed = subprocess.run([sys.executable, "-c", KILLED_INGEST, str(project), str(folders["flat-v2"]), "after-dvc"], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert versioning.dataset_version(project / "data/raw/tgt").md5 != first.md5
    return first


def test_a_killed_ingest_is_rolled_back_by_the_next_run_and_a_live_one_is_left_alone(project: Path, folders, tmp_path: Path):
    """The pipeline's validation step rolls back a half-done ingest of its domains before it reads them,
    and neither it nor an ingest touches the journal of an ingest whose process still runs."""
    import fcntl
    import json

    from udaflow.config import load_config
    from udaflow.steps import validate_datasets

    first = _a_target_whose_replacement_was_killed(project, folders, tmp_path)
    journal = project / "data/raw/.tgt.ingest.json"
    assert json.loads(journal.read_text())["had_previous"]
    lock = project / ".dvc/tmp/udaflow-ingest/tgt.lock"
    with lock.open("a") as held:  # as a live ingest holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        for attempt in (lambda: ingest(project, folders["flat"], "tgt", replace=True),
                        lambda: versioning.recover_interrupted_ingest(project / "data/raw/tgt")):
            with pytest.raises(versioning.VersioningError, match=r"an ingest of 'tgt' is under way; wait for it to finish"):
                attempt()
        assert journal.exists()
    cfg = load_config(REPO / "params.yaml", overrides=[f"data.root={project / 'data/raw'}", "source=src", "target=tgt", f"work_dir={tmp_path / 'runs'}"])
    report = validate_datasets(cfg)
    assert report.success
    assert versioning.dataset_version(project / "data/raw/tgt").md5 == first.md5
    assert not journal.exists() and not (project / "data/raw/.tgt.previous").exists()


def test_a_second_ingest_of_a_name_stops_before_it_touches_the_first_one_s_copy(project: Path, folders):
    """Two ingests of one name both staged into `.<name>.ingesting`, the lock taken only at versioning:
    the second deleted and rewrote the first's copy, and the first committed the second's images under
    its own summary. The name's lock is now held from before anything is staged."""
    import fcntl

    lock = project / ".dvc/tmp/udaflow-ingest/race.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    staging = project / "data/raw/.race.ingesting"
    (staging / "7").mkdir(parents=True)
    (staging / "7/the-first-ingest-s.png").write_bytes(b"staged by the live ingest")
    with lock.open("a") as held:  # as the first ingest, still copying, holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(versioning.VersioningError, match=r"an ingest of 'race' is under way; wait for it to finish"):
            ingest(project, folders["labelled"], "race")
        assert (staging / "7/the-first-ingest-s.png").read_bytes() == b"staged by the live ingest"
        assert not (project / "data/raw/race").exists() and not (project / "data/raw/race.dvc").exists()
    shutil.rmtree(staging)
    done = ingest(project, folders["labelled"], "race")  # the lock is released with its holder; taken again inside: no self-conflict
    assert done.changed and done.images == 60 and not staging.exists()


def test_the_bench_rolls_back_a_killed_ingest_of_its_domains_before_it_checks_them(project: Path, folders, tmp_path: Path):
    """`udaflow bench` reads the domains of its --shifts without the pipeline's validation step: it
    rolls back a half-done ingest of them first (until 2026-12-03 it read the half-done version)."""
    from typer.testing import CliRunner

    from udaflow import cli

    first = _a_target_whose_replacement_was_killed(project, folders, tmp_path)
    result = CliRunner().invoke(cli.app, ["bench", "--shifts", "src:tgt", "--methods", "nosuch", "--set", f"data.root={project / 'data/raw'}",
                                          "--set", f"work_dir={tmp_path / 'runs'}", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 2 and "--methods: unknown method 'nosuch'" in result.output, result.output  # it stopped after the rollback
    assert versioning.dataset_version(project / "data/raw/tgt").md5 == first.md5
    assert not [p for p in os.listdir(project / "data/raw") if p.startswith(".") and p != ".gitignore"]


def test_a_full_disk_is_one_line_naming_the_file_and_the_ingest_changes_nothing(project: Path, folders, monkeypatch):
    """No space left while GX writes its Data Docs (the first thing to fill a small disk): the command
    says so in one line naming the file, with what to do, exits 2, and the ingest leaves everything as
    it was. Until 2026-12-03 it was the traceback of wherever the disk filled."""
    import errno

    from typer.testing import CliRunner

    from udaflow import cli
    from udaflow.data import expectations

    ingest(project, folders["flat"], "tgt")
    before = snapshot(project)
    copytree = expectations.shutil.copytree

    def full(src, dst, *a, **k):
        if Path(dst).name == "data_docs":
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(dst) / "index.html"))
        return copytree(src, dst, *a, **k)

    monkeypatch.setattr(expectations.shutil, "copytree", full)
    params = project / "params.yaml"
    params.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "params.yaml").read_text()), "work_dir": str(project / "runs")}))
    monkeypatch.chdir(project)
    result = CliRunner().invoke(cli.app, ["data", "ingest", str(folders["flat-v2"]), "--name", "tgt", "--replace", "--params", str(params)])
    lines = result.output.splitlines()  # the ingest's progress, then the error
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert lines[-2] == f"error: No space left on device writing {project}/runs/ingest/tgt/validation/domain/data_docs/index.html", result.output
    assert lines[-1].startswith("hint: free space on that disk") and not [line for line in lines[:-2] if "rror" in line]
    params.unlink()
    assert snapshot(project) == before and not leftovers(project)
