"""The monitor flow, every minute: publish this host -> read GPUs and their holders, pools, queued requests ->
find stuck runs -> table artifacts -> events for what needs a person.

Artifacts (keys): `trainyard-monitor` (every known host's GPUs: holder, utilization, memory, temperature),
`trainyard-monitor-pools` (work pools and their workers), `trainyard-monitor-queue` (requests waiting).
Events: `trainyard.gpu.hot`, `trainyard.pool.no-worker`, `trainyard.run.stuck` (payloads in infra/runs/monitoring.py),
each once per `remind_after_minutes` while it lasts; automations turn them into notifications (docs/monitoring.md).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType, WorkerStatus
from prefect.client.schemas.sorting import LogSort
from prefect.events import emit_event
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from pydantic import Field

from infra.compute.allocation import (
    PREFIX,
    WAITER_ALIVE_S,
    Holder,
    limit_name,
    publish_inventory,
    read_holders,
    read_inventories,
)
from infra.compute.gpus import discover
from infra.compute.store import Store
from infra.runs.monitoring import (
    EVENTS,
    NONE,
    Alert,
    GpuRow,
    PoolRow,
    QueuedRow,
    StuckRun,
    hot_gpu_alert,
    is_hot,
    lacks_worker,
    minutes_without_progress,
    no_worker_alert,
    not_announced,
    stuck_alert,
)
from infra.settings import get_settings

TRAINING_FLOWS = ["train", "train-step"]
PAGE = 200


@dataclass(frozen=True)
class HeldBy:
    """A lease record whose flow run is still active, with that run's state."""

    holder: Holder
    state: str  # the flow run's state type, or "" for a lease taken outside any flow run


@dataclass(frozen=True)
class MonitorReport:
    gpus: list[GpuRow]
    pools: list[PoolRow]
    queued: list[QueuedRow]
    stuck: list[StuckRun]
    emitted: list[str]  # "<event> <resource id>"


@task
def publish_this_host() -> None:
    """This host's inventory and GPU readings, for this and every later monitor run."""
    publish_inventory(discover(get_settings().runs_dir))


@task
def observe_gpus() -> tuple[list[GpuRow], list[HeldBy]]:
    """Every GPU known from published inventories and the GPU limits on the server, with who holds it."""
    with get_client(sync_client=True) as client:
        limits = {limit.name: limit for limit in _gpu_limits(client)}
        held = _active_holders(client, read_holders(client), limits)
        inventories = read_inventories(client)
    by_limit: dict[str, list[HeldBy]] = defaultdict(list)
    for entry in held:
        for name in entry.holder.limits:
            by_limit[name].append(entry)
    rows, seen = [], set()
    for inventory, read_at in sorted(inventories, key=lambda pair: pair[0].hostname):
        if not inventory.gpus:
            rows.append(
                GpuRow(inventory.hostname, None, f"no GPU ({inventory.note or 'CPU only'})", NONE, read_at=read_at)
            )
        for gpu in inventory.gpus:
            name = limit_name(inventory.hostname, gpu)
            seen.add(name)
            limit, holders = limits.get(name), by_limit.get(name, [])
            rows.append(
                GpuRow(
                    inventory.hostname,
                    gpu.index,
                    gpu.name,
                    gpu.uuid,
                    gpu.utilization_pct,
                    gpu.memory_used_mb,
                    gpu.memory_total_mb,
                    gpu.temperature_c,
                    limit.active_slots if limit else 0,
                    limit.limit if limit else 0,
                    tuple(_describe(entry.holder, name) for entry in holders),
                    tuple((e.holder.flow_run_id, e.holder.flow_run_name) for e in holders if e.holder.flow_run_id),
                    read_at,
                )
            )
    for name, limit in sorted(limits.items()):  # a host that leased GPUs before it ever published an inventory
        if name not in seen:
            holders = by_limit.get(name, [])
            host = holders[0].holder.host if holders else "?"
            rows.append(
                GpuRow(
                    host,
                    None,
                    name,
                    name.removeprefix(PREFIX),
                    leased_gb=limit.active_slots,
                    slots_gb=limit.limit,
                    holders=tuple(_describe(entry.holder, name) for entry in holders),
                )
            )
    return rows, held


@task
def observe_pools() -> list[PoolRow]:
    """Each work pool: its type, status, workers (online / all), latest worker heartbeat and deployments."""
    with get_client(sync_client=True) as client:
        deployments: dict[str, list[str]] = defaultdict(list)
        for deployment in paged(lambda offset: client.read_deployments(limit=PAGE, offset=offset)):
            if deployment.work_pool_name:
                deployments[deployment.work_pool_name].append(deployment.name)
        rows = []
        for pool in client.read_work_pools(limit=PAGE, offset=0):
            workers = client.read_workers_for_work_pool(pool.name, limit=PAGE, offset=0)
            beats = [w.last_heartbeat_time for w in workers if w.last_heartbeat_time]
            rows.append(
                PoolRow(
                    str(pool.id),
                    pool.name,
                    pool.type,
                    pool.status.value if pool.status else None,
                    pool.is_paused,
                    sum(1 for w in workers if w.status == WorkerStatus.ONLINE),
                    len(workers),
                    max(beats, default=None),
                    tuple(sorted(deployments.get(pool.name, []))),
                )
            )
    return sorted(rows, key=lambda row: row.name)


@task
def observe_queue() -> list[QueuedRow]:
    """Training flow runs that are due but not started (no worker, no free slot), tickets waiting in line for a
    profile, and trainings waiting in line for a host's GPUs."""
    now = datetime.now(UTC)
    due = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING])),
        expected_start_time=FlowRunFilterExpectedStartTime(before_=now),
    )
    training = FlowFilter(name=FlowFilterName(any_=TRAINING_FLOWS))
    with get_client(sync_client=True) as client:
        runs = paged(lambda o: client.read_flow_runs(flow_filter=training, flow_run_filter=due, limit=PAGE, offset=o))
        deployments = {d.id: d.name for d in paged(lambda o: client.read_deployments(limit=PAGE, offset=o))}
    rows = [
        QueuedRow(
            "flow run",
            f"{run.name} ({run.id})",
            deployments.get(run.deployment_id, NONE) if run.deployment_id else NONE,
            run.state.name if run.state else NONE,
            run.expected_start_time,
        )
        for run in runs
    ]
    store = Store.shared()
    for profile in store.profiles():
        for ticket in store.open_tickets(profile.name):
            since = ticket.started_at.replace(tzinfo=ticket.started_at.tzinfo or UTC)  # SQLite keeps no zone
            rows.append(QueuedRow("ticket", f"request {ticket.request_id}", profile.name, "queued", since))
    positions: dict[str, int] = {}
    for waiter in store.gpu_line(alive_within_s=WAITER_ALIVE_S):  # first come first, as they are served
        positions[waiter.host] = positions.get(waiter.host, 0) + 1
        since = waiter.joined_at.replace(tzinfo=waiter.joined_at.tzinfo or UTC)
        place = f"position {positions[waiter.host]}"
        rows.append(QueuedRow("GPU wait", f"{waiter.holder}: {waiter.need}", f"GPUs of {waiter.host}", place, since))
    return rows


@task
def find_stuck_runs(held: list[HeldBy], after_minutes: float) -> list[StuckRun]:
    """Running flow runs holding a GPU whose newest log line, MLflow metric and lease are all older than M minutes."""
    now = datetime.now(UTC)
    stuck = []
    with get_client(sync_client=True) as client:
        for entry in held:
            holder = entry.holder
            if entry.state != StateType.RUNNING.value:
                continue
            signs = [holder.since, newest_log(client, holder.flow_run_id), _newest_metric(holder.mlflow_run_id)]
            minutes = minutes_without_progress(signs, now)
            if minutes >= after_minutes:
                last = max(t for t in signs if t is not None)
                stuck.append(
                    StuckRun(
                        holder.flow_run_id,
                        holder.flow_run_name or holder.flow_run_id,
                        holder.host,
                        holder.limits,
                        holder.mlflow_run_id,
                        last,
                        minutes,
                    )
                )
    return stuck


@task
def publish_tables(gpus: list[GpuRow], pools: list[PoolRow], queued: list[QueuedRow]) -> None:
    now = datetime.now(UTC)
    create_table_artifact(
        [gpu.table_row(now) for gpu in gpus],
        key="trainyard-monitor",
        description=f"GPUs of every known host, who holds each, utilization, memory ({now:%Y-%m-%d %H:%M:%S} UTC)",
    )
    create_table_artifact(
        [pool.table_row() for pool in pools],
        key="trainyard-monitor-pools",
        description="Work pools and their workers' health",
    )
    create_table_artifact(
        [row.table_row(now) for row in queued]
        or [{"kind": NONE, "request": "nothing waiting", "where": NONE, "state": NONE, "waiting min": NONE}],
        key="trainyard-monitor-queue",
        description="Requests waiting: due training runs not started, tickets in line for a compute profile",
    )


@task
def emit_alerts(alerts: list[Alert], remind_after_minutes: float) -> list[str]:
    """Emit each alert unless the same event for the same resource was emitted within the reminder window."""
    if not alerts:
        return []
    since = datetime.now(UTC) - timedelta(minutes=remind_after_minutes)
    wanted = EventFilter(
        occurred=EventOccurredFilter(since=since),
        event=EventNameFilter(name=list(EVENTS)),
        resource=EventResourceFilter(id=sorted({a.resource["prefect.resource.id"] for a in alerts})),
    )
    announced = set()
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=wanted, limit=50)  # the most the server returns at once
        while True:
            announced.update((event.event, event.resource.id) for event in page.events)
            if not page.next_page:
                break
            page = client.read_events_page(page.next_page)
    emitted = []
    for alert in not_announced(alerts, announced):
        emit_event(alert.event, resource=alert.resource, related=alert.related, payload=alert.payload)
        emitted.append(f"{alert.event} {alert.resource['prefect.resource.id']}")
    return emitted


@flow(name="monitor")
def monitor(
    hot_celsius: Annotated[int, Field(ge=30, le=120)] = 85,
    stuck_after_minutes: Annotated[float, Field(gt=0)] = 15,
    remind_after_minutes: Annotated[float, Field(ge=0)] = 60,
) -> MonitorReport:
    """GPUs, pools and queued requests as table artifacts; events for hot GPUs, pools without a worker, stuck runs.

    Args:
        hot_celsius: A GPU at or above this temperature is hot (trainyard.gpu.hot).
        stuck_after_minutes: A running training that holds a GPU and has logged nothing, and written no MLflow
            metric, for this long is stuck (trainyard.run.stuck).
        remind_after_minutes: An alert that lasts is emitted again after this long (0: every run).
    """
    publish_this_host()
    gpus, held = observe_gpus()
    pools = observe_pools()
    queued = observe_queue()
    stuck = find_stuck_runs(held, stuck_after_minutes)
    publish_tables(gpus, pools, queued)

    now = datetime.now(UTC)
    alerts = [
        hot_gpu_alert(g, hot_celsius)
        for g in gpus
        if g.read_at and is_hot(g.temperature_c, g.read_at, hot_celsius, now)
    ]
    alerts += [
        no_worker_alert(p) for p in pools if lacks_worker(p.status, p.online_workers, p.paused, len(p.deployments))
    ]
    alerts += [stuck_alert(run, stuck_after_minutes) for run in stuck]
    emitted = emit_alerts(alerts, remind_after_minutes)
    return MonitorReport(gpus, pools, queued, stuck, emitted)


# --- reading the server (cleanup reads it the same way) ----------------------------------------------------------


def paged(read) -> list:
    """Every item of a paged read, `read(offset)` returning at most PAGE items."""
    found, offset = [], 0
    while True:
        page = read(offset)
        found += page
        if len(page) < PAGE:
            return found
        offset += PAGE


def flow_runs_by_id(client, ids: list[str]) -> dict[str, object]:
    runs = {}
    for start in range(0, len(ids), PAGE):
        chunk = FlowRunFilter(id=FlowRunFilterId(any_=ids[start : start + PAGE]))
        runs.update({str(run.id): run for run in client.read_flow_runs(flow_run_filter=chunk, limit=PAGE)})
    return runs


def newest_log(client, flow_run_id) -> datetime | None:
    if not flow_run_id:
        return None
    logs = client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=1, sort=LogSort.TIMESTAMP_DESC
    )
    return logs[0].timestamp if logs else None


def _gpu_limits(client) -> list:
    limits = paged(lambda offset: client.read_global_concurrency_limits(limit=PAGE, offset=offset))
    return [limit for limit in limits if limit.name.startswith(PREFIX)]


def _active_holders(client, holders: list[Holder], limits: dict) -> list[HeldBy]:
    """The lease records that still stand: their GPUs have slots in use and their flow run has not ended."""
    holders = [h for h in holders if any(limits.get(n) is not None and limits[n].active_slots for n in h.limits)]
    runs = flow_runs_by_id(client, [h.flow_run_id for h in holders if h.flow_run_id])
    held = []
    for holder in holders:
        run = runs.get(holder.flow_run_id) if holder.flow_run_id else None
        if holder.flow_run_id and (run is None or run.state is None or run.state.is_final()):
            continue  # a record its process could not delete (killed): cleanup removes it
        held.append(HeldBy(holder, run.state.type.value if run else ""))
    return held


def _describe(holder: Holder, limit: str) -> str:
    """'brave-lion (flow run <id>, MLflow run <id>, 8 GiB)': who holds how much of this GPU."""
    details = [f"flow run {holder.flow_run_id}"] if holder.flow_run_id else [f"pid {holder.pid}"]
    if holder.mlflow_run_id:
        details.append(f"MLflow run {holder.mlflow_run_id}")
    details.append(f"{dict(zip(holder.limits, holder.slots, strict=True)).get(limit, 0)} GiB")
    return f"{holder.flow_run_name or holder.host} ({', '.join(details)})"


def _newest_metric(mlflow_run_id: str | None) -> datetime | None:
    """When the training last logged a metric of its own (MLflow's system metrics go on while a run hangs)."""
    if not mlflow_run_id:
        return None
    from mlflow import MlflowClient

    try:
        client = MlflowClient()
        keys = [k for k in client.get_run(mlflow_run_id).data.metrics if not k.startswith("system/")]
        stamps = [m.timestamp for key in keys for m in client.get_metric_history(mlflow_run_id, key)]
    except Exception:  # MLflow unreachable or the run deleted: the logs decide
        return None
    return datetime.fromtimestamp(max(stamps) / 1000, UTC) if stamps else None
