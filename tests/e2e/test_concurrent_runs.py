"""Two `udaflow run` processes on the same shift at once, as two terminals would start them: the
second waits for the first (they share runs/<shift>/ and the registered model); both register, the
registry is consistent and the SQLite store intact."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from udaflow import tracking

BIN = Path(sys.executable).parent
NAME = "udaflow-synth-to-fonts-b"
pytestmark = pytest.mark.slow


def test_two_runs_on_one_shift_at_once(tmp_path: Path, new_shift_project):
    project = new_shift_project(tmp_path / "project", tmp_path / "scratch", 60)
    procs, logs = [], []
    for i in range(2):
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / f"prefect{i}"), "PREFECT_API_URL": "", "DO_NOT_TRACK": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "False", "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("PREFECT_API_URL")
        logs.append((tmp_path / f"run{i}.log").open("w"))
        procs.append(subprocess.Popen(
            [str(BIN / "udaflow"), "run", "--source", "synth", "--target", "fonts-b", "--method", "dann", "--params", "params.yaml"],
            cwd=project, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
        ))
        time.sleep(1.0)
    codes = [p.wait(timeout=600) for p in procs]
    outputs = [(tmp_path / f"run{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], outputs
    assert sum("waiting for another udaflow run on synth-to-fonts-b" in o for o in outputs) == 1, outputs

    tracking.configure(f"sqlite:///{project}/mlflow/mlflow.db", project / "mlflow/artifacts")
    versions = tracking.latest_versions(NAME)
    assert [v.version for v in versions] == [1, 2] or [str(v.version) for v in versions] == ["1", "2"]
    assert tracking.incomplete_versions(NAME) == []
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    runs = {v.run_id for v in versions}
    assert len(runs) == 2 and all(client.get_run(r).info.status == "FINISHED" for r in runs)
    exp = client.get_experiment_by_name("udaflow/synth-to-fonts-b").experiment_id
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'")
    with sqlite3.connect(project / "mlflow/mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
