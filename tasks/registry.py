"""Registry tasks: the promotion gate and rollback (udaflow.tracking moves the aliases)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from udaflow import steps, tracking
from udaflow.config import Config
from udaflow.promotion import Decision


@task(name="promotion-gate", cache_policy=NO_CACHE, tags=["udaflow-promotion"])
def promotion_gate(cfg: Config, model: str, dry_run: bool = False) -> tuple[Decision, str, str | None]:
    """Measure challenger and champion on the same data now; move champion only when the gate passes."""
    tracking.configure(cfg.tracking.uri, cfg.tracking.artifact_root)
    return steps.gate(cfg, model, dry_run)


@task(name="rollback-champion", cache_policy=NO_CACHE, tags=["udaflow-promotion"])
def rollback_champion(cfg: Config, model: str) -> tuple[str, str]:
    tracking.configure(cfg.tracking.uri, cfg.tracking.artifact_root)
    return tracking.rollback(model)
