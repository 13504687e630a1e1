"""GPU leases: this host's GPUs allocated to trainings without conflicts, across processes, workers and hosts.

Each GPU is a strict Prefect global concurrency limit, `trainyard-gpu-<host>-<uuid>`, with one slot per GiB of its
memory. A training that needs whole GPUs takes every slot of each; one that may share a GPU takes as many slots as
GiB it needs, so several small jobs pack onto one GPU (best fit). The slots are held as a Prefect lease that is
renewed while training runs and released when it ends, fails or is cancelled. A process killed with kill -9 stops
renewing: the server revokes its lease when it expires (LEASE_S, then the repossessor's next pass, 15 s).

A request that can never fit this host (more GPUs, GPU memory, RAM or cores than it has) fails at once; one that
fits later waits in line, first come first served, its position in its log; one that needs more free disk than
there is is refused. The line is kept in the platform store (infra/compute/store.py), shared by the hosts that share it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, VariableCreate, VariableUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from infra.compute.gpus import GPU, HostInventory

LEASE_S = 60  # the shortest lease Prefect accepts
POLL_S = 0.5  # how often a waiting request looks again
PREFIX = "trainyard-gpu-"
WAITER_ALIVE_S = 10.0  # a GPU waiter not seen for this long (killed while waiting) has left the line

log = logging.getLogger(__name__)


class AllocationError(RuntimeError):
    """The request can never be satisfied on this host, or the host lacks the free disk it needs."""


class AllocationTimeout(TimeoutError):
    """No GPU became free within the request's wait limit."""


@dataclass(frozen=True)
class Need:
    """What one training asks of its host."""

    gpus: int = 0  # whole GPUs, each its own
    gpu_memory_gb: float = 0  # per GPU; with gpus == 0: a share of one GPU this large
    cpu_cores: int = 1
    ram_gb: float = 0
    disk_gb: float = 0  # free disk where the run writes

    @property
    def wants_gpu(self) -> bool:
        return self.gpus > 0 or self.gpu_memory_gb > 0

    def describe(self) -> str:
        if self.gpus:
            memory = f" with {self.gpu_memory_gb:g} GiB each" if self.gpu_memory_gb else ""
            return f"{self.gpus} whole GPU(s){memory}"
        return f"a {self.gpu_memory_gb:g} GiB share of a GPU" if self.gpu_memory_gb else "no GPU"


@dataclass(frozen=True)
class Lease:
    """GPUs held for one training, and the CUDA_VISIBLE_DEVICES value that shows it exactly those."""

    host: str
    gpus: tuple[GPU, ...]
    slots: tuple[int, ...]
    waited_s: float

    @property
    def visible_devices(self) -> str:
        return ",".join(gpu.uuid for gpu in self.gpus)

    def describe(self) -> str:
        return ", ".join(f"{self.host}:{gpu.index} ({gpu.name}, {gpu.uuid})" for gpu in self.gpus)


def limit_name(host: str, gpu: GPU) -> str:
    return f"{PREFIX}{host}-{gpu.uuid.removeprefix('GPU-')}"


def slots_of(gpu: GPU) -> int:
    return max(1, gpu.memory_total_mb // 1024)


def check_fits(inventory: HostInventory, need: Need) -> None:
    """Refuse at once what this host can never run, or lacks the disk for, naming the resource and the fix."""
    host, gpus = inventory.hostname, inventory.gpus
    largest = max((gpu.memory_total_mb / 1024 for gpu in gpus), default=0.0)
    problems = []
    if need.gpus > len(gpus):
        problems.append(f"{need.gpus} GPU(s) requested, {host} has {len(gpus)}")
    if need.wants_gpu and need.gpu_memory_gb > largest and gpus:
        problems.append(f"{need.gpu_memory_gb:g} GiB of GPU memory requested, {host}'s largest GPU has {largest:.0f}")
    if need.gpu_memory_gb and not gpus:
        problems.append(f"GPU memory requested, {host} has no GPU")
    if need.cpu_cores > inventory.cpu_cores:
        problems.append(f"{need.cpu_cores} CPU cores requested, {host} has {inventory.cpu_cores}")
    if need.ram_gb > inventory.ram_total_gb:
        problems.append(f"{need.ram_gb:g} GiB of RAM requested, {host} has {inventory.ram_total_gb:.1f}")
    if problems:
        raise AllocationError(
            f"this training can never run on {host}: {'; '.join(problems)}. "
            "Lower compute.gpus / gpu_memory_gb / cpu_cores / ram_gb, or choose a compute profile that has them."
        )
    if need.disk_gb > inventory.disk_free_gb:
        raise AllocationError(
            f"not enough free disk on {host}: the training declares compute.disk_gb={need.disk_gb:g} GiB and "
            f"{inventory.disk_free_gb:.1f} GiB are free where runs are written. Free some space (old runs, "
            "checkpoints) or lower compute.disk_gb."
        )


def choose(gpus: tuple[GPU, ...], need: Need, free: dict[str, int], host: str) -> list[tuple[GPU, int]] | None:
    """Which GPUs, and how many slots of each, for `need` given the free slots now; None when nothing fits now."""
    if need.gpus:
        whole = [
            gpu
            for gpu in gpus
            if free.get(limit_name(host, gpu), 0) == slots_of(gpu) and gpu.memory_total_mb / 1024 >= need.gpu_memory_gb
        ]
        return [(gpu, slots_of(gpu)) for gpu in whole[: need.gpus]] if len(whole) >= need.gpus else None
    occupy = max(1, math.ceil(need.gpu_memory_gb))
    fitting = [gpu for gpu in gpus if free.get(limit_name(host, gpu), 0) >= occupy]
    if not fitting:
        return None
    best = min(fitting, key=lambda gpu: (free[limit_name(host, gpu)], gpu.index))  # best fit: pack small jobs
    return [(best, occupy)]


def ensure_limits(host: str, gpus: tuple[GPU, ...]) -> None:
    with get_client(sync_client=True) as client:
        for gpu in gpus:
            name = limit_name(host, gpu)
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with contextlib.suppress(Exception):  # another process created it first
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots_of(gpu)))


def free_slots(host: str, gpus: tuple[GPU, ...]) -> dict[str, int]:
    names = {limit_name(host, gpu) for gpu in gpus}
    with get_client(sync_client=True) as client:
        limits = client.read_global_concurrency_limits(limit=200, offset=0)
    return {limit.name: limit.limit - limit.active_slots for limit in limits if limit.name in names}


def _acquire(host: str, picked: list[tuple[GPU, int]]) -> contextlib.ExitStack | None:
    """Hold every picked GPU's slots, or none of them (another request won a race: look again)."""
    stack = contextlib.ExitStack()
    try:
        for gpu, occupy in sorted(picked, key=lambda pick: pick[0].index):
            slot = concurrency(
                limit_name(host, gpu),
                occupy,
                timeout_seconds=30,
                max_retries=0,
                lease_duration=LEASE_S,
                strict=True,
                holder=_prefect_holder(),
            )
            stack.enter_context(slot)
    except ConcurrencySlotAcquisitionError as error:
        stack.close()
        if "423" not in str(error):  # 423 Locked: taken meanwhile; anything else is a real error
            raise
        return None
    except BaseException:
        stack.close()
        raise
    return stack


class _WaitingLine:
    """The requests waiting for this host's GPUs, in the platform store: first come, first served. Only the first
    in line tries to take GPUs, so a request that waits longer is never overtaken by one that came later. A waiter
    refreshes its place every REFRESH_S; one killed while waiting drops out after WAITER_ALIVE_S."""

    REFRESH_S = 2.0

    def __init__(self, host: str, need: str) -> None:
        from infra.compute.store import Store

        self.host, self.need, self.store = host, need, Store.shared()

    def __enter__(self) -> _WaitingLine:
        from prefect.runtime import flow_run

        holder = f"flow run {flow_run.name} ({flow_run.id}), pid {os.getpid()}" if flow_run.id else f"pid {os.getpid()}"
        self.me = self.store.join_gpu_line(self.host, self.need, holder)
        self.refreshed = time.monotonic()
        return self

    def ahead(self) -> int:
        """How many live waiters came before this one."""
        if time.monotonic() - self.refreshed > self.REFRESH_S:
            self.store.still_waiting(self.me.id)
            self.refreshed = time.monotonic()
        return sum(1 for waiter in self.store.gpu_line(self.host, WAITER_ALIVE_S) if waiter.id < self.me.id)

    def __exit__(self, *exc) -> None:
        self.store.leave_gpu_line(self.me.id)


@contextlib.contextmanager
def gpu_lease(
    need: Need,
    inventory: HostInventory,
    *,
    timeout_s: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    set_visible: bool = True,
) -> Iterator[Lease | None]:
    """Hold GPUs for `need` on this host while the block runs (None for a CPU-only need). Sets CUDA_VISIBLE_DEVICES
    to exactly the leased GPUs (before CUDA starts in this process, so the training sees only those)."""
    check_fits(inventory, need)
    if not need.wants_gpu:
        yield None
        return
    host, gpus = inventory.hostname, inventory.gpus
    ensure_limits(host, gpus)
    publish_inventory(inventory)
    started, said = time.monotonic(), None
    with _WaitingLine(host, need.describe()) as line:
        while True:
            ahead = line.ahead()
            picked = choose(gpus, need, free_slots(host, gpus), host) if not ahead else None
            held = _acquire(host, picked) if picked else None
            if held is not None:
                break
            busy = (
                f"waiting for {need.describe()}: position {ahead + 1} in line for the GPUs of {host}"
                if ahead
                else f"waiting for {need.describe()}: next in line; every GPU of {host} that could hold it is in use"
            )
            if on_wait and busy != said:
                on_wait(busy)
                said = busy
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise AllocationTimeout(f"no GPU free on {host} within {timeout_s:g} s for {need.describe()}")
            time.sleep(POLL_S)
    lease = Lease(host, tuple(g for g, _ in picked), tuple(s for _, s in picked), time.monotonic() - started)
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    record = None
    try:
        with held:
            record = publish_holder(lease)
            if set_visible:
                os.environ["CUDA_VISIBLE_DEVICES"] = lease.visible_devices
            try:
                yield lease
            finally:
                if set_visible:
                    if previous is None:
                        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                    else:
                        os.environ["CUDA_VISIBLE_DEVICES"] = previous
    finally:
        forget_holder(record)  # after the slots are released: the next waiter does not wait for this call


# --- Who holds each GPU, and what each host has (read by flows/monitor.py and flows/cleanup.py) ---------------------
# Prefect keeps a lease's holder on the server, but its API shows holders only for tag-based limits. So each lease
# is also recorded as a Prefect Variable `trainyard-lease-<id>` (deleted when the lease ends; a killed process leaves
# one behind, which cleanup removes), and each GPU host's inventory as `trainyard-host-<host>`. Best effort: failing
# to record never stops a training.
HOLDER_PREFIX = "trainyard-lease-"
HOST_PREFIX = "trainyard-host-"
_VARIABLE_MAX = 5000  # Prefect's limit on a variable's JSON value


@dataclass(frozen=True)
class Holder:
    """One lease as recorded: the GPUs' limits and slots, and who holds them."""

    variable: str
    host: str
    limits: tuple[str, ...]
    slots: tuple[int, ...]
    flow_run_id: str | None
    flow_run_name: str | None
    mlflow_run_id: str | None
    pid: int
    since: datetime

    @classmethod
    def from_variable(cls, name: str, value: dict) -> Holder:
        since = datetime.fromisoformat(value["since"])
        fields = {k: value.get(k) for k in ("host", "flow_run_id", "flow_run_name", "mlflow_run_id", "pid")}
        return cls(name, limits=tuple(value["limits"]), slots=tuple(value["slots"]), since=since, **fields)


def _prefect_holder() -> ConcurrencyLeaseHolder | None:
    from prefect.runtime import flow_run

    return ConcurrencyLeaseHolder(type="flow_run", id=flow_run.id) if flow_run.id else None


def _variable_name(prefix: str, text: str) -> str:
    return prefix + re.sub(r"[^a-z0-9_-]", "-", text.lower())


def _set_variable(name: str, value: object, tags: list[str], replace: bool = False) -> bool:
    try:
        with get_client(sync_client=True) as client:
            try:
                client.create_variable(VariableCreate(name=name, value=value, tags=tags))
            except ObjectAlreadyExists:
                if not replace:
                    raise
                client.update_variable(VariableUpdate(name=name, value=value, tags=tags))
        return True
    except Exception as error:  # the record is for monitoring: never fail a training over it
        log.warning("could not record %s on the Prefect server: %r", name, error)
        return False


def publish_holder(lease: Lease) -> str | None:
    """Record who holds `lease` (this flow run, its MLflow run, this process); the variable's name, or None."""
    from prefect.runtime import flow_run

    mlflow = sys.modules.get("mlflow")  # the training's MLflow run is active in this thread when there is one
    active = mlflow.active_run() if mlflow is not None else None
    name = f"{HOLDER_PREFIX}{uuid.uuid4().hex}"
    value = {
        "host": lease.host,
        "limits": [limit_name(lease.host, gpu) for gpu in lease.gpus],
        "slots": list(lease.slots),
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "flow_run_name": flow_run.name if flow_run.id else None,
        "mlflow_run_id": active.info.run_id if active is not None else None,
        "pid": os.getpid(),
        "since": datetime.now(UTC).isoformat(),
    }
    return name if _set_variable(name, value, ["trainyard-lease"]) else None


def forget_holder(name: str | None) -> None:
    if name is None:
        return
    try:
        with get_client(sync_client=True) as client:
            client.delete_variable_by_name(name)
    except Exception as error:  # left behind: cleanup removes records whose lease is gone
        log.warning("could not delete %s: %s", name, error)


def publish_inventory(inventory: HostInventory) -> bool:
    """Record this host's inventory (GPU readings included) for the monitor; True when recorded."""
    value = {"published_at": datetime.now(UTC).isoformat(), "inventory": json.loads(inventory.to_json())}
    if len(json.dumps(value)) > _VARIABLE_MAX:  # many processes on many GPUs: their PIDs are what can go
        for gpu in value["inventory"]["gpus"]:
            gpu["processes"] = []
    return _set_variable(_variable_name(HOST_PREFIX, inventory.hostname), value, ["trainyard-host"], replace=True)


def _read_variables(client, prefix: str) -> list:
    from prefect.client.schemas.objects import Variable

    found, offset = [], 0
    while True:
        body = {"variables": {"name": {"like_": prefix}}, "limit": 200, "offset": offset}
        page = Variable.model_validate_list(client.request("POST", "/variables/filter", json=body).json())
        found += [variable for variable in page if variable.name.startswith(prefix)]
        if len(page) < 200:
            return found
        offset += 200


def read_holders(client) -> list[Holder]:
    """Every lease record on the server, live or left behind by a killed process."""
    return [Holder.from_variable(v.name, v.value) for v in _read_variables(client, HOLDER_PREFIX)]


def read_inventories(client) -> list[tuple[HostInventory, datetime]]:
    """Every published host inventory, with when it was published."""
    return [
        (HostInventory.from_json(json.dumps(v.value["inventory"])), datetime.fromisoformat(v.value["published_at"]))
        for v in _read_variables(client, HOST_PREFIX)
    ]
