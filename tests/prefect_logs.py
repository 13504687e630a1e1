"""A flow run's log, as the Prefect UI shows it, read back by tests.

Prefect ships log lines to its API from a background worker in batches, so a flow that has just returned may still
have lines in flight: reading right away races it (a CI run once missed a task's last line). `run_logs` sends what
this process still holds and then waits, up to a deadline, for the line a test is about to assert on.
"""

from __future__ import annotations

import re
import time
from contextlib import nullcontext

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings


def run_logs(run_id, until: str | None = None, timeout: float = 30.0, prefect_api: str | None = None) -> list:
    """Every log line of a flow run and its tasks (the API pages them, 200 at a time). With `until` (a regular
    expression), wait until a line matches it; after the deadline the lines so far are returned, and the test's own
    assertion says what is missing. `prefect_api`: another Prefect server than the session's (its API URL)."""
    APILogWorker.drain_all(timeout=10)
    deadline = time.monotonic() + timeout
    while True:
        found: list = []
        elsewhere = temporary_settings({PREFECT_API_URL: prefect_api}) if prefect_api else nullcontext()
        with elsewhere, get_client(sync_client=True) as prefect:
            while page := prefect.read_logs(
                LogFilter(flow_run_id={"any_": [str(run_id)]}), limit=200, offset=len(found)
            ):
                found += page
        if until is None or any(re.search(until, log.message) for log in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)
