"""Lineage tasks: read a past run's record, restore its datasets from DVC into a workspace."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from udaflow import tracking, versioning


@task(name="read-run-record", cache_policy=NO_CACHE)
def read_run_record(tracking_uri: str, artifact_root: str, run_id: str) -> tracking.RunRecord:
    tracking.configure(tracking_uri, Path(artifact_root))
    return tracking.run_record(run_id)


def _worth_retrying(task, task_run, state) -> bool:
    """Retry a failed restore once (a remote's hiccup), not when DVC answered that the version is in
    neither the cache nor the remote: the same answer again, after restoring everything else twice."""
    try:
        return not isinstance(state.result(raise_on_failure=False), versioning.VersioningError)
    except Exception:  # noqa: BLE001 - an unreadable result: the retry policy as before
        return True


@task(name="restore-dataset", cache_policy=NO_CACHE, retries=1, retry_condition_fn=_worth_retrying)
def restore_dataset(md5: str, dest: str, project: str) -> str:
    """Check out exactly the recorded dataset version (cache or remote) into the isolated workspace."""
    return str(versioning.restore_dataset(md5, Path(dest), Path(project), announce=True))


@task(name="data-unchanged-since-champion", cache_policy=NO_CACHE)
def data_unchanged_since_champion(cfg) -> str | None:
    """A reason to skip a retrain when source and target are byte-identical to the data the champion
    (or the latest challenger, once a gate turned it down) was adapted on. A challenger no gate has
    decided on (its run killed before or inside the gate) does not count: the retrain runs, adopts that
    version (the same weights) and gates it, where a skip would leave it ungated for good."""
    tracking.configure(cfg.tracking.uri, cfg.tracking.artifact_root)
    name = tracking.model_name(cfg.source, cfg.target)
    recorded = {alias: tracking.alias_data_hashes(name, alias, gated=alias == tracking.CHALLENGER)
                for alias in (tracking.CHAMPION, tracking.CHALLENGER)}
    if not any(recorded.values()):
        return None
    now = {}
    for role, domain in (("source", cfg.source), ("target", cfg.target)):
        version = versioning.dataset_version(Path(cfg.data.root) / domain)
        if version is None:  # untracked or modified since it was versioned: not the same data
            return None
        now[role] = version.md5
    for alias, hashes in recorded.items():
        if now == hashes:
            return f"source and target DVC hashes equal the {alias}'s ({now['source']}, {now['target']}): nothing new to learn from"
    return None
