"""What a training holds on its host while it runs: a GPU lease and MLflow system metrics for those GPUs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import mlflow
from prefect import get_run_logger
from prefect.runtime import flow_run

from infra.allocation import Lease, Need, gpu_lease
from infra.compute import local_device
from infra.gpus import HostInventory, discover
from infra.store import Store

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
    inventory = discover(output_dir)
    with gpu_lease(need_of(request, inventory), inventory, on_wait=logger.warning) as lease:
        device = local_device(request.device)  # after the lease: CUDA starts with only the leased GPUs visible
        tags = {"host": inventory.hostname, "device": device}
        if lease is not None:
            tags["gpus"] = lease.describe()
            logger.info("GPUs leased after %.1f s: %s", lease.waited_s, lease.describe())
            Store.shared().record_gpus(request_id or str(flow_run.id), lease.describe())  # the train flow run's attempt
        mlflow.set_tags(tags)
        with _system_metrics(run_id, inventory.hostname, lease):
            yield device


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
        monitor.monitors.append(_leased_gpu_monitor(GPUMonitor, lease))
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def _leased_gpu_monitor(base: type, lease: Lease):
    import pynvml

    class LeasedGPUs(base):
        def __init__(self) -> None:
            super().__init__()
            self.gpu_handles = [pynvml.nvmlDeviceGetHandleByUUID(gpu.uuid) for gpu in lease.gpus]

    return LeasedGPUs()
