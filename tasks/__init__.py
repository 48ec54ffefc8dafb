"""Prefect tasks: each wraps one udaflow library call, doing I/O, retries and caching."""

from __future__ import annotations

import os

# the API of a Prefect server this process started for itself (udaflow's temporary server, a test
# harness): no other process or machine reports to it
PRIVATE_API = "UDAFLOW_PRIVATE_PREFECT_API"


def named_prefect_api() -> str | None:
    """The Prefect API a person named, as Prefect itself reads it (PREFECT_API_URL in the environment,
    or the active Prefect profile's: `prefect config set PREFECT_API_URL=...`); None when none is, or
    when it is the temporary server of this process (`PRIVATE_API`): schedules, events and locks
    shared with other processes need a server that outlives this one."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return url if url and url != os.environ.get(PRIVATE_API) else None
