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


@task(name="restore-dataset", cache_policy=NO_CACHE, retries=1)
def restore_dataset(md5: str, dest: str, project: str) -> str:
    """Check out exactly the recorded dataset version (cache or remote) into the isolated workspace."""
    return str(versioning.restore_dataset(md5, Path(dest), Path(project)))
