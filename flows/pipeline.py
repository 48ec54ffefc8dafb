"""The adaptation pipeline: validate the data, version it, pretrain on the source (cached),
adapt to the target, evaluate, register the adapted model as the new `challenger`, and let the
promotion gate decide whether it becomes `champion`."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, tags
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from tasks.data import validate_datasets, version_dataset
from tasks.registry import promotion_gate
from tasks.tracking import (
    close_tracking_run, log_datasets, log_evaluation, log_training, log_validation, open_tracking_run, register_challenger,
)
from tasks.training import adapt_to_target, drop_checkpoint, evaluate_model, host_training_tag, pretrain_source_cached
from udaflow import steps
from udaflow.config import Config
from udaflow.data.manifest import DataError


class DataValidationError(DataError):
    """A Great Expectations suite failed: nothing was trained, versioned or registered."""


@flow(name="udaflow-pipeline", log_prints=True)
def adaptation_pipeline(cfg: Config, params_file: str = "params.yaml") -> dict[str, Any]:
    # a second run on this shift waits: they share files and the registry; an ingest replacing its data waits for it
    with steps.exclusive_shift(cfg), steps.domains_in_use(cfg):
        seconds: dict[str, float] = {}
        run = open_tracking_run(cfg, params_file, str(flow_run.get_id() or ""))
        try:
            return _pipeline(cfg, run, seconds)
        except BaseException as exc:  # the run and any child still open end FAILED, or KILLED when a user stopped it
            try:
                close_tracking_run(run, seconds, failed=True, killed=isinstance(exc, (KeyboardInterrupt, TerminationSignal)))
            except Exception as closing:  # noqa: BLE001 - the store refused (locked, unreachable): what stopped the run is the error to report
                print(f"warning: MLflow run {run.run_id} could not be ended ({type(closing).__name__}: {str(closing).splitlines()[0][:200]}); "
                      "the next `udaflow run` on this host ends it KILLED")
            raise


def _pipeline(cfg: Config, run, seconds: dict[str, float]) -> dict[str, Any]:
    clock = time.perf_counter()
    report = validate_datasets(cfg)
    log_validation(run, report)
    if not report.success:
        seconds["validate"] = time.perf_counter() - clock
        raise DataValidationError(report.error(), report.hint())
    versions = [version_dataset(cfg, cfg.source, "source"), version_dataset(cfg, cfg.target, "target")]
    log_datasets(run, versions)
    seconds["validate_version"] = time.perf_counter() - clock

    with tags(host_training_tag()):  # a concurrency limit on this tag: one training per machine at a time
        pretrain_state = pretrain_source_cached(cfg, versions[0]["md5"])
        source_model = pretrain_state.result()
        source_cached = pretrain_state.name == "Cached" or source_model.cached
        seconds["pretrain"] = time.perf_counter() - clock - sum(seconds.values())

        adapted = adapt_to_target(cfg, source_model.path)
        seconds["adapt"] = time.perf_counter() - clock - sum(seconds.values())

    metrics = evaluate_model(cfg, source_model.path)
    seconds["evaluate"] = time.perf_counter() - clock - sum(seconds.values())

    log_training(run, "pretrain", source_model, metrics["history"], source_cached)
    log_training(run, "adapt", adapted, metrics["history"], False)
    log_evaluation(cfg, run, metrics)
    registered = register_challenger(cfg, run, metrics, versions)
    decision, _, champion = promotion_gate(cfg, registered.name, version=str(registered.version))
    # kept until the gate has decided: a run killed after adapting resumes at its last step, and one
    # killed after registering re-derives those weights at once and gates the version it left
    drop_checkpoint(cfg)
    seconds["track_register_gate"] = time.perf_counter() - clock - sum(seconds.values())
    close_tracking_run(run, seconds)
    return {
        "run_id": run.run_id, "experiment_id": run.experiment_id, "model": registered.name, "version": registered.version,
        "alias": registered.alias, "adopted_from_run": registered.adopted_from_run, "source_cached": source_cached, "prefect_task_cached": pretrain_state.name == "Cached",
        "metrics": {k: v for k, v in metrics.items() if k != "history"}, "stage_seconds": seconds, "datasets": versions,
        "gate": {"promoted": decision.promote, "reason": decision.reason, "champion_before": champion, "data": decision.data,
                 "rows": decision.rows},
    }
