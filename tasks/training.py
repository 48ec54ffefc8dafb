"""Training tasks: source pretraining (cached on DVC hash + params) and target adaptation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from udaflow import steps
from udaflow.config import Config
from udaflow.data.datasets import Domain
from udaflow.experiment import load_stage, source_cache_path, source_params


TRAINING_TAG = "udaflow-training"  # on every training task; a Prefect tag concurrency limit on it bounds trainings


def worth_retrying(task, task_run, state) -> bool:
    """Retry a failed training once (it resumes from its checkpoint), not when udaflow itself said why it
    stopped (a setting, the data, a checkpoint that cannot be written, a rank that failed under torchrun),
    the disk is full, or a Ctrl-C lies in the error's chain (a library may wrap it): the same error again,
    after as many steps again, its output printed twice, or a stopped run that went on."""
    from udaflow.errors import chain, disk_full, raised_on_purpose

    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable result: retry, as before
        return True
    if not isinstance(exc, BaseException):
        return True
    # a Ctrl-C or a termination signal, even inside another error: a person stopped it
    return not (disk_full(exc) or any(not isinstance(e, Exception) or raised_on_purpose(e) for e in chain(exc)))


def host_training_tag() -> str:
    """`udaflow-training@<host>`: with a concurrency limit of 1 on it (`udaflow schedule` makes one for
    the machine it runs on), one machine trains one model at a time, whichever worker started it."""
    import socket

    return f"{TRAINING_TAG}@{socket.gethostname()}"


def source_model_path(cfg: Config) -> Path:
    """Where the library caches the source model for this source content and these params."""
    classes = Domain.open(cfg.data.root, cfg.source).classes
    return source_cache_path(cfg, cfg.source, len(classes), Path(cfg.work_dir).resolve() / "cache")


def source_model_key(context: TaskRunContext, arguments: dict[str, Any]) -> str:
    """Same source content (DVC hash) + same source parameters + same project -> same source model."""
    cfg: Config = arguments["cfg"]
    payload = json.dumps(
        {"source": cfg.source, "md5": arguments["source_md5"], "cache": str(source_model_path(cfg)), **source_params(cfg, -1)},
        sort_keys=True,
    )
    return "udaflow-source-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


@task(name="pretrain-source", cache_key_fn=source_model_key, persist_result=True, retries=1, retry_condition_fn=worth_retrying,
      tags=[TRAINING_TAG])
def pretrain_source(cfg: Config, source_md5: str) -> steps.StepOutcome:
    """Supervised training on the labelled source; Prefect caches it across methods and targets.

    Call it through `pretrain_source_cached`, which refreshes the cache entry when the file it
    points at has been deleted.
    """
    outcome = steps.pretrain(cfg)
    if not Path(outcome.path).exists():  # pragma: no cover - steps.pretrain always writes it
        raise FileNotFoundError(outcome.path)
    return outcome


@task(name="adapt-to-target", cache_policy=NO_CACHE, retries=1, retry_condition_fn=worth_retrying, tags=[TRAINING_TAG])
def adapt_to_target(cfg: Config, source_model: str) -> steps.StepOutcome:
    """Adapt with cfg.method; a retry (or a re-run after a kill) resumes from the checkpoint."""
    return steps.adapt(cfg, source_model=Path(source_model))


@task(name="drop-checkpoint", cache_policy=NO_CACHE)
def drop_checkpoint(cfg: Config) -> None:
    """The adaptation's resume point, removed once its model is registered."""
    steps.drop_checkpoint(cfg)


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model(cfg: Config, source_model: str) -> dict[str, Any]:
    """Accuracies, validator scores, shift before/after, figures, metrics.json."""
    return steps.evaluate(cfg, source_model=Path(source_model))


def pretrain_source_cached(cfg: Config, source_md5: str):
    """The pretrain task's final state: a Prefect cache hit while its file still exists and reads as a
    stage (a truncated or tampered one is retrained, as the library does, not handed on)."""
    path = source_model_path(cfg)
    try:
        load_stage(path)
        refresh = False
    except (OSError, ValueError):
        refresh = True
    return pretrain_source.with_options(refresh_cache=refresh)(cfg, source_md5, return_state=True)
