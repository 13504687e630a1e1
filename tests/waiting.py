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


def checkpointed_attempt(store, profile: str, timeout: float = 120.0):
    """The attempt running on `profile` once its training has written a checkpoint (torch's last.pt)."""
    from infra.settings import Settings

    def ready():
        running = [a for a in store.attempts() if a.profile == profile and a.outcome == "running"]
        if running and (Settings.from_env().runs_dir / running[0].request_id / "last.pt").exists():
            return running[0]
        return None

    return wait_for(ready, f"a training on {profile} with a checkpoint written", timeout, poll=0.5)


def gone_at(process):
    """When `process` (a psutil.Process) ended, watched from now on: run it in a thread beside what it waits for."""
    from datetime import UTC, datetime

    import psutil

    while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
    return datetime.now(UTC)
