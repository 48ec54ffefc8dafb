"""Prefect tasks: each wraps one udaflow library call, doing I/O, retries and caching."""
