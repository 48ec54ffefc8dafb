"""Tracking tasks: each records one pipeline step in MLflow (udaflow.tracking does the talking)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from udaflow import costs, steps, tracking
from udaflow.config import Config
from udaflow.data.expectations import ValidationReport
from udaflow.engine import resolve_device

from tasks.registry import registry_slot


@task(name="open-tracking-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def open_tracking_run(cfg: Config, params_file: str, flow_run_id: str) -> tracking.PipelineRun:
    tracking.configure(cfg.tracking.uri, cfg.tracking.artifact_root)
    return tracking.open_pipeline_run(cfg.model_dump(mode="json"), Path(params_file), flow_run_id)


@task(name="log-validation", cache_policy=NO_CACHE)
def log_validation(run: tracking.PipelineRun, report: ValidationReport) -> str:
    return tracking.log_validation(run, report.success, report.statistics, report.result_json, report.data_docs, None if report.success else report.error())


@task(name="log-datasets", cache_policy=NO_CACHE)
def log_datasets(run: tracking.PipelineRun, versions: list[dict[str, str]]) -> None:
    tracking.log_datasets(run, {v["role"]: v for v in versions})


@task(name="log-training", cache_policy=NO_CACHE)
def log_training(run: tracking.PipelineRun, stage: str, outcome: steps.StepOutcome, history: dict[str, list], cached: bool) -> str:
    metrics = {"seconds": outcome.seconds, "train_images_per_s": outcome.images_per_s, "steps": float(outcome.steps), "cached": float(cached)}
    tags = {"cached": str(cached).lower(), "checkpoint": outcome.path, "cache_key": outcome.cache_key}
    return tracking.log_training(run, stage, metrics, history.get(stage, []), history.get("validators", []) if stage == "adapt" else [], tags)


@task(name="log-evaluation", cache_policy=NO_CACHE)
def log_evaluation(cfg: Config, run: tracking.PipelineRun, metrics: dict[str, Any]) -> str:
    paths = steps.run_paths(cfg)
    figures = sorted(paths.method_dir.glob("*.png"))
    # after evaluation ran on the device in this process: naming its GPU starts no CUDA context of its own
    hardware = costs.machine(resolve_device(cfg.train.device))
    return tracking.log_evaluation(run, metrics, figures, paths.metrics, hardware)


@task(name="register-challenger", cache_policy=NO_CACHE)  # no retries: a retry after a partial registration would add a second version
def register_challenger(cfg: Config, run: tracking.PipelineRun, metrics: dict[str, Any], versions: list[dict[str, str]]) -> tracking.Registered:
    package, example = steps.registered_model(cfg)
    tags = {
        "method": cfg.method, "backbone": cfg.model.backbone, "seed": cfg.seed,
        **{f"data.{v['role']}.md5": v["md5"] for v in versions},
        **{f"data.{v['role']}.name": v["name"] for v in versions},
    }
    with registry_slot(tracking.model_name(cfg.source, cfg.target)):
        return tracking.register_challenger(run, package, example, metrics, tags)


@task(name="close-tracking-run", cache_policy=NO_CACHE)
def close_tracking_run(run: tracking.PipelineRun, stage_seconds: dict[str, float], failed: bool = False, killed: bool = False) -> None:
    tracking.close_pipeline_run(run, stage_seconds, failed, killed)
