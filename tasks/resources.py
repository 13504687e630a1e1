"""What an attempt holds on its host while it trains and evaluates: a GPU lease and MLflow system metrics for those
GPUs."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
from prefect import get_run_logger
from prefect.runtime import flow_run

from infra.compute.allocation import Lease, Need, gpu_lease
from infra.compute.devices import local_device
from infra.compute.gpus import HostInventory, discover
from infra.compute.store import Store

SYSTEM_METRICS_EVERY_S = 5.0


def need_of(request, inventory: HostInventory) -> Need:
    """The request's resources; on a GPU host, a request that names no GPU but may use one gets one whole GPU."""
    compute = request.compute
    need = Need(compute.gpus, compute.gpu_memory_gb, compute.cpu_cores, compute.ram_gb, compute.disk_gb)
    if request.device == "cpu":
        return Need(0, 0, need.cpu_cores, need.ram_gb, need.disk_gb)
    if inventory.gpus and not need.wants_gpu:
        return Need(1, 0, need.cpu_cores, need.ram_gb, need.disk_gb)
    return need


@contextlib.contextmanager
def held_resources(request, output_dir: Path, run_id: str, request_id: str | None = None) -> Iterator[str]:
    """Lease the GPUs the request needs on this host (waiting in line while they are busy), show the training only
    those, record them on the MLflow run and in the attempts ledger, and sample them into the run; yields the torch
    device. Released on any exit."""
    logger = get_run_logger()
    inventory = visible_to_this_process(discover(output_dir))
    with gpu_lease(need_of(request, inventory), inventory, on_wait=logger.warning) as lease:
        device = device_of(lease, request.device)
        tags = {"host": inventory.hostname, "device": device}
        if lease is not None:
            tags["gpus"] = lease.describe()
            logger.info("GPUs leased after %.1f s: %s", lease.waited_s, lease.describe())
            Store.shared().record_gpus(request_id or str(flow_run.id), lease.describe())  # the train flow run's attempt
        mlflow.set_tags(tags)
        with _system_metrics(run_id, inventory.hostname, lease):
            yield device


def device_of(lease: Lease | None, preference: str) -> str:
    """The torch device of a lease. CUDA, once started in a process, keeps the devices it saw then (a training that
    ran earlier in this process), so the lease's GPU is found among those; otherwise the lease has just made
    CUDA_VISIBLE_DEVICES show exactly its GPUs, and the first is cuda:0."""
    if lease is not None and _cuda_started():
        return f"cuda:{_cuda_uuids().index(lease.gpus[0].uuid)}"
    return local_device(preference)


def visible_to_this_process(inventory: HostInventory) -> HostInventory:
    """The inventory's GPUs that this process can still use: all of them until CUDA starts here, then only those
    it started with."""
    if not _cuda_started():
        return inventory
    visible = set(_cuda_uuids())
    return dataclasses.replace(inventory, gpus=tuple(gpu for gpu in inventory.gpus if gpu.uuid in visible))


def _cuda_started() -> bool:
    torch = sys.modules.get("torch")  # not imported: CUDA cannot have started
    return torch is not None and torch.cuda.is_initialized()


def _cuda_uuids() -> list[str]:
    import torch

    return [f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def _system_metrics(run_id: str, host: str, lease: Lease | None) -> Iterator[None]:
    """MLflow's own system-metrics sampler on the run (CPU, RAM, disk, network, GPUs), under system/<host>/.

    MLflow's GPU monitor reads every GPU of the host: it is replaced by one that reads the leased GPUs only, named
    gpu_0, gpu_1... in the order the training sees them (cuda:0, cuda:1...)."""
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_EVERY_S, resume_logging=True, node_id=host)
    monitor.monitors = [m for m in monitor.monitors if not isinstance(m, GPUMonitor)]
    if lease is not None:
        try:
            monitor.monitors.append(_leased_gpu_monitor(GPUMonitor, lease))
        except RuntimeError as error:  # NVML gone: MLflow's own GPU monitor skips GPU metrics the same way
            get_run_logger().warning("no GPU metrics for %s: %s", lease.describe(), error)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def _leased_gpu_monitor(base: type, lease: Lease):
    import pynvml

    class LeasedGPUs(base):
        def __init__(self) -> None:
            super().__init__()  # RuntimeError without NVML
            try:
                self.gpu_handles = [pynvml.nvmlDeviceGetHandleByUUID(gpu.uuid) for gpu in lease.gpus]
            except pynvml.NVMLError as error:
                raise RuntimeError(f"NVML does not know the leased GPUs: {error}") from error

    return LeasedGPUs()
