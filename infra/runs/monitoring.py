"""What the monitor and cleanup flows decide, as plain functions: no Prefect, testable on tiny inputs.

- Alerts: which GPUs run hot, which pools serve deployments with no worker, which runs holding a GPU show no
  progress; and which of those were not already announced recently (the monitor runs every minute, a notification
  should not).
- Checkpoint retention for a finished run's directory, whichever trainer wrote it: Trainyard's manifest (torch), the
  Transformers `checkpoint-<step>/` directories (hf-image), Ultralytics' `weights/epoch<N>.pt` copies (yolo).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from trainers.checkpoints import MANIFEST, retained_files, write_atomic

GPU_HOT = "trainyard.gpu.hot"
POOL_NO_WORKER = "trainyard.pool.no-worker"
RUN_STUCK = "trainyard.run.stuck"
EVENTS = (GPU_HOT, POOL_NO_WORKER, RUN_STUCK)
FRESH_READING = timedelta(minutes=5)  # an older GPU reading is shown, never alerted on
NONE = "—"  # an empty table cell (the Prefect UI renders cells as Markdown: a lone "-" shows as a bullet)

_HF_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_YOLO_EPOCH = re.compile(r"^epoch(\d+)\.pt$")


@dataclass(frozen=True)
class Alert:
    """One event to emit: its name, the resource it is about, related resources and the payload."""

    event: str
    resource: dict[str, str]
    payload: dict
    related: list[dict[str, str]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return self.event, self.resource["prefect.resource.id"]


@dataclass(frozen=True)
class GpuRow:
    """One GPU as its host last published it, with its lease state on the Prefect server."""

    host: str
    index: int | None  # None: a limit on the server whose host never published an inventory
    name: str
    uuid: str
    utilization_pct: int | None = None
    memory_used_mb: int | None = None
    memory_total_mb: int | None = None
    temperature_c: int | None = None
    leased_gb: int = 0
    slots_gb: int = 0
    holders: tuple[str, ...] = ()  # who holds it, readable
    holder_runs: tuple[tuple[str, str], ...] = ()  # (flow run id, name) of each holder
    read_at: datetime | None = None

    def table_row(self, now: datetime) -> dict:
        memory = f"{_or(self.memory_used_mb)} / {_or(self.memory_total_mb)}" if self.memory_total_mb else NONE
        return {
            "host": self.host,
            "gpu": _or(self.index),
            "name": self.name,
            "holders": "; ".join(self.holders) or ("free" if self.slots_gb or self.index is not None else NONE),
            "utilization %": _or(self.utilization_pct),
            "memory used / total MiB": memory,
            "temperature °C": _or(self.temperature_c),
            "leased GiB": f"{self.leased_gb} / {self.slots_gb}" if self.slots_gb else NONE,
            "reading age s": round((now - self.read_at).total_seconds()) if self.read_at else NONE,
            "uuid": self.uuid,
        }


@dataclass(frozen=True)
class PoolRow:
    """A work pool and its workers' health."""

    id: str
    name: str
    type: str
    status: str | None
    paused: bool
    online_workers: int
    workers: int
    last_heartbeat: datetime | None
    deployments: tuple[str, ...]

    def table_row(self) -> dict:
        return {
            "pool": self.name,
            "type": self.type,
            "status": "PAUSED" if self.paused else (self.status or NONE),
            "online workers": f"{self.online_workers} / {self.workers}",
            "last heartbeat": self.last_heartbeat.isoformat(timespec="seconds") if self.last_heartbeat else "never",
            "deployments": len(self.deployments),
        }


@dataclass(frozen=True)
class QueuedRow:
    """A request waiting: a due flow run no worker has started, or a ticket in line for a compute profile."""

    kind: str  # "flow run" | "ticket"
    what: str
    where: str  # deployment or profile
    state: str
    since: datetime | None

    def table_row(self, now: datetime) -> dict:
        waited = round((now - self.since).total_seconds() / 60, 1) if self.since else NONE
        return {
            "kind": self.kind,
            "request": self.what,
            "where": self.where,
            "state": self.state,
            "waiting min": waited,
        }


@dataclass(frozen=True)
class StuckRun:
    """A running flow run that holds a GPU and has shown no progress for too long."""

    flow_run_id: str
    flow_run_name: str
    host: str
    gpus: tuple[str, ...]  # limit names
    mlflow_run_id: str | None
    last_progress: datetime
    minutes: float


def is_hot(temperature_c: int | None, read_at: datetime, threshold_c: float, now: datetime) -> bool:
    """A fresh reading at or above the threshold (a stale one may no longer be true)."""
    return temperature_c is not None and temperature_c >= threshold_c and now - read_at <= FRESH_READING


def lacks_worker(status: str | None, online_workers: int, paused: bool, deployments: int) -> bool:
    """A pool that deployments send runs to, not paused by someone on purpose, with no worker to take them."""
    return deployments > 0 and not paused and (online_workers == 0 or status == "NOT_READY")


def minutes_without_progress(signs_of_progress: Iterable[datetime | None], now: datetime) -> float:
    """Minutes since the newest sign of progress (a log line, a metric, the lease itself)."""
    newest = max(t for t in signs_of_progress if t is not None)
    return (now - newest).total_seconds() / 60


def not_announced(alerts: Iterable[Alert], announced: set[tuple[str, str]]) -> list[Alert]:
    """The alerts whose (event, resource) was not emitted within the reminder window."""
    return [alert for alert in alerts if alert.key not in announced]


def hot_gpu_alert(gpu: GpuRow, threshold_c: float) -> Alert:
    return Alert(
        GPU_HOT,
        {
            "prefect.resource.id": f"trainyard.gpu.{gpu.host}.{gpu.uuid}",
            "prefect.resource.name": f"{gpu.host} GPU {gpu.index} ({gpu.name})",
            "trainyard.host": gpu.host,
        },
        {
            "host": gpu.host,
            "index": gpu.index,
            "uuid": gpu.uuid,
            "name": gpu.name,
            "temperature_c": gpu.temperature_c,
            "threshold_c": threshold_c,
            "utilization_pct": gpu.utilization_pct,
            "holders": list(gpu.holders),
            "read_at": gpu.read_at.isoformat() if gpu.read_at else None,
        },
        [_flow_run(run_id, name, "holder") for run_id, name in gpu.holder_runs],
    )


def no_worker_alert(pool: PoolRow) -> Alert:
    return Alert(
        POOL_NO_WORKER,
        {"prefect.resource.id": f"prefect.work-pool.{pool.id}", "prefect.resource.name": pool.name},
        {
            "pool": pool.name,
            "type": pool.type,
            "status": pool.status,
            "online_workers": pool.online_workers,
            "workers": pool.workers,
            "last_heartbeat": pool.last_heartbeat.isoformat() if pool.last_heartbeat else None,
            "deployments": list(pool.deployments),
        },
    )


def stuck_alert(run: StuckRun, threshold_minutes: float) -> Alert:
    return Alert(
        RUN_STUCK,
        {"prefect.resource.id": f"prefect.flow-run.{run.flow_run_id}", "prefect.resource.name": run.flow_run_name},
        {
            "flow_run_id": run.flow_run_id,
            "flow_run_name": run.flow_run_name,
            "host": run.host,
            "gpus": list(run.gpus),
            "mlflow_run_id": run.mlflow_run_id,
            "last_progress": run.last_progress.isoformat(),
            "minutes_without_progress": round(run.minutes, 1),
            "threshold_minutes": threshold_minutes,
        },
        [{"prefect.resource.id": f"trainyard.gpu-limit.{name}", "prefect.resource.role": "gpu"} for name in run.gpus],
    )


def zombie_reason(
    entered_running: datetime,
    last_heartbeat: datetime | None,
    newest_log: datetime | None,
    now: datetime,
    heartbeat_window: timedelta,
    silent_window: timedelta,
) -> str | None:
    """Why a Running flow run is a zombie, or None. A run that sends heartbeats is judged by them, like the zombie
    automation; one that never sent any (started outside a worker) by its newest log line, over a longer window."""
    if last_heartbeat is not None:
        alive = max(last_heartbeat, entered_running)
        if now - alive > heartbeat_window:
            return f"no heartbeat for {(now - alive).total_seconds():.0f} s: its host or worker was lost"
        return None
    alive = max(entered_running, newest_log or entered_running)
    if now - alive > silent_window:
        minutes = (now - alive).total_seconds() / 60
        return f"Running with no heartbeat and no log for {minutes:.1f} min: its process is gone"
    return None


def orphaned_slots(active: dict[str, int], held: Iterable[tuple[tuple[str, ...], tuple[int, ...]]]) -> dict[str, int]:
    """Slots in use on each limit beyond what the recorded leases hold: left by a lease the server lost."""
    recorded: dict[str, int] = dict.fromkeys(active, 0)
    for limits, slots in held:
        for name, count in zip(limits, slots, strict=True):
            recorded[name] = recorded.get(name, 0) + count
    return {name: used - recorded[name] for name, used in active.items() if used > recorded[name]}


def _flow_run(run_id: str, name: str, role: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"prefect.flow-run.{run_id}",
        "prefect.resource.name": name,
        "prefect.resource.role": role,
    }


def _or(value: object) -> object:
    return NONE if value is None else value


# --- checkpoint retention --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrunePlan:
    """What retention removes from one run directory, and the manifest to write first (torch)."""

    run_dir: Path
    remove: tuple[Path, ...]
    manifest: dict | None = None  # the torch manifest without the removed entries

    @property
    def freed_bytes(self) -> int:
        return sum(_size(path) for path in self.remove)


def plan_pruning(run_dir: Path, keep_last: int) -> PrunePlan:
    """Keep the newest `keep_last` checkpoints and the best one, for each kind of checkpoint the directory holds."""
    run_dir = Path(run_dir)
    remove: list[Path] = []
    manifest = None
    if (run_dir / MANIFEST).is_file():
        manifest, removed = _torch(run_dir, keep_last)
        remove += removed
    remove += _hf(run_dir, keep_last)
    remove += _yolo(run_dir / "weights", keep_last)
    return PrunePlan(run_dir, tuple(remove), manifest)


def prune(plan: PrunePlan) -> None:
    """Apply a plan. The manifest is replaced first: a crash half-way leaves no manifest entry without its file."""
    if plan.manifest is not None and plan.remove:
        text = json.dumps(plan.manifest, indent=1).encode()
        write_atomic(plan.run_dir / MANIFEST, lambda handle: handle.write(text))
    for path in plan.remove:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _torch(run_dir: Path, keep_last: int) -> tuple[dict, list[Path]]:
    manifest = json.loads((run_dir / MANIFEST).read_text())
    entries = manifest["checkpoints"]
    keep = retained_files(manifest, keep_last)
    kept = [e for e in entries if e["file"] in keep]
    removed = [run_dir / e["file"] for e in entries if e["file"] not in keep]
    return {**manifest, "checkpoints": kept}, removed


def _hf(run_dir: Path, keep_last: int) -> list[Path]:
    found = sorted(
        (int(m.group(1)), p) for p in _children(run_dir) if p.is_dir() and (m := _HF_CHECKPOINT.match(p.name))
    )
    if not found:
        return []
    keep = {path for _, path in found[-keep_last:]}
    best = _hf_best(found[-1][1])
    return [path for _, path in found if path not in keep and path.name != best]


def _hf_best(newest: Path) -> str | None:
    """The checkpoint Transformers chose as best, as the newest checkpoint's trainer_state.json records it."""
    try:
        best = json.loads((newest / "trainer_state.json").read_text()).get("best_model_checkpoint")
    except (FileNotFoundError, ValueError):
        return None
    return Path(best).name if best else None


def _yolo(weights: Path, keep_last: int) -> list[Path]:
    found = sorted((int(m.group(1)), p) for p in _children(weights) if (m := _YOLO_EPOCH.match(p.name)))
    return [path for _, path in found[:-keep_last]]


def _children(directory: Path) -> list[Path]:
    return list(directory.iterdir()) if directory.is_dir() else []


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0
