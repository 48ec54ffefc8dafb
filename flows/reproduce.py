"""Reproduce a past pipeline run: restore the datasets it read (by DVC hash) into an isolated
workspace, re-run validate -> pretrain -> adapt -> evaluate with its recorded params and seed,
and compare the metrics with the recorded ones. Today's data/ and the registry are untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from tasks.data import validate_datasets
from tasks.lineage import read_run_record, restore_dataset
from tasks.training import adapt_to_target, drop_checkpoint, evaluate_model, pretrain_source
from udaflow.steps import compare_metrics, rerun_config


@flow(name="udaflow-reproduce")
def reproduce_run(run_id: str, tracking_uri: str, artifact_root: str, project: str, workspace: str, device: str | None = None) -> dict[str, Any]:
    record = read_run_record(tracking_uri, artifact_root, run_id)
    ws = Path(workspace)
    for dataset in record.datasets.values():
        restore_dataset(dataset["md5"], str(ws / "data/raw" / dataset["name"]), project)
    cfg = rerun_config(record.config, device, ws)  # the recorded device unless told another

    report = validate_datasets(cfg)
    source_model = pretrain_source.with_options(refresh_cache=True)(cfg, record.datasets["source"]["md5"])
    adapt_to_target(cfg, source_model.path)
    metrics = evaluate_model(cfg, source_model.path)
    drop_checkpoint(cfg)
    same, rows = compare_metrics(record.metrics, metrics)
    return {"same": same, "rows": rows, "validation": report.success, "commit": record.tags.get("git.commit", "unknown"), "workspace": str(ws),
            "device": cfg.train.device, "tags": record.tags}
