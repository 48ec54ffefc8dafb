"""Promote / rollback against a real MLflow registry (temp SQLite), through the CLI and flows."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from udaflow import tracking
from udaflow.cli import app

pytestmark = pytest.mark.usefixtures("prefect_harness")
NAME = "udaflow-a-to-b"
runner = CliRunner()


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    params = yaml.safe_load((Path(__file__).parents[2] / "params.yaml").read_text())
    params["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_root": str(tmp_path / "artifacts")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    tracking.configure(params["tracking"]["uri"], tmp_path / "artifacts")
    return tmp_path


def add_version(target_acc: float | None, im: float, source_val: float = 99.0) -> str:
    """Register a (tiny) model version as challenger with the tags a pipeline run writes."""
    exp = tracking.experiment_id("a", "b")
    run = tracking.PipelineRun(exp, tracking.start_run(exp, "test", {}), "a", "b")
    metrics = {"source_val_acc": source_val, "validators": {"im": im}, "selected_by": "im"}
    if target_acc is not None:
        metrics["target_acc"] = target_acc
    model = torch.nn.Linear(4, 2)
    return tracking.register_challenger(run, model, np.zeros((1, 4), dtype=np.float32), metrics, {"method": "test"}).version


def champion() -> str | None:
    v = tracking._alias_version(NAME, "champion")
    return None if v is None else str(v.version)


def cli(args, root):
    return runner.invoke(app, [*args, "--params", str(root / "params.yaml")])


def test_first_promotion_pass_fail_dry_run_and_rollback(registry: Path):
    add_version(80.0, 0.5)
    result = cli(["promote", "--model", NAME, "--dry-run"], registry)
    assert result.exit_code == 0, result.output
    assert "would promote" in result.output and champion() is None  # dry run changes nothing

    result = cli(["promote", "--model", NAME], registry)
    assert result.exit_code == 0 and "no champion yet" in result.output and champion() == "1"

    add_version(85.0, 0.4)  # better on the labelled holdout: passes
    result = cli(["promote", "--model", NAME], registry)
    assert "promoted" in result.output and champion() == "2"
    tags = mlflow.MlflowClient().get_model_version(NAME, "2").tags
    assert tags["gate.decision"] == "promoted" and tags["gate.compared_with"] == "1" and tags["gate.criterion"] == "target_acc"

    add_version(84.0, 0.9)  # worse target accuracy: fails, champion stays
    result = cli(["promote", "--model", NAME], registry)
    assert "not promoted" in result.output and champion() == "2"
    assert mlflow.MlflowClient().get_model_version(NAME, "3").tags["gate.decision"] == "rejected"

    result = cli(["rollback", "--model", NAME], registry)
    assert result.exit_code == 0 and "from v2 to v1" in result.output and champion() == "1"
    result = cli(["rollback", "--model", NAME], registry)
    assert result.exit_code == 2 and "no previous champion" in result.output


def test_label_free_gate_and_source_tolerance(registry: Path):
    add_version(None, 0.5)
    cli(["promote", "--model", NAME], registry)
    add_version(None, 0.6, source_val=95.0)  # better validator but source accuracy fell 4 points
    result = cli(["promote", "--model", NAME], registry)
    assert "dropped 4.00" in result.output and champion() == "1"
    add_version(None, 0.7, source_val=98.5)
    result = cli(["promote", "--model", NAME], registry)
    assert "validator.im" in result.output and champion() == "3"


def test_unknown_model_is_one_line(registry: Path):
    result = cli(["promote", "--model", "udaflow-nope"], registry)
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output


def _promote_in_process(uri: str, artifacts: str, queue) -> None:
    tracking.configure(uri, Path(artifacts))
    decision, challenger, _ = tracking.promote(NAME, "im", 1.0)
    queue.put((decision.promote, decision.criterion, challenger))


def test_concurrent_promotions_leave_one_consistent_champion(registry: Path):
    add_version(80.0, 0.5)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    uri = f"sqlite:///{registry}/mlflow.db"
    procs = [ctx.Process(target=_promote_in_process, args=(uri, str(registry / "artifacts"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    outcomes = sorted(queue.get(timeout=5) for _ in procs)
    # exactly one promoted; the other found the challenger already champion
    assert [o[0] for o in outcomes] == [False, True] and {o[1] for o in outcomes} == {"first", "same"}
    assert champion() == "1"
    history = mlflow.MlflowClient().get_registered_model(NAME).tags[tracking.HISTORY_TAG]
    assert history == "1"
