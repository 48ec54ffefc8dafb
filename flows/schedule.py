"""Deployments of the retrain flow on a running Prefect server: a cron schedule plus a trigger on
`udaflow.dataset.updated` events for the target, run by a process worker of the `udaflow` pool."""

from __future__ import annotations

from pathlib import Path

from flows.retrain import DATASET_UPDATED, dataset_resource, retrain

REPO = Path(__file__).resolve().parents[1]
RETRAIN_ON = ("shifted", "unmeasured", "no-champion")  # the `udaflow.drift` labels of an ingest event that start a retrain


def ensure_work_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


def ensure_training_limit(limit: int = 1) -> str:
    """A tag concurrency limit on `udaflow-training@<this host>`: this machine trains one model at a time,
    whichever worker or deployment started it. Returns the tag."""
    from prefect.client.orchestration import get_client

    from tasks.training import host_training_tag

    tag = host_training_tag()
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=limit)  # an upsert
    return tag


def deploy_retrain(
    params_file: Path, source: str, target: str, cron: str, method: str | None, profile: str | None, pool: str
) -> str:
    """Create or update deployment `udaflow-retrain/<source>-to-<target>`; returns its id."""
    from prefect.events import DeploymentEventTrigger

    ensure_work_pool(pool)
    ensure_training_limit()
    trigger = DeploymentEventTrigger(
        name=f"new {target} data",
        expect={DATASET_UPDATED},
        match={"prefect.resource.id": dataset_resource(target), "udaflow.drift": list(RETRAIN_ON)},
        # each model's own verdict: another source's model may have fired the event on a shift this one does not see
        parameters={"drift": "{{ event.payload.verdicts }}"},
    )
    flow = retrain.from_source(source=str(REPO), entrypoint="flows/retrain.py:retrain")
    deployment_id = flow.deploy(
        name=f"{source}-to-{target}",
        work_pool_name=pool,
        cron=cron,
        triggers=[trigger],
        parameters={"params_file": str(Path(params_file).resolve()), "source": source, "target": target, "method": method, "profile": profile},
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,  # Prefect's advice to use `.serve` for a process pool: the worker is the design
        tags=["udaflow", f"target:{target}"],
        concurrency_limit=1,
    )
    return str(deployment_id)


def reach_server() -> None:
    """Raise the client's connection error when the Prefect server named (PREFECT_API_URL, or the
    profile's) does not answer: before an ingest measures drift and promises a retrain."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.hello().raise_for_status()


def emit_dataset_updated(name: str, md5: str, drift: str = "no-champion", figures: dict | None = None,
                         verdicts: dict[str, str] | None = None) -> None:
    """Tell the Prefect server a domain has a new DVC version. `drift` (shifted | unshifted |
    unmeasured | no-champion, from `udaflow data ingest`) is a resource label the retrain triggers match on; the
    per-model drift figures and each model's own verdict ({model name: verdict}) ride in the payload.

    Sent on its own connection, closed before this returns, and any failure raised: Prefect's
    `emit_event` only queues an event for a background worker, which drops it (a warning in the log)
    when the server does not answer, so an ingest said "emitted" and recorded a trigger that never
    reached a deployment."""
    import asyncio

    from prefect.events import Event
    from prefect.events.clients import get_events_client

    resource = {"prefect.resource.id": dataset_resource(name), "udaflow.md5": md5, "udaflow.drift": drift}
    event = Event(event=DATASET_UPDATED, resource=resource, payload={"drift": figures or {}, "verdicts": verdicts or {}})

    async def send() -> None:
        # the websocket's closing handshake comes after the server has read every frame sent before it
        async with get_events_client(reconnection_attempts=2) as client:
            await client.emit(event)

    try:
        asyncio.run(send())
    except Exception as exc:
        raise RuntimeError(f"the Prefect server did not take the event {DATASET_UPDATED} for '{name}': "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc
