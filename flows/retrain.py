"""Retrain: what a schedule or a data trigger runs. Skip when the data equals the champion's (or
the latest challenger's);
otherwise run the pipeline (validate, version, pretrain (cached), adapt, evaluate, register, gate)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import adaptation_pipeline
from tasks.lineage import data_unchanged_since_champion
from udaflow.config import load_config

DATASET_UPDATED = "udaflow.dataset.updated"  # the event `udaflow data ingest` emits on new content


def dataset_resource(name: str) -> str:
    return f"udaflow.dataset.{name}"


@flow(name="udaflow-retrain", log_prints=True)
def retrain(params_file: str, source: str, target: str, method: str | None = None, profile: str | None = "quick") -> dict[str, Any]:
    sets = [f"source={source}", f"target={target}", *([f"method={method}"] if method else [])]
    cfg = load_config(params_file, profile, sets)
    reason = data_unchanged_since_champion(cfg)
    if reason:
        print(f"retrain skipped: {reason}")
        return {"skipped": True, "reason": reason}
    result = adaptation_pipeline(cfg, params_file)
    return {"skipped": False, **{k: result[k] for k in ("run_id", "model", "version", "gate")}}
