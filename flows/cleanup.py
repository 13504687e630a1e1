"""The cleanup flow, daily: zombie runs end Crashed -> GPU slots no lease holds are released -> finished runs'
checkpoints are pruned to retention -> a summary artifact (`trainyard-cleanup`).

Order matters: a zombie crashed first frees its lease record and its checkpoints for the later stages. A run that
is Running, Suspended (paused), Scheduled or Pending keeps every checkpoint.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventOrder, EventResourceFilter
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Crashed
from pydantic import Field

from flows.monitor import PAGE, flow_runs_by_id, newest_log, paged
from infra.compute.allocation import PREFIX, Holder, read_holders
from infra.runs.fencing import holder_may_live
from infra.runs.monitoring import orphaned_slots, plan_pruning, prune, zombie_reason
from infra.settings import get_settings
from infra.stack.automations import ZOMBIE_AFTER, ensure_zombie_automation

CONFIRM_S = 3.0  # slots seen without a lease are looked at again after this long before they are released


@dataclass
class CleanupReport:
    dry_run: bool
    automation_created: bool = False
    crashed: list[str] = field(default_factory=list)  # "<flow run name> (<id>): <why>"
    released: dict[str, int] = field(default_factory=dict)  # GPU limit -> slots released
    records_removed: list[str] = field(default_factory=list)  # lease records of ended runs
    pruned: dict[str, list[str]] = field(default_factory=dict)  # run directory -> files and directories removed
    freed_bytes: int = 0
    kept_running: list[str] = field(default_factory=list)  # run directories left alone: their run has not ended


@task
def ensure_zombie_detection() -> bool:
    """The automation that marks runs Crashed when their heartbeats stop (created by setup; recreated if gone)."""
    return ensure_zombie_automation()


@task
def crash_zombie_runs(silent_after_minutes: float, dry_run: bool) -> list[str]:
    """Running flow runs whose heartbeats stopped (the server was down when the automation should have fired), or
    that never sent one and have been silent too long, end Crashed."""
    now, crashed = datetime.now(UTC), []
    running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
    with get_client(sync_client=True) as client:
        for run in paged(lambda offset: client.read_flow_runs(flow_run_filter=running, limit=PAGE, offset=offset)):
            if run.id == flow_run.id:
                continue  # this cleanup run
            entered = run.state.timestamp if run.state else run.start_time
            why = zombie_reason(
                entered,
                _last_heartbeat(client, run.id, run.start_time),
                newest_log(client, run.id),
                now,
                ZOMBIE_AFTER,
                timedelta(minutes=silent_after_minutes),
            )
            if why is None:
                continue
            crashed.append(f"{run.name} ({run.id}): {why}")
            if not dry_run:
                client.set_flow_run_state(run.id, Crashed(message=f"Marked Crashed by cleanup: {why}."), force=True)
    return crashed


@task
def release_stale_leases(dry_run: bool) -> tuple[dict[str, int], list[str]]:
    """Lease records of ended runs are removed; GPU slots in use that no recorded lease holds are released, if they
    are still unheld a moment later. The server revokes expired leases itself: this catches the slots a lease left
    behind when the server lost it (a restart with in-memory lease storage)."""
    with get_client(sync_client=True) as client:
        stale, live = _split_records(client, read_holders(client))
        first = orphaned_slots(_active_slots(client), [(h.limits, h.slots) for h in live])
        if first:
            time.sleep(CONFIRM_S)  # a lease taken or released just now may not be recorded yet
            _, live = _split_records(client, read_holders(client))
            again = orphaned_slots(_active_slots(client), [(h.limits, h.slots) for h in live])
            first = {name: min(count, again[name]) for name, count in first.items() if name in again}
        if not dry_run:
            for name, count in first.items():
                client.release_concurrency_slots([name], count, occupancy_seconds=1.0)
            for holder in stale:
                with contextlib.suppress(ObjectNotFound):  # its process removed it meanwhile
                    client.delete_variable_by_name(holder.variable)
    return first, [holder.variable for holder in stale]


@task
def prune_checkpoints(keep_last: int, dry_run: bool) -> tuple[dict[str, list[str]], int, list[str]]:
    """For each run directory whose flow run has ended: keep the newest `keep_last` checkpoints and the best."""
    runs_dir = get_settings().runs_dir
    directories = {_uuid(p.name): p for p in sorted(runs_dir.iterdir()) if p.is_dir()} if runs_dir.is_dir() else {}
    directories.pop(None, None)  # not a flow run's (e.g. "local", a run from a script): no state to go by
    ended = _ended(list(directories))
    pruned, freed, kept = {}, 0, []
    for run_id, directory in directories.items():
        if run_id not in ended:
            kept.append(directory.name)
            continue
        plan = plan_pruning(directory, keep_last)
        if plan.remove:
            pruned[directory.name] = [str(path.relative_to(directory)) for path in plan.remove]
            freed += plan.freed_bytes
            if not dry_run:
                prune(plan)
    return pruned, freed, kept


@task
def publish_summary(report: CleanupReport) -> None:
    verb = "would be" if report.dry_run else "were"
    lines = [f"# Cleanup{' (dry run: nothing changed)' if report.dry_run else ''}", ""]
    if report.automation_created:
        lines.append("- The zombie automation was missing and has been created.")
    lines.append(f"- Zombie runs that {verb} marked Crashed: {len(report.crashed) or 'none'}")
    lines += [f"  - {line}" for line in report.crashed]
    lines.append(f"- GPU slots no lease held, that {verb} released: {sum(report.released.values()) or 'none'}")
    lines += [f"  - `{name}`: {count}" for name, count in report.released.items()]
    lines.append(f"- Lease records of ended runs that {verb} removed: {len(report.records_removed) or 'none'}")
    lines.append(
        f"- Checkpoints that {verb} pruned: {sum(map(len, report.pruned.values())) or 'none'} in "
        f"{len(report.pruned)} run(s), {report.freed_bytes / 2**20:.1f} MiB"
    )
    lines += [f"  - `{run}`: {', '.join(files)}" for run, files in report.pruned.items()]
    lines.append(f"- Runs not ended, left alone: {len(report.kept_running)}")
    create_markdown_artifact("\n".join(lines), key="trainyard-cleanup", description="What the daily cleanup did")


@flow(name="cleanup")
def cleanup(
    keep_last: Annotated[int, Field(ge=1, le=100)] = 2,
    dry_run: bool = False,
    silent_after_minutes: Annotated[float, Field(gt=0)] = 60,
) -> CleanupReport:
    """Crash zombie runs, release GPU slots no lease holds, prune finished runs' checkpoints.

    Args:
        keep_last: Checkpoints kept per finished run besides the best one (the newest K).
        dry_run: Report what would be done, change nothing.
        silent_after_minutes: A Running flow run that never sent a heartbeat (not started by a worker) is a zombie
            when it has logged nothing for this long.
    """
    report = CleanupReport(dry_run=dry_run)
    report.automation_created = False if dry_run else ensure_zombie_detection()
    report.crashed = crash_zombie_runs(silent_after_minutes, dry_run)
    report.released, report.records_removed = release_stale_leases(dry_run)
    report.pruned, report.freed_bytes, report.kept_running = prune_checkpoints(keep_last, dry_run)
    publish_summary(report)
    get_run_logger().info("cleanup: %s", report)
    return report


# --- reading the server ----------------------------------------------------------------------------------------


def _ended(ids: list[str]) -> set[str]:
    """The flow runs among `ids` in a final state (Completed, Failed, Crashed, Cancelled)."""
    with get_client(sync_client=True) as client:
        runs = flow_runs_by_id(client, ids)
    return {run_id for run_id, run in runs.items() if run.state is not None and run.state.is_final()}


def _split_records(client, holders: list[Holder]) -> tuple[list[Holder], list[Holder]]:
    """(stale, live): a record is stale once its flow run has ended or is gone, and its process with it. A run
    declared Crashed whose process still runs keeps its GPU: the verdict may be wrong (infra/runs/fencing.py)."""
    runs = flow_runs_by_id(client, [h.flow_run_id for h in holders if h.flow_run_id])

    def ended(holder: Holder) -> bool:
        run = runs.get(holder.flow_run_id)
        if not (run is None or run.state is None or run.state.is_final()):
            return False
        why = holder_may_live(client, holder.host, holder.pid, holder.since, holder.flow_run_id)
        if why:
            get_run_logger().warning("kept the GPU lease of ended flow run %s: %s", holder.flow_run_id, why)
        return why is None

    stale = [h for h in holders if h.flow_run_id and ended(h)]
    return stale, [h for h in holders if h not in stale]


def _active_slots(client) -> dict[str, int]:
    limits = paged(lambda offset: client.read_global_concurrency_limits(limit=PAGE, offset=offset))
    return {limit.name: limit.active_slots for limit in limits if limit.name.startswith(PREFIX)}


def _last_heartbeat(client, run_id, since: datetime | None) -> datetime | None:
    heartbeats = EventFilter(
        occurred=EventOccurredFilter(since=since or datetime.now(UTC) - timedelta(days=7)),
        event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
        order=EventOrder.DESC,
    )
    events = client.read_events(filter=heartbeats, limit=1).events
    return events[0].occurred if events else None


def _uuid(name: str) -> str | None:
    try:
        return str(uuid.UUID(name))
    except ValueError:
        return None
