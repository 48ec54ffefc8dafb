"""MLFLOW_TRACKING_URI: the user's variable points udaflow at a server; udaflow never sets it itself."""

from __future__ import annotations

import os
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
