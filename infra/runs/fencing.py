"""Before acting on a Crashed verdict, make sure the run's process is gone: the verdict may be wrong.

The zombie automation declares a run dead when its heartbeats stop. A second attempt of the same request (fallback)
or another run on its GPU (cleanup) must wait until the crashed run's process is really gone, or two trainings would
write the same checkpoints or share a GPU. Its launcher (infra/runs/liveness.py) says what it knows in events:
- EXITED or FENCED after the verdict: gone, its host says so;
- its heartbeat payload names its host and pid: on this host, the process is looked at (and killed if it lives);
- silence: a launcher on another host that cannot reach the server kills its run after SELF_FENCE_S, so one silent
  for SILENT_GONE_S (that, plus a margin for a busy machine) has no run left alive.
A run that no launcher ever vouched for (a container pool, a crash at submission) has nothing to ask.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psutil
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventOrder, EventResourceFilter

from infra.runs.liveness import EXITED, FENCED, HEARTBEAT, SELF_FENCE_S, VOUCHER, kill_group

# A launcher on another host silent this long has fenced its run (SELF_FENCE_S), even on a busy machine that ran it
# late. The zombie verdict comes 60 s after its last heartbeat, so this delays a fallback by about 20 s at most.
SILENT_GONE_S = SELF_FENCE_S + 20.0
POLL_S = 1.0
STARTED_SLACK_S = 5.0  # a process created this close to the launcher's record of the start is the same process


class StillAlive(RuntimeError):
    """The run was declared dead, but its process still runs and could not be stopped from here."""


@dataclass(frozen=True)
class Gone:
    """How we know the run's process is gone."""

    how: str


def launcher_events(client, flow_run_id, since: datetime) -> list:
    """The launcher's events for one run since `since`, newest first (Prefect's own heartbeats left out)."""
    events = client.read_events(
        filter=EventFilter(
            occurred=EventOccurredFilter(since=since),
            event=EventNameFilter(name=[HEARTBEAT, FENCED, EXITED]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
            order=EventOrder.DESC,
        ),
        limit=50,
    ).events
    return [e for e in events if e.payload.get("vouched_by") == VOUCHER]


def local_process(payload: dict) -> psutil.Process | None:
    """The run's process named by a launcher's payload, when it runs on this host and still lives."""
    if payload.get("host") != socket.gethostname():
        return None
    try:
        process = psutil.Process(int(payload["pid"]))
        if abs(process.create_time() - float(payload.get("started", process.create_time()))) > STARTED_SLACK_S:
            return None  # the pid now belongs to another process
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except (psutil.Error, KeyError, ValueError):
        return None


def confirm_gone(client, flow_run_id, timeout: float = 120.0) -> Gone:
    """Wait until the crashed run's process is known to be gone; kill it when it runs on this host.

    Raises StillAlive when its launcher on another host keeps vouching for it past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        events = launcher_events(client, flow_run_id, datetime.now(UTC) - timedelta(days=1))
        if not events:  # a zombie verdict comes a window after a heartbeat, long stored by then
            return Gone("no launcher vouched for it: the worker saw it end, or it never started")
        else:
            newest = events[0]
            if newest.event in (EXITED, FENCED):
                verb = "killed by its launcher" if newest.event == FENCED else "exited"
                return Gone(f"its process {verb} on {newest.payload.get('host')}")
            process = local_process(newest.payload)
            if newest.payload.get("host") == socket.gethostname():
                if process is None:
                    return Gone(f"its process {newest.payload.get('pid')} is no longer running on this host")
                kill_group(process.pid)
                psutil.wait_procs([process], timeout=10)
                return Gone(f"its process {process.pid} still ran on this host and was killed")
            silent = (datetime.now(UTC) - _utc(newest.occurred)).total_seconds()
            if silent > SILENT_GONE_S:
                return Gone(
                    f"its launcher on {newest.payload.get('host')} has been silent for {silent:.0f} s "
                    f"(a launcher cut off for {SELF_FENCE_S:.0f} s kills its run)"
                )
        if time.monotonic() > deadline:
            raise StillAlive(
                f"flow run {flow_run_id} was marked Crashed, but its launcher on {events[0].payload.get('host')} "
                f"still vouches for it {timeout:.0f} s later and has not stopped it; not starting another attempt "
                "beside it. Cancel that flow run (it stops the process), or stop it on its host, then run the "
                "request again: it resumes from its last checkpoint."
            )
        time.sleep(POLL_S)


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def holder_may_live(client, host: str, pid: int, since: datetime, flow_run_id: str | None) -> str | None:
    """Why the process of a GPU lease record may still run although its flow run has ended (None: it is gone).

    Cleanup frees a lease's slots only when this is None: a GPU is never handed on while its holder may use it."""
    if host == socket.gethostname():
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= since.timestamp() + 1:
                return f"its process {pid} still runs on this host"
        except psutil.Error:
            pass
        return None
    if flow_run_id is None:
        return None
    events = launcher_events(client, flow_run_id, datetime.now(UTC) - timedelta(seconds=SILENT_GONE_S))
    if events and events[0].event == HEARTBEAT:
        return f"its launcher on {events[0].payload.get('host')} still vouches for it"
    return None
