"""Exclusive file locks between udaflow processes (flock: a killed holder frees its lock)."""

from __future__ import annotations

import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path


class Held(Exception):
    """`exclusive(..., wait=False)` found the lock held: `holder` is what its holder wrote ("pid N")."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path}: held by {holder}")
        self.holder = holder


@contextmanager
def exclusive(path: Path, holder: str | None = None, wait: bool = True):
    """An exclusive flock on `path`; a second process says it waits for `holder` (and its pid), then waits
    (silently when `holder` is None), or with `wait=False` raises `Held` at once.

    flock conflicts with itself on a second open of the file: never nest two holds of one path in a process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                fh.seek(0)
                raise Held(path, fh.read().strip() or "another process") from None
            if holder is not None:
                fh.seek(0)
                # stderr itself, not print(): a flow with log_prints would route it to Prefect's (quietened) logger
                sys.stderr.write(f"waiting for {holder} ({fh.read().strip() or 'lock held'}) to finish\n")
                sys.stderr.flush()
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
