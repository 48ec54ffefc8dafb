"""MLFLOW_TRACKING_URI: the user's variable points udaflow at a server; udaflow never sets it itself."""

from __future__ import annotations

import os
import time
from pathlib import Path

from udaflow import tracking
from udaflow.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_the_users_variable_wins_over_params_yaml_and_configure_leaves_it_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert load_config(REPO / "params.yaml").tracking.uri == "sqlite:///mlflow/mlflow.db"
    tracking.configure(f"sqlite:///{tmp_path}/a.db", tmp_path / "artifacts")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # MLflow exports it; a later load_config must not read it back
    assert load_config(REPO / "params.yaml").tracking.uri == "sqlite:///mlflow/mlflow.db"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert load_config(REPO / "params.yaml").tracking.uri == "http://mlflow.example:5000"
    assert load_config(REPO / "params.yaml", None, ["tracking.uri=sqlite:///x.db"]).tracking.uri == "sqlite:///x.db"
    tracking.configure(f"sqlite:///{tmp_path}/b.db", tmp_path / "artifacts")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"


def test_credentials_in_the_tracking_uri_are_not_logged():
    config = {"tracking": {"uri": "https://alice:s3cr3t@mlflow.example:5000/", "artifact_root": "x"}, "seed": 0}
    assert tracking.redacted(config)["tracking"]["uri"] == "https://mlflow.example:5000/"
    assert tracking.redacted({"tracking": {"uri": "sqlite:///mlflow/mlflow.db"}}) == {"tracking": {"uri": "sqlite:///mlflow/mlflow.db"}}


def test_a_worker_loading_the_retrain_flow_turns_telemetry_off_as_the_cli_does():
    """A scheduled or data-triggered retrain runs in `prefect worker start`'s process tree, loaded from
    its entrypoint, never through `udaflow`: the flows set the same environment (until 2026-12-03 only
    the CLI and the Makefile did). A value the user set stays."""
    import subprocess
    import sys

    from udaflow.environment import SETTINGS

    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env["HF_HUB_OFFLINE"] = "0"  # the user's own choice
    code = ("import json, os; from prefect.flows import load_flow_from_entrypoint; load_flow_from_entrypoint('flows/retrain.py:retrain'); "
            f"print(json.dumps({{k: os.environ.get(k) for k in {sorted(SETTINGS)!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    assert json.loads(out.stdout.strip().splitlines()[-1]) == {**SETTINGS, "HF_HUB_OFFLINE": "0"}


def test_git_dirty_counts_changed_or_new_code_not_params_lock_data_pointers_or_ignored_files(tmp_path):
    """A new method file, uncommitted, trains (run_fingerprint hashes it): the run is dirty. An ingested
    domain's pointer (new or changed), params.yaml, dvc.lock or a note is not code; an ignored file never counts."""
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("runs/\n")
    (tmp_path / "train.py").write_text("x = 1\n")
    for tracked in ("params.yaml", "dvc.lock", "data/raw/mnist.dvc", "src/udaflow/fonts/README"):
        (tmp_path / tracked).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / tracked).write_text("a: 1\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "first")
    state = lambda: tracking.git_state(tmp_path)["git.dirty"]  # noqa: E731
    assert state() == "false"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/scratch.py").write_text("")
    (tmp_path / "data/line-b.dvc").write_text("outs: []\n")
    (tmp_path / "notes.txt").write_text("")
    for tracked in ("params.yaml", "dvc.lock", "data/raw/mnist.dvc"):  # what `udaflow data ingest` and runs change
        (tmp_path / tracked).write_text("a: 2\n")
    assert state() == "false"
    (tmp_path / "src/udaflow/fonts/README").write_text("b\n")  # anything in the package is code
    assert state() == "true"
    git("checkout", "-q", "src")
    assert state() == "false"
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests/test_new.py").write_text("def test(): pass\n")  # a test no run imports
    assert state() == "false"
    (tmp_path / "data/my method.py").write_text("")  # a path git quotes
    assert state() == "true"
    (tmp_path / "data/my method.py").unlink()
    (tmp_path / "train.py").write_text("x = 2\n")
    assert state() == "true"


def test_reproduce_warns_of_other_code_only_when_code_files_changed(tmp_path, monkeypatch, capsys):
    """`reproduce` warned "made at commit A; this checkout is B" after a probe's commits that only moved data
    pointers, and after training; it now says so before, and only when code (as git.dirty counts it) differs."""
    import subprocess

    from udaflow import tracking
    from udaflow.cli import _warn_other_code

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    def commit(files: dict[str, str]) -> str:
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        git("add", ".")
        git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "c")
        return git("rev-parse", "HEAD")

    git("init", "-q")
    first = commit({"src/udaflow/x.py": "a = 1\n", "data/raw/yard.dvc": "md5: 1\n", "params.yaml": "seed: 0\n"})
    data_only = commit({"data/raw/yard.dvc": "md5: 2\n", "params.yaml": "seed: 1\n", "docs/notes.md": "n\n",
                        "tests/unit/test_x.py": "def test(): pass\n"})  # nor does a test (a probe: 12 of "27 code files")
    assert tracking.code_changes_since(first, tmp_path) == []
    commit({"src/udaflow/x.py": "a = 2\n", "tasks/new.py": "\n"})
    assert tracking.code_changes_since(first, tmp_path) == ["src/udaflow/x.py", "tasks/new.py"]
    assert tracking.code_changes_since(data_only, tmp_path) == ["src/udaflow/x.py", "tasks/new.py"]
    assert tracking.code_changes_since("0" * 40, tmp_path) is None  # a commit this checkout does not hold

    monkeypatch.chdir(tmp_path)
    git("checkout", "-q", data_only)
    _warn_other_code("r1", first)
    assert capsys.readouterr().err == ""  # data pointers, params and notes: the same code
    git("checkout", "-q", "-")
    _warn_other_code("r1", first)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: run r1 was made at commit {first[:12]}; this checkout (") and "2 code file(s): src/udaflow/x.py, tasks/new.py" in err
    _warn_other_code("r1", "0" * 40)
    assert "which this checkout (" in capsys.readouterr().err


def test_a_models_shift_skips_a_version_whose_run_was_deleted_for_good(monkeypatch):
    """`udaflow promote` read the newest version's run tags and crashed with a traceback once that run
    had been removed (`mlflow gc`); an older version's run tells the shift, else the model's name."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException

    from udaflow import tracking

    runs = {"a": SimpleNamespace(data=SimpleNamespace(tags={"udaflow.source": "synth", "udaflow.target": "shelf-to-cam"}))}

    def get_run(run_id):
        if run_id not in runs:
            raise MlflowException(f"Run with id={run_id} not found")
        return runs[run_id]

    monkeypatch.setattr(tracking, "latest_versions", lambda name: [SimpleNamespace(version="1", run_id="a"), SimpleNamespace(version="2", run_id="b")])
    monkeypatch.setattr(tracking, "_client", lambda: SimpleNamespace(get_run=get_run))
    assert tracking.model_shift("udaflow-synth-to-shelf-to-cam") == ("synth", "shelf-to-cam")
    runs.clear()
    assert tracking.model_shift("udaflow-synth-to-mnist") == ("synth", "mnist")


def _open_new_store(uri: str, root: str, barrier) -> str:
    """One `udaflow run` starting in a new project: configure the store, then use it."""
    import mlflow

    barrier.wait()  # every process at once, as two runs started together
    try:
        tracking.configure(uri, Path(root) / "artifacts")
        mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the test reports what each process met
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def test_runs_that_start_together_on_a_new_store_create_it_once(tmp_path):
    """Two runs on other shifts started together in a new project both ran MLflow's migrations on
    the new SQLite store: `table _alembic_tmp_latest_metrics already exists`, and a store left
    half-migrated that every later command failed on."""
    import multiprocessing
    import sqlite3

    uri = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(3)
        with ctx.Pool(3) as pool:
            results = pool.starmap(_open_new_store, [(uri, str(tmp_path), barrier)] * 3)
    assert results == ["ok"] * 3
    with sqlite3.connect(tmp_path / "mlflow/mlflow.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"experiments", "runs", "registered_models", "model_versions"} <= tables
    assert not [t for t in tables if t.startswith("_alembic_tmp")]


def test_a_second_process_waiting_on_a_models_promotion_lock_says_whom_it_waits_for(tmp_path, monkeypatch, capsys):
    """`udaflow promote` or `rollback` while a run registered the same model waited without a word."""
    import threading

    from udaflow.locks import exclusive

    monkeypatch.setenv("UDAFLOW_ARTIFACT_ROOT", str(tmp_path))
    entered = threading.Event()

    def second():
        with tracking.registry_lock("udaflow-synth-to-mnist"):
            entered.set()

    with exclusive(tmp_path / ".udaflow-synth-to-mnist.promotion.lock"):  # the holder, as another process's run
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not entered.wait(1.0)  # it waits ...
    waiter.join(10)
    assert entered.is_set()  # ... until the holder is done
    err = capsys.readouterr().err
    assert err.count("waiting for another udaflow process registering, promoting or rolling back 'udaflow-synth-to-mnist'") == 1
    assert f"(pid {os.getpid()})" in err


def test_the_heartbeat_skips_a_tracking_server_that_does_not_answer_and_says_so_once(monkeypatch, capsys):
    """A team probe killed the MLflow server mid-run: each heartbeat waited out MLflow's retries (about 4
    minutes) and printed urllib3's retry warnings among the progress lines, 18 of them. A beat now asks the
    server's /health first (no retries), skips the beat while it does not answer, and says so once."""
    import socket
    import threading

    with socket.socket() as sock:  # a port nothing listens on: the connection is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    beats, answering = [], threading.Event()

    class Client:
        def set_tag(self, run_id, key, value):
            beats.append((run_id, key))

    monkeypatch.setattr(tracking, "_client", lambda: Client())
    monkeypatch.setattr(tracking, "mlflow_uri", lambda: f"http://127.0.0.1:{port}")
    monkeypatch.setattr(tracking, "HEARTBEAT_S", 0.05)
    real = tracking._answers_now
    monkeypatch.setattr(tracking, "_answers_now", lambda uri: answering.is_set() or real(uri))
    tracking._start_heartbeat("r1")
    try:
        time.sleep(0.6)
        assert beats == []  # every beat skipped, none waited on MLflow's retries
        answering.set()
        deadline = time.time() + 5
        while not beats and time.time() < deadline:
            time.sleep(0.05)
    finally:
        tracking._stop_heartbeat("r1")
    assert beats and beats[0] == ("r1", tracking.HEARTBEAT_TAG)
    err = capsys.readouterr().err
    assert err.count(f"warning: the tracking server http://127.0.0.1:{port} does not answer") == 1
    assert err.count("answers again") == 1


def test_the_cli_keeps_mlflow_pyfunc_info_out_of_a_runs_output_but_not_its_warnings(capfd):
    """Every `udaflow run` printed MLflow's timestamped 'INFO mlflow.pyfunc: Validating input example against
    model signature' between its progress lines; a warning from the same logger still shows."""
    import logging

    import mlflow.pyfunc  # noqa: F401 - configures MLflow's loggers (levels, a stderr handler) as a run does

    import udaflow.cli  # noqa: F401

    logger = logging.getLogger("mlflow.pyfunc")
    capfd.readouterr()
    logger.info("Validating input example against model signature")
    logger.warning("a warning MLflow gives")
    err = capfd.readouterr().err
    assert "Validating input example" not in err and "a warning MLflow gives" in err, err
    udaflow.cli._STATE["debug"] = True  # --debug shows it all
    try:
        logger.info("Validating input example against model signature")
    finally:
        udaflow.cli._STATE["debug"] = False
    assert "Validating input example" in capfd.readouterr().err
