"""Retrain: what a schedule or a data trigger runs. Skip when the data equals the champion's (or
the latest challenger's);
otherwise run the pipeline (validate, version, pretrain (cached), adapt, evaluate, register, gate)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import adaptation_pipeline
from tasks.lineage import data_unchanged_since_champion
from udaflow.config import load_config
from udaflow.tracking import model_name

DATASET_UPDATED = "udaflow.dataset.updated"  # the event `udaflow data ingest` emits on new content


def dataset_resource(name: str) -> str:
    return f"udaflow.dataset.{name}"


@flow(name="udaflow-retrain", log_prints=True)
def retrain(params_file: str, source: str, target: str, method: str | None = None, profile: str | None = "quick",
            drift: dict[str, str] | None = None) -> dict[str, Any]:
    """`drift`: the triggering event's verdict per model ({model name: shifted | unshifted | ...}); none on a schedule."""
    sets = [f"source={source}", f"target={target}", *([f"method={method}"] if method else [])]
    cfg = load_config(params_file, profile, sets)
    name = model_name(cfg.source, cfg.target)
    if (drift or {}).get(name) == "unshifted":  # the event fired on another model's shift
        reason = f"the new '{cfg.target}' data is not shifted for {name}@champion (its own drift check at ingest)"
        print(f"retrain skipped: {reason}")
        return {"skipped": True, "reason": reason}
    reason = data_unchanged_since_champion(cfg)
    if reason:
        print(f"retrain skipped: {reason}")
        return {"skipped": True, "reason": reason}
    result = adaptation_pipeline(cfg, params_file)
    print(retrain_summary(result))  # the worker's log: what `udaflow run` prints as its summary, in one line
    return {"skipped": False, **{k: result[k] for k in ("run_id", "model", "version", "gate")}}


def retrain_summary(result: dict[str, Any]) -> str:
    """One line: the version registered, its target accuracy where the target has labels, the gate's decision and why."""
    gate, metrics = result["gate"], result["metrics"]
    accuracy = metrics.get("target_acc_selected")
    scored = f"target accuracy {accuracy:.2f}% (selected by {metrics.get('selected_by')}); " if accuracy is not None else ""
    verdict = "promoted to @champion" if gate["promoted"] else "not promoted"
    return (f"retrain registered {result['model']} v{result['version']} (@challenger, MLflow run {result['run_id']}); {scored}"
            f"gate: {verdict}: {gate['reason']}")
