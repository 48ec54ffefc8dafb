"""Registry tasks: the promotion gate and rollback (udaflow.tracking moves the aliases), and the slot
every task that writes a model's versions, aliases or history holds on a shared Prefect server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import task
from prefect.cache_policies import NO_CACHE

from udaflow import steps, tracking
from udaflow.config import Config
from udaflow.promotion import Decision

from tasks import named_prefect_api


@contextmanager
def registry_slot(model: str) -> Iterator[None]:
    """On a shared Prefect server (`tasks.named_prefect_api`: a team's workers, their shells): the
    one slot of the global concurrency limit `udaflow-registry:<model>` (limit 1, created on first use),
    held while a registration, a gate or a rollback of `model` writes, so runs on different machines
    never move its aliases and history at once. tracking.registry_lock, a file lock, holds on one
    machine only. A holder killed outright frees the slot when its lease ends (`lease_duration`).
    Without a server every run is on this machine: the file lock is enough, nothing is asked."""
    if named_prefect_api() is None:
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = f"udaflow-registry:{model}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another machine created it in between
                pass
    # strict: a limit that cannot be read is an error, not a free pass; a lease renewal that fails
    # once (a server restart) does not stop a registration half-way
    with concurrency(name, occupy=1, strict=True, lease_duration=120, raise_on_lease_renewal_failure=False):
        yield


@task(name="promotion-gate", cache_policy=NO_CACHE, tags=["udaflow-promotion"])
def promotion_gate(cfg: Config, model: str, dry_run: bool = False, version: str | None = None) -> tuple[Decision, str, str | None]:
    """Measure challenger and champion on the same data now; move champion only when the gate passes
    (`version`: a run's own registration, judged only while it is the challenger)."""
    tracking.configure(cfg.tracking.uri, cfg.tracking.artifact_root)
    with registry_slot(model):
        return steps.gate(cfg, model, dry_run, version)


@task(name="rollback-champion", cache_policy=NO_CACHE, tags=["udaflow-promotion"])
def rollback_champion(cfg: Config, model: str, dry_run: bool = False) -> tuple[str, str]:
    tracking.configure(cfg.tracking.uri, cfg.tracking.artifact_root)
    with registry_slot(model):
        return tracking.rollback(model, dry_run)
