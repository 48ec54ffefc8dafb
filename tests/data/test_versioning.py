"""DVC versioning in a temp git repo: add, unchanged, new content, stage outputs, restore, errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from udaflow import versioning


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    versioning.init_repo(tmp_path)
    folder = tmp_path / "data/raw/dom"
    (folder / "a").mkdir(parents=True)
    (folder / "a/1.png").write_bytes(b"one")
    (folder / "a/2.png").write_bytes(b"two")
    return tmp_path


def test_version_dataset_records_pushes_and_detects_change(repo: Path):
    folder = repo / "data/raw/dom"
    first = versioning.version_dataset(folder)
    assert first.changed and first.md5.endswith(".dir") and first.pointer == "data/raw/dom.dvc"
    assert (repo / "data/raw/dom.dvc").exists() and "/dom" in (repo / "data/raw/.gitignore").read_text()
    assert any((repo / "dvc-remote").rglob("*"))  # pushed to the default local remote
    assert not versioning.version_dataset(folder).changed  # same content: no new version
    assert versioning.dataset_version(folder).md5 == first.md5

    (folder / "a/3.png").write_bytes(b"three")
    assert versioning.dataset_version(folder) is None  # modified since it was recorded
    second = versioning.version_dataset(folder)
    assert second.changed and second.md5 != first.md5
    assert versioning.status(repo) == {}


def test_stage_outputs_are_committed_through_their_stage(repo: Path):
    (repo / "dvc.yaml").write_text("stages:\n  make:\n    cmd: 'true'\n    outs:\n      - data/raw/dom\n")
    version = versioning.version_dataset(repo / "data/raw/dom")
    assert version.pointer == "dvc.lock" and version.md5 in (repo / "dvc.lock").read_text()
    assert not (repo / "data/raw/dom.dvc").exists()


def test_restore_an_old_version_into_another_folder_and_missing_objects(repo: Path, tmp_path_factory, caplog, capsys):
    folder = repo / "data/raw/dom"
    old = versioning.version_dataset(folder).md5
    (folder / "a/1.png").write_bytes(b"changed")
    versioning.version_dataset(folder)
    dest = tmp_path_factory.mktemp("restore") / "dom"
    capsys.readouterr()
    versioning.restore_dataset(old, dest, repo, announce=True)
    assert (dest / "a/1.png").read_bytes() == b"one" and (folder / "a/1.png").read_bytes() == b"changed"
    # a person following `udaflow reproduce` sees what is being restored (it was silent for minutes on photos)
    assert capsys.readouterr().err.startswith(f"restore dataset 'dom' at DVC version {old} into {dest} (from the DVC cache")

    # an object gone from the cache is fetched back from the remote
    shutil.rmtree(repo / ".dvc/cache")
    dest2 = tmp_path_factory.mktemp("restore2") / "dom"
    versioning.restore_dataset(old, dest2, repo)
    assert (dest2 / "a/2.png").read_bytes() == b"two"
    assert "restore dataset" not in capsys.readouterr().err  # unannounced (drift's restore into a temporary folder)

    # one file's object gone from both: that file is named, in one error, with no DVC warnings before it
    import hashlib
    import logging

    two = hashlib.md5(b"two").hexdigest()
    for store in (repo / ".dvc/cache", repo / "dvc-remote"):
        (store / "files/md5" / two[:2] / two[2:]).unlink()
    failed = tmp_path_factory.mktemp("x")
    with caplog.at_level(logging.WARNING), pytest.raises(versioning.VersioningError, match=f"its file a/2.png \\({two}\\) is in neither"):
        versioning.restore_dataset(old, failed / "dom", repo)
    assert not [r for r in caplog.records if r.name.startswith("dvc")], [r.getMessage() for r in caplog.records]
    assert os.listdir(failed) == []  # a/1.png was copied into dom.restoring before a/2.png was found missing, and left there

    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo / "dvc-remote")
    with caplog.at_level(logging.WARNING), pytest.raises(versioning.VersioningError, match="0123456789abcdef0123456789abcdef.dir is in neither the DVC cache .*nor the"):
        versioning.restore_dataset("0123456789abcdef0123456789abcdef.dir", tmp_path_factory.mktemp("x") / "dom", repo)
    assert not [r for r in caplog.records if r.name.startswith("dvc")], [r.getMessage() for r in caplog.records]


def test_a_restore_is_retried_after_a_hiccup_not_after_dvc_said_the_version_is_gone():
    """`reproduce` restored every other dataset twice before it said a version was gone (retries=1)."""
    from prefect.states import Failed

    from tasks.lineage import _worth_retrying, restore_dataset

    assert restore_dataset.retries == 1 and restore_dataset.retry_condition_fn is _worth_retrying
    assert not _worth_retrying(None, None, Failed(data=versioning.VersioningError("gone", "hint")))
    assert _worth_retrying(None, None, Failed(data=OSError("connection reset by peer")))


def test_outside_a_dvc_project_is_a_clear_error(tmp_path: Path):
    (tmp_path / "d").mkdir()
    with pytest.raises(versioning.VersioningError, match="not inside a DVC project"):
        versioning.version_dataset(tmp_path / "d")


def test_versioning_waits_for_another_dvc_command_holding_the_lock(repo: Path, capsys):
    """DVC gives up on its repository lock after 3 s: a run versioning its data while another run (or a
    `dvc push`) held it failed with "DVC could not version this dataset: Unable to acquire lock"."""
    import subprocess
    import sys
    import time

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, zc.lockfile; lock = zc.lockfile.LockFile(sys.argv[1]); "
         "print('held', flush=True); time.sleep(6)", str(repo / ".dvc/tmp/lock")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        clock = time.perf_counter()
        version = versioning.version_dataset(repo / "data/raw/dom")
        assert version.changed and time.perf_counter() - clock > 3  # it waited, then versioned
        assert f"waiting for DVC's repository lock ({repo / '.dvc/tmp/lock'}" in capsys.readouterr().err  # said so, not a silent hang
    finally:
        holder.kill()
        holder.wait()


def test_a_build_waits_for_the_runs_reading_its_domain_and_refuses_at_once_inside_dvc_repro(repo: Path, monkeypatch, capfd):
    """A probe: `dvc repro -f` beside a `udaflow run` rebuilt data/raw/synth under it (DVC deleted the folder,
    `data build` swapped in the new one) and the run failed in evaluate with the domain gone."""
    import threading

    folder = repo / "data/raw/dom"
    swapped = threading.Event()

    def build():
        with versioning.replacing_domain(folder):
            swapped.set()

    monkeypatch.delenv("DVC_STAGE", raising=False)
    with versioning.domains_in_use([folder]):  # a run reading it
        builder = threading.Thread(target=build)
        builder.start()
        assert not swapped.wait(1.0)  # it waits, and says why
        assert "waiting for the udaflow run(s) reading 'dom' to finish" in capfd.readouterr().err
        with pytest.raises(versioning.VersioningError, match="an ingest or a build of 'dom' is replacing it"):
            with versioning.domains_in_use([folder]):  # a run starting meanwhile is refused, not run on a half swap
                pass
    builder.join(10)
    assert swapped.is_set()

    monkeypatch.setenv("DVC_STAGE", "build@dom")  # inside dvc repro, which holds the DVC lock such a run may wait on
    with versioning.domains_in_use([folder]):
        with pytest.raises(versioning.VersioningError, match="udaflow run\\(s\\) or an ingest are reading or replacing 'dom'") as info:
            with versioning.replacing_domain(folder):
                pytest.fail("swapped under a running run")
    assert "run the same command again once they finish" in info.value.hint
    with versioning.replacing_domain(folder):  # nobody reading it: no wait
        pass
    with versioning.replacing_domain(repo / "data/raw/new"):  # not there yet: nothing to hold
        pass
