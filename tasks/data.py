"""Tasks on datasets: validate them with Great Expectations, version them with DVC."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from udaflow import steps, versioning
from udaflow.config import Config
from udaflow.data.expectations import ValidationReport


@task(name="validate-datasets", cache_policy=NO_CACHE)
def validate_datasets(cfg: Config) -> ValidationReport:
    """Both GX suites on the source and target manifests and files."""
    return steps.validate_datasets(cfg)


@task(name="version-dataset", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def version_dataset(cfg: Config, domain: str, role: str) -> dict[str, str]:
    """Commit the domain folder to DVC (new content only), push it; return what tracking records."""
    folder = Path(cfg.data.root) / domain
    version = versioning.version_dataset(folder)
    return {"role": role, "name": domain, "md5": version.md5, "pointer": version.pointer, "manifest": str(folder / "manifest.csv"), "changed": str(version.changed)}
