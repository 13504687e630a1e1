"""Waiting for something the servers do in their own time: a worker online, an event stored, a state reached."""

from __future__ import annotations

import time

from prefect.client.orchestration import get_client


def wait_for(read, what: str, timeout: float = 30.0, poll: float = 0.2):
    """`read()`'s first truthy value; AssertionError naming `what` when none comes within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := read():
            return value
        time.sleep(poll)
    raise AssertionError(f"{what} did not come within {timeout:g} s")


def wait_ready(pool: str, timeout: float = 60.0) -> None:
    """Until the work pool is READY (one of its workers is online)."""
    with get_client(sync_client=True) as client:
        wait_for(lambda: client.read_work_pool(pool).status.value == "READY", f"a worker online for {pool}", timeout)
