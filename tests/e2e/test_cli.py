"""The CLI end to end on tiny data: build, ingest, run (with source-model reuse), bench, errors."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from udaflow.cli import app
from udaflow.costs import cpu_name

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, new_project) -> Path:
    return new_project(tmp_path_factory.mktemp("ws"))


def invoke(args: list[str], ws: Path):
    return runner.invoke(app, [*args, "--params", str(ws / "params.yaml")])


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("data", "run", "bench"):
        assert cmd in result.output
    assert runner.invoke(app, ["data", "build", "--help"]).exit_code == 0


def test_build_ingest_run_bench(workspace: Path):
    ws = workspace
    result = invoke(["data", "build", "--domains", "synth"], ws)
    assert result.exit_code == 0, result.output
    assert (ws / "data/raw/synth/manifest.csv").exists()

    # a user ImageFolder made from another synth rendering, ingested as a second domain
    other = ws / "other"
    from udaflow.data.domains import build_domain

    build_domain("synth", other, seed=5, synth_size=60)
    user_folder = other / "synth"
    (user_folder / "manifest.csv").unlink()
    result = invoke(["data", "ingest", str(user_folder), "--name", "fonts-b"], ws)
    assert result.exit_code == 0, result.output
    rows = (ws / "data/raw/fonts-b/manifest.csv").read_text().splitlines()
    assert len(rows) == 61 and rows[0].startswith("path,label,split,sha256")

    result = invoke(["run", "--source", "synth", "--target", "fonts-b", "--method", "dann"], ws)
    assert result.exit_code == 0, result.output
    assert "trained" in result.output and "v1 @challenger" in result.output
    from udaflow import tracking

    held = sorted(a for a, v in tracking.model_aliases("udaflow-synth-to-fonts-b").items() if str(v) == "1")
    assert "challenger" in held and " ".join(["udaflow-synth-to-fonts-b v1", *(f"@{a}" for a in held)]) + " " in result.output, result.output
    # the summary's "load it" line works as printed, from a plain Python (MLflow's default store is another, empty one)
    load = re.search(r"load it: (mlflow\.set_tracking_uri\('[^']+'\)); (mlflow\.pyfunc\.load_model\('[^']+'\))", result.output)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING") and not k.startswith("MLFLOW_REGISTRY")}
    loaded = subprocess.run([sys.executable, "-c", f"import mlflow; {load.group(1)}; print(type({load.group(2)}).__name__)"],
                            cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "PyFuncModel", loaded.stderr[-2000:]
    metrics = json.loads((ws / "runs/synth-to-fonts-b/dann/metrics.json").read_text())
    assert 0.0 <= metrics["target_acc_selected"] <= 100.0 and 0.0 <= metrics["target_acc_last"] <= 100.0
    assert metrics["selected_by"] == "im"
    assert set(metrics["validators_selected"]) == set(metrics["validators_last"]) == {"entropy", "im", "snd", "bnm", "dev"}

    # a second method on the same source reuses the cached source model
    result = invoke(["run", "--source", "synth", "--target", "fonts-b", "--method", "mcc"], ws)
    assert result.exit_code == 0, result.output
    assert "reused (cached Prefect task)" in result.output and "v2 @challenger" in result.output

    out = ws / "bench.json"
    result = invoke(
        ["bench", "--shifts", "synth:fonts-b", "--methods", "source_only,oracle,dann,cdtrans", "--seeds", "1",
         "--profile", "quick", "--protocol", "holdout", "--out", str(out)],
        ws,
    )
    assert result.exit_code == 0, result.output
    bench = json.loads(out.read_text())
    assert [r["method"] for r in bench] == ["source_only", "oracle", "dann", "cdtrans"]
    for row in bench:
        for key in ("shift", "seed", "target_acc_last", "target_acc_selected", "selected_by", "source_val_acc_last",
                    "source_val_acc_selected", "seconds", "train_images_per_s", "peak_rss_mb", "validators_last", "validators_selected"):
            assert key in row, key
        assert row["shift"] == "synth:fonts-b"
        assert 0.0 <= row["target_acc_last"] <= 100.0
        # DESIGN.md's row contract: the selected checkpoint's figures under their plain names
        assert (row["target_acc"], row["source_val_acc"], row["validators"]) == (
            row["target_acc_selected"], row["source_val_acc_selected"], row["validators_selected"])
    assert bench[0]["cached_pretraining"] is True  # pretraining shared with the earlier runs
    # its seconds are the earlier training's: no share of this bench's GEMM rate; the trained rows have one
    assert bench[0]["matmul_fraction"] is None and all(0 < r["matmul_fraction"] < 1 for r in bench[1:])
    assert "source_only seed 0: " in result.output and "(a cached source model: an earlier training's speed)" in " ".join(result.output.split())
    # float32 accuracies written as the shortest decimal of the same float32, not 10.899999618530273
    assert all(r[k] == float(str(np.float32(r[k]))) for r in bench for k in ("target_acc_last", "source_val_acc_last")), bench
    for row in bench:
        assert set(row["validators_last"]) == {"entropy", "im", "snd", "bnm", "dev"}
        if row["method"] != "oracle":  # the validator study: reported, never used
            assert row["best_checkpoint_target_acc"] >= row["target_acc_selected"]
            assert row["selection_loss"] == pytest.approx(row["best_checkpoint_target_acc"] - row["target_acc_selected"], abs=0.01)
    for row in bench:
        assert row["train_gflop_per_image"] > 0 and row["matmul_gflops"] > 0 and row["cpu"] == cpu_name()  # the rate's machine, named
        assert row["matmul_on"] == "cpu float32"  # on a GPU its name and bfloat16 under autocast (tests/gpu)
        assert row["achieved_gflops"] == pytest.approx(row["train_gflop_per_image"] * row["train_images_per_s"], rel=0.01, abs=0.1)  # both rounded
        if row["method"] != "oracle":
            assert set(row["regret"]) == {"entropy", "im", "snd", "bnm", "dev", "ensv"}
            assert all(v >= 0 for v in row["regret"].values())  # nothing beats the best-by-target checkpoint
            assert 0.0 <= row["median_last5_target_acc"] <= 100.0
    study = json.loads((ws / "bench.validators.json").read_text())["synth:fonts-b"]
    assert study["checkpoints"] >= 6 and set(study["spearman"]) == {"entropy", "im", "snd", "bnm", "dev", "ensv"}
    assert set(study["regret"]) == {"entropy", "im", "snd", "bnm", "dev", "ensv"}
    assert "regret" in result.output and "GFLOP/s" in result.output and f"machine: {cpu_name()}, fp32 matmul" in result.output
    assert "Spearman" in result.output
    assert bench[2]["train_images_per_s"] > 0


def test_bench_jobs_runs_cells_in_parallel_with_the_rows_of_one_process(workspace: Path):
    """`--jobs 2` runs the cells in two worker processes; at the same thread count each row is the one
    a one-process bench writes (deterministic training: the same bits), in the same order."""
    ws = workspace
    if not (ws / "data/raw/fonts-b").exists():
        pytest.skip("needs test_build_ingest_run_bench's domains")
    rows = {}
    for jobs in (2, 1):  # the parallel bench first: its workers train seed 1's source model (seed 0's is cached)
        out = ws / f"bench-jobs{jobs}.json"
        result = invoke(
            ["bench", "--shifts", "synth:fonts-b", "--methods", "source_only,dann,adamatch", "--seeds", "2", "--jobs", str(jobs),
             "--protocol", "holdout", "--set", "train.num_threads=1", "--out", str(out)],
            ws,
        )
        assert result.exit_code == 0, result.output
        rows[jobs] = json.loads(out.read_text())
    assert [(r["method"], r["seed"]) for r in rows[2]] == [(m, s) for s in (0, 1) for m in ("source_only", "dann", "adamatch")]
    for serial, parallel in zip(rows[1], rows[2]):
        for key in ("target_acc_last", "target_acc_selected", "source_val_acc_last", "validators_last", "regret"):
            assert parallel[key] == serial[key], (serial["method"], serial["seed"], key)
    assert rows[2][1]["validators_last"] != rows[2][4]["validators_last"]  # dann's two seeds: two runs, not one copied
    assert rows[2][3]["method"] == "source_only" and rows[2][3]["cached_pretraining"] is False  # seed 1's: trained in this bench
    assert rows[2][3]["matmul_fraction"] is not None  # its seconds are this bench's own
    assert [r["cached_pretraining"] for r in rows[1] if r["method"] == "source_only"] == [True, True]
    study = json.loads((ws / "bench-jobs2.validators.json").read_text())["synth:fonts-b"]
    assert study == json.loads((ws / "bench-jobs1.validators.json").read_text())["synth:fonts-b"]


def test_serve_refuses_an_alias_or_version_the_model_lacks(workspace: Path, monkeypatch):
    """`serve` checks the alias (or version) before it hands over to MLflow's scoring server, which
    would fail with a traceback: one line naming what the model has, and a hint."""
    if not (workspace / "data/raw/fonts-b").exists():
        pytest.skip("needs test_build_ingest_run_bench's models")

    def started(*args):  # a host that lets any address bind (net.ipv4.ip_nonlocal_bind) must not replace pytest
        raise AssertionError(f"mlflow models serve started: {args}")

    monkeypatch.setattr(os, "execve", started)
    for alias, missing in (("nosuch", "alias @nosuch"), ("99", "version 99")):
        result = invoke(["serve", "--model", "udaflow-synth-to-fonts-b", "--alias", alias], workspace)
        assert result.exit_code == 2, result.output
        lines = result.output.splitlines()
        assert lines[0].startswith(f"error: registered model 'udaflow-synth-to-fonts-b' has no {missing} (its versions: 1, 2")
        assert "@challenger (v2)" in lines[0] and lines[1].startswith("hint: `udaflow promote`"), result.output
    # a port the server could not listen on: one line before MLflow loads the model (it was its traceback a minute later)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = invoke(["serve", "--model", "udaflow-synth-to-fonts-b", "--alias", "challenger", "--port", str(port)], workspace)
    assert result.exit_code == 2 and result.output.startswith(f"error: cannot listen on 127.0.0.1:{port}: "), result.output
    assert "while attempting" not in result.output and "another server holds that port" in result.output, result.output
    # an address this machine lacks, or a name that resolves to none: the hint is about --host, not a busy port
    for host in ("999.1.1.1", "192.0.2.1"):  # no IPv4 address; TEST-NET-1, never a local interface
        result = invoke(["serve", "--model", "udaflow-synth-to-fonts-b", "--alias", "challenger", "--host", host], workspace)
        assert result.exit_code == 2 and result.output.startswith(f"error: cannot listen on {host}:5001: "), result.output
        assert "hint: --host must be an address of this machine" in result.output and "port" not in result.output.splitlines()[0], result.output
    result = invoke(["serve", "--model", "udaflow-synth-to-fonts-b", "--port", "70000"], workspace)
    assert result.exit_code == 2 and "65535" in result.output, result.output


def _spawned_workers(pid: int) -> set[int]:
    """The bench's worker processes: pid's children started by multiprocessing's spawn."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = set()
    for child in (children.read_text().split() if children.exists() else []):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(int(child))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has finished; only its exit status waits to be read


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bench_jobs_workers_die_with_the_bench(workspace: Path):
    """`kill -9` of `udaflow bench --jobs 2` (the parent alone, as a scheduler stopping it by pid does)
    takes its workers with it: none trains on, orphaned, for the length of its cell."""
    ws = workspace
    if not (ws / "data/raw/fonts-b").exists():
        pytest.skip("needs test_build_ingest_run_bench's domains")
    cmd = [str(Path(sys.executable).parent / "udaflow"), "bench", "--shifts", "synth:fonts-b", "--methods", "dann",
           "--seeds", "2", "--jobs", "2", "--set", "train.adapt_steps=5000", "--set", "train.pretrain_steps=5000",
           "--set", "seed=7", "--out", str(ws / "bench-killed.json"), "--params", str(ws / "params.yaml")]
    bench = subprocess.Popen(cmd, cwd=ws, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(workers := _spawned_workers(bench.pid)) < 2:
            assert bench.poll() is None and time.monotonic() < deadline, "the bench never started two workers"
            time.sleep(0.2)
        time.sleep(3)  # into their cells (5,000 source steps each: minutes)
        assert all(_alive(w) for w in workers)
        bench.kill()
        bench.wait()
        deadline = time.monotonic() + 15
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers still training after their bench was killed"
    finally:
        bench.kill()
        for w in _spawned_workers(bench.pid) | locals().get("workers", set()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_jobs_reports_a_workers_error_as_one_line(workspace: Path):
    """An error raised on purpose inside a worker process (here: no GPU for --device cuda) reaches the user
    as the one-process bench reports it: one `error:` line, exit code 2, no traceback."""
    result = invoke(["bench", "--shifts", "synth:fonts-b", "--methods", "dann", "--jobs", "2", "--device", "cuda",
                     "--out", str(workspace / "bench-fail.json")], workspace)
    assert result.exit_code == 2, result.output
    assert "error: device 'cuda' requested but no CUDA GPU is visible" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--method", "nope"], "unknown method 'nope'"),
        (["run", "--set", "train.lrr=1"], "train.lrr"),
        (["run", "--set", "train.batch_size=many"], "train.batch_size"),
        (["run", "--set", "model.backbone=not_a_timm_model", "--source", "synth", "--target", "fonts-b"], "unknown backbone"),
        (["run", "--source", "synth", "--target", "missing-domain"], "missing-domain"),
        (["run", "--set", "methods.adamatch.tau=high", "--source", "synth", "--target", "fonts-b"], "methods.adamatch.tau: expected a number (got 'high')"),
        (["run", "--set", "methods.adamatch.tau=1.5", "--source", "synth", "--target", "fonts-b"], "methods.adamatch.tau: must be <= 1 (got 1.5)"),
        (["run", "--set", "methods.cdtrans.refresh_every=0", "--source", "synth", "--target", "fonts-b"], "methods.cdtrans.refresh_every: must be >= 1 (got 0)"),
        (["run", "--set", "validator=best", "--source", "synth", "--target", "fonts-b"], "validator: unknown validator 'best'"),
        (["bench", "--shifts", "synth-mnist"], "SOURCE:TARGET"),
        # a name ingest would refuse: the domains there, not an ingest command that fails too
        (["bench", "--shifts", "synth:FONTS-B", "--methods", "dann"], "is missing); domain names are lower-case "
         "letters, digits, '-' and '_', starting with a letter or digit, at most 64 characters; the domains here: "),
        (["bench", "--shifts", "synth:fonts-b", "--methods", "dann", "--out", "{ws}/params.yaml"],  # a typo'd --out replaced it
         "params.yaml exists and is not a bench's output"),
        (["data", "build", "--domains", "synth", "--seed", "1"], "--seed 1: the built-in domains are built with params.yaml's data.build_seed (0)"),
        (["data", "build", "--domains", ""], "--domains names no domain"),
    ],
)
def test_errors_are_one_line_and_nonzero(workspace: Path, args, needle):
    def state():  # what a refused run must not touch: the DVC remote, the MLflow store, run outputs
        return sorted(str(p.relative_to(workspace)) for d in ("dvc-remote", "mlflow", "runs") if (workspace / d).exists()
                      for p in (workspace / d).rglob("*") if p.is_file() and p.suffix not in (".db-journal", ".db-wal", ".db-shm"))
    before = state()
    params = (workspace / "params.yaml").read_bytes()
    result = invoke([a.replace("{ws}", str(workspace)) for a in args], workspace)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert (workspace / "params.yaml").read_bytes() == params
    if args[0] == "run":
        assert state() == before  # refused before validation, versioning or training


@pytest.mark.parametrize("args, needle", [
    (["reproduce", "does-not-exist"], "error: MLflow run 'does-not-exist' does not exist in "),
    (["promote", "--model", "nosuch"], "error: registered model 'nosuch' does not exist in "),
    (["rollback", "--model", "nosuch"], "error: registered model 'nosuch' does not exist in "),
])
def test_an_unknown_run_or_model_is_refused_before_any_flow_starts(workspace: Path, args, needle):
    """The real entry point in a subprocess, so Prefect's and MLflow's own logging (not captured by
    CliRunner) would show too: only the error and its hint, no flow-failure traceback."""
    import mlflow

    uri = yaml.safe_load((workspace / "params.yaml").read_text())["tracking"]["uri"]
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()  # the store exists, as after any run
    result = subprocess.run(
        [sys.executable, "-m", "udaflow.cli", *args, "--params", str(workspace / "params.yaml")],
        cwd=workspace, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    lines = output.strip().splitlines()
    assert len(lines) <= 3 and lines[0].startswith(needle) and lines[-1].startswith("hint: "), output
    assert "Traceback" not in output
    assert not (workspace / "runs/reproduce/does-not-exist").exists()


@pytest.mark.parametrize("command", ["promote", "rollback", "reproduce", "schedule", "bench", "data"])
def test_a_domain_error_gets_the_data_hint_whichever_command_met_it(command, capsys):
    """`promote` with the target's folder gone said "data/raw/mnist: domain 'mnist' not found" and then
    "hint: list registered models with udaflow ui"."""
    from udaflow import cli
    from udaflow.data.manifest import DataError

    cli._report(DataError("data/raw/mnist: domain 'mnist' not found"), command)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["error: data/raw/mnist: domain 'mnist' not found", f"hint: {cli._HINTS['data']}"]


def test_ui_refuses_a_missing_store_and_a_busy_port_before_starting(workspace: Path, tmp_path: Path, monkeypatch):
    """`udaflow ui` made an empty store where every other command refuses, and on a busy port printed
    its URL (another server's), then MLflow's "Address already in use", and exited 0."""
    import socket

    import mlflow

    def started(*args):  # reaching MLflow's server is the failure: not this test process replaced by it
        raise AssertionError(f"mlflow ui started: {args}")

    monkeypatch.setattr(os, "execv", started)

    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["tracking"]["uri"] = f"sqlite:///{tmp_path}/nostore/mlflow.db"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = runner.invoke(app, ["ui", "--port", "5391", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2 and f"error: no MLflow store at {tmp_path}/nostore/mlflow.db" in result.output, result.output
    assert not (tmp_path / "nostore").exists()

    uri = yaml.safe_load((workspace / "params.yaml").read_text())["tracking"]["uri"]
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()  # the store exists, as after any run
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = invoke(["ui", "--port", str(port)], workspace)
    assert result.exit_code == 2 and f"error: cannot listen on 127.0.0.1:{port}" in result.output, result.output
    assert "MLflow UI on" not in result.output


def _corrupt_folder(base: Path, kind: str) -> Path:
    """A small ImageFolder copied from fonts-b's images, broken in one way."""
    folder = base / f"bad-{kind}"
    if folder.exists():
        shutil.rmtree(folder)
    src = base / "data/raw/fonts-b"
    for cls in ("0", "1"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((src / cls).glob("*.png"))[:4]:
            shutil.copyfile(f, folder / cls / f.name)
    first = sorted((folder / "0").glob("*.png"))[0]
    if kind == "undecodable":
        first.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    elif kind == "leak":
        shutil.copyfile(first, folder / "1" / "copy-of-a-zero.png")
    elif kind == "unknown-class":
        (folder / "eleven").mkdir()
        shutil.copyfile(first, folder / "eleven" / "x.png")
        first.unlink()
    return folder


@pytest.mark.parametrize("kind, needle", [
    ("undecodable", "expect_column_values_to_be_in_set"),
    ("leak", "expect_column_values_to_be_unique"),
    ("unknown-class", "has class(es) 'eleven' (1 image) that source 'synth' does not have; its classes are '0', '1'"),
])
def test_corrupt_target_is_refused_at_ingest_and_nothing_changes(workspace: Path, kind, needle):
    ws = workspace
    manifest = (ws / "data/raw/fonts-b/manifest.csv").read_bytes()
    pointer = (ws / "data/raw/fonts-b.dvc").read_bytes()
    result = invoke(["data", "ingest", str(_corrupt_folder(ws, kind)), "--name", "fonts-b", "--source", "synth"], ws)
    assert result.exit_code == 2, result.output
    assert "data validation failed" in result.output and needle in result.output
    assert "Traceback" not in result.output
    assert (ws / "data/raw/fonts-b/manifest.csv").read_bytes() == manifest  # the old data is untouched
    assert (ws / "data/raw/fonts-b.dvc").read_bytes() == pointer  # and no new DVC version
    assert not list((ws / "data/raw").glob(".*.ingesting"))


def test_overlap_is_a_warning_at_ingest_and_refused_when_a_run_pairs_the_domains(workspace: Path):
    import mlflow

    from udaflow.data.domains import build_domain

    ws = workspace
    build_domain("synth", ws / "later", seed=21, synth_size=20)
    folder = ws / "leaky-target"
    folder.mkdir(exist_ok=True)
    for f in sorted((ws / "later/synth").glob("*/*.png")):
        shutil.copyfile(f, folder / f"{f.parent.name}-{f.name}")
    copied = sorted((ws / "data/raw/synth/3").glob("*.png"))[0]
    shutil.copyfile(copied, folder / "from-synth.png")

    result = invoke(["data", "ingest", str(folder), "--name", "leaky"], ws)
    assert result.exit_code == 0, result.output
    assert f"1 image(s) of 'leaky' are also in domain 'synth' (e.g. from-synth.png = synth/3/{copied.name})" in result.output

    result = invoke(["run", "--source", "synth", "--target", "leaky", "--method", "dann"], ws)
    assert result.exit_code == 2 and "expect_column_values_to_be_unique on 'sha256'" in result.output, result.output
    uri = yaml.safe_load((ws / "params.yaml").read_text())["tracking"]["uri"]
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.search_model_versions("name='udaflow-synth-to-leaky'") == []
    assert not (ws / "runs/synth-to-leaky/dann").exists()  # nothing trained

    # the bench checks what a run checks (a probe's bench trained and reported a leaking shift)
    result = invoke(["bench", "--shifts", "synth:leaky", "--methods", "source_only", "--out", str(ws / "leaky.json")], ws)
    assert result.exit_code == 2 and result.output.startswith("error: data validation failed: "), result.output
    assert "expect_column_values_to_be_unique on 'sha256'" in result.output and "\nhint: nothing was trained" in result.output
    assert not (ws / "leaky.json").exists()

    # the same source image re-saved in other bytes (a tool's export: a text chunk, other compression) leaks all the same
    from PIL import Image, PngImagePlugin

    (folder / "from-synth.png").unlink()
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "an image editor")
    with Image.open(copied) as img:
        img.save(folder / "exported.png", pnginfo=info, compress_level=9)
    result = invoke(["data", "ingest", str(folder), "--name", "leaky-again"], ws)
    assert result.exit_code == 0, result.output
    assert (f"1 image(s) of 'leaky-again' are also in domain 'synth' (e.g. exported.png = synth/3/{copied.name}; "
            "1 of them the same picture in other bytes)") in result.output
    result = invoke(["run", "--source", "synth", "--target", "leaky-again", "--method", "dann"], ws)
    assert result.exit_code == 2 and "expect_column_values_to_be_unique on 'pixels'" in result.output, result.output
    assert "target 'leaky-again' holds source images" in result.output and "\nhint: nothing was trained" in result.output
    assert client.search_model_versions("name='udaflow-synth-to-leaky-again'") == []


def test_an_ingest_stopped_before_its_announcement_announces_on_the_same_command_again(workspace: Path, monkeypatch):
    """A new version is recorded, then measured for drift and announced (the retrain trigger). Stopped
    in between, the same command again used to say "same content: no retrain triggered", and the new
    data never reached a retrain; now it announces that version, once."""
    import udaflow.cli as cli_module
    from udaflow import versioning
    from udaflow.data.domains import build_domain

    build_domain("synth", workspace / "dock", seed=21, synth_size=40)
    folder = workspace / "dock/synth"
    (folder / "manifest.csv").unlink()
    args = ["data", "ingest", str(folder), "--name", "dock-cam"]

    def stopped(cfg, name, md5):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_announce_new_data", stopped)
    result = invoke(args, workspace)
    assert result.exit_code == 130 and "new version" in result.output, result.output
    announced = []
    monkeypatch.setattr(cli_module, "_announce_new_data", lambda cfg, name, md5: announced.append((name, md5)))
    result = invoke(args, workspace)
    assert result.exit_code == 0 and "with no record here that it was announced" in result.output, result.output
    assert announced == [("dock-cam", versioning.dataset_version(workspace / "data/raw/dock-cam").md5)]
    result = invoke(args, workspace)
    assert result.exit_code == 0 and "same content as the recorded version: no retrain triggered" in result.output
    assert len(announced) == 1


def test_a_version_whose_announcement_failed_is_announced_again_after_a_revert(workspace: Path, monkeypatch):
    """The record of the last announced version was left alone by a failed announcement: after going back
    to an older version, a failed announcement of the newer one again found its own md5 in the record,
    and the retry said "same content: no retrain triggered" (the hint had said it would announce)."""
    import udaflow.cli as cli_module
    from udaflow.data.domains import build_domain

    folders = []
    for seed in (31, 32):
        build_domain("synth", workspace / f"yard-{seed}", seed=seed, synth_size=40)
        (workspace / f"yard-{seed}/synth/manifest.csv").unlink()
        folders.append(workspace / f"yard-{seed}/synth")
    announced = []

    def ingest(folder, fails=False):
        def announce(cfg, name, md5):
            if fails:
                raise ConnectionError("cannot reach the Prefect server")
            announced.append(md5)

        monkeypatch.setattr(cli_module, "_announce_new_data", announce)
        return invoke(["data", "ingest", str(folder), "--name", "yard-cam", "--replace"], workspace)

    assert ingest(folders[0]).exit_code == 0
    result = ingest(folders[1])  # A, then B, both announced
    assert result.exit_code == 0
    # the way back in one line of a log, however long (piped output was wrapped at 160 columns, splitting the command)
    back = next(line for line in result.output.splitlines() if "replaced version" in line)
    assert back.endswith(("brings it back", "to bring it back")) and len(back) > 160, result.output
    version_b = announced[-1]
    assert ingest(folders[0], fails=True).exit_code != 0  # back to A: recorded, not announced
    result = ingest(folders[1], fails=True)  # B again: recorded, not announced
    assert result.exit_code != 0 and "new version" in result.output, result.output
    result = ingest(folders[1])  # the same command, as the hint says
    assert result.exit_code == 0 and "with no record here that it was announced" in result.output, result.output
    assert announced[2:] == [version_b]


def test_a_store_mlflow_refuses_or_cannot_reach_is_one_line(workspace: Path, monkeypatch):
    """MLflow 3's refused file store (`./mlruns`) and a database server that does not answer came out as
    tracebacks, the second after MLflow's 100 s of retries; each is now one line naming where it came from."""
    import mlflow.store.db.utils as db_utils
    import mlflow.tracking._model_registry.utils as registry_uri
    import mlflow.tracking._tracking_service.utils as tracking_uri

    for module, name in ((tracking_uri, "_tracking_uri"), (registry_uri, "_registry_uri")):
        monkeypatch.setattr(module, name, getattr(module, name))  # the URIs this process had stay for the tests after
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    result = invoke(["promote", "--model", "udaflow-synth-to-mnist", "--dry-run"], workspace)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: MLFLOW_TRACKING_URI: tracking.uri: a folder is MLflow's file store, which MLflow 3 "
                                    "refuses"), result.output
    assert not (workspace / "mlruns").exists()

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql://team:s3cret@127.0.0.1:{port}/mlflow")
    monkeypatch.setattr(db_utils, "MAX_RETRY_COUNT", 1)  # MLflow's own retries, about 100 s, are not what is tested
    result = invoke(["promote", "--model", "udaflow-synth-to-mnist", "--dry-run"], workspace)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"error: cannot reach postgresql://127.0.0.1:{port}: ") and "Connection refused" in lines[0], result.output
    assert lines[1].startswith("hint: is it running") and "s3cret" not in result.output, result.output


def test_a_tracking_server_that_refuses_the_connection_is_one_line_in_seconds(workspace: Path, monkeypatch):
    """MLflow's client retried every call to a server that is down or misnamed for about 4 minutes (7 retries,
    backoff factor 2), printing nothing, before the CLI's 'cannot reach' line: a user saw a hang."""
    import mlflow.tracking._model_registry.utils as registry_uri
    import mlflow.tracking._tracking_service.utils as tracking_uri

    for module, name in ((tracking_uri, "_tracking_uri"), (registry_uri, "_registry_uri")):
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.chdir(workspace)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    clock = time.perf_counter()
    result = invoke(["promote", "--model", "udaflow-synth-to-mnist", "--dry-run"], workspace)
    seconds = time.perf_counter() - clock
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"error: cannot reach http://127.0.0.1:{port}: ") and lines[1].startswith("hint: is it running"), result.output
    assert seconds < 60, f"{seconds:.0f} s: MLflow's own retries ran"


def test_a_target_missing_some_source_classes_is_ingested_with_a_warning(workspace: Path):
    """A probe's target held 5 of its source's 28 classes: adamatch (aligned to the source's class mix) and IM
    (rewarding a spread over every class) took it to 30.00% against the source model's 60.00%, promoted on IM."""
    from udaflow.data.domains import build_domain

    for seed, folder in ((40, "whole"), (41, "partial")):
        build_domain("synth", workspace / folder, seed=seed, synth_size=80)
        (workspace / folder / "synth/manifest.csv").unlink()
    assert invoke(["data", "ingest", str(workspace / "whole/synth"), "--name", "dock-src"], workspace).exit_code == 0
    for label in ("8", "9"):
        shutil.rmtree(workspace / "partial/synth" / label)
    result = invoke(["data", "ingest", str(workspace / "partial/synth"), "--name", "dock-partial", "--source", "dock-src"], workspace)
    assert result.exit_code == 0, result.output
    assert "warning: 'dock-partial' has no image of 2 of source 'dock-src''s classes ('8', '9'): udaflow's methods" in result.output
    assert "a labelled val split (--val-fraction) lets the gate judge a run by accuracy" in result.output
    shutil.rmtree(workspace / "whole/synth/9")  # the source loses a class on a replace: said, as the ingest goes through
    result = invoke(["data", "ingest", str(workspace / "whole/synth"), "--name", "dock-src", "--replace"], workspace)
    assert result.exit_code == 0, result.output
    assert "warning: 'dock-src' now has other classes than the version it replaced (gone: '9'; new: none)" in result.output


def test_usage_errors_are_one_line_and_a_hint(tmp_path: Path):
    """An option out of range, an unknown option or command, a missing option: typer drew a box of rich panels
    under the usage line; a probe and the contract ("errors are one clear line plus a hint") asked for one line."""
    udaflow = str(Path(sys.executable).parent / "udaflow")
    cases = {
        ("bench", "--shifts", "synth:mnist", "--methods", "dann", "--seeds", "0"):
            ("error: Invalid value for '--seeds': Input should be greater than or equal to 1", "udaflow bench"),
        ("run", "--nproc", "0"): ("error: Invalid value for '--nproc': Input should be greater than or equal to 1", "udaflow run"),
        ("rnu",): ("error: No such command 'rnu'. Did you mean 'run'?", "udaflow"),
        ("promote",): ("error: Missing option '--model'.", "udaflow promote"),
        ("data", "ingest", str(tmp_path), "--nmae", "x"): ("error: No such option: --nmae (Possible options: --name)", "udaflow data ingest"),
    }
    for args, (line, command) in cases.items():
        out = subprocess.run([udaflow, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert out.returncode == 2 and out.stdout == "", (args, out.stdout, out.stderr)
        assert out.stderr.splitlines() == [line, f"hint: `{command} --help` lists its options and commands"], (args, out.stderr)
    out = subprocess.run([udaflow], capture_output=True, text=True, cwd=tmp_path, timeout=120)  # no command: the help, as before
    assert out.returncode == 2 and "Usage: udaflow" in out.stdout + out.stderr and "error:" not in out.stderr
