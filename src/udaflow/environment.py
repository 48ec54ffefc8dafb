"""Offline hygiene every entry point sets first: the `udaflow` command, and the flows a Prefect
worker runs (scheduled and data-triggered retrains start in the worker's shell, not through the CLI)."""

from __future__ import annotations

import os

SETTINGS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "False",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per small artifact read: noise before the output that matters
    # deterministic cuBLAS (train.deterministic on a GPU) needs this before the process's first cuBLAS call,
    # and the bench's GEMM measurement comes before any training
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}


def setup_environment() -> None:
    """No telemetry, never reach a model hub, cuBLAS ready to repeat its bits; a value the user set stays."""
    for key, value in SETTINGS.items():
        os.environ.setdefault(key, value)
