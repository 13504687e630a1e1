"""What this host has to train with: GPUs (through NVML), CPU cores, RAM and free disk.

A host without an NVIDIA GPU or driver is a normal case, not an error: ``discover`` then returns no GPUs and a
short ``note`` saying why, logs at most one debug line and raises nothing.

    python -m infra.compute.gpus [--json] [--path P]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import pynvml

log = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2
T = TypeVar("T")


@dataclass(frozen=True)
class GPU:
    """One NVIDIA GPU as NVML sees it; optional readings are None where the GPU does not report them."""

    index: int
    uuid: str
    name: str
    memory_total_mb: int
    memory_used_mb: int
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    processes: tuple[int, ...]  # PIDs using it (compute and graphics)


@dataclass(frozen=True)
class HostInventory:
    """CPU, RAM (GiB), free disk (GiB, at the path asked about) and GPUs of this host."""

    hostname: str
    cpu_cores: int  # logical
    cpu_physical_cores: int | None
    ram_total_gb: float
    ram_available_gb: float
    disk_free_gb: float
    gpus: tuple[GPU, ...]
    driver: str | None
    note: str  # why there are no GPUs (or which could not be read); empty when all is well

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HostInventory:
        """An inventory written by to_json: another host's, or one supplied where this machine has no GPU."""
        data = json.loads(text)
        data["gpus"] = tuple(GPU(**{**gpu, "processes": tuple(gpu["processes"])}) for gpu in data["gpus"])
        return cls(**data)


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py returns bytes, newer returns str.
    return value.decode() if isinstance(value, bytes) else value


def _optional(read: Callable[[], T]) -> T | None:
    """A reading some GPUs do not support (NotSupported, NoPermission...): None rather than a failed discovery."""
    try:
        return read()
    except pynvml.NVMLError:
        return None


def _processes(handle: object) -> tuple[int, ...]:
    pids: set[int] = set()
    for reader in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
        for proc in _optional(lambda reader=reader: reader(handle)) or ():
            pids.add(int(proc.pid))
    return tuple(sorted(pids))


def _read_gpu(index: int) -> GPU:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = _optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
    power_mw = _optional(lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
    return GPU(
        index=index,
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        memory_total_mb=int(memory.total) // MIB,
        memory_used_mb=int(memory.used) // MIB,
        utilization_pct=None if utilization is None else int(utilization.gpu),
        temperature_c=_optional(lambda: int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))),
        power_w=None if power_mw is None else round(power_mw / 1000.0, 1),
        processes=_processes(handle),
    )


def _why_no_nvml(error: pynvml.NVMLError) -> str:
    if isinstance(error, pynvml.NVMLError_LibraryNotFound):
        return "no NVIDIA driver (NVML could not be loaded)"
    if isinstance(error, pynvml.NVMLError_DriverNotLoaded):
        return "NVIDIA driver installed but not loaded"
    if isinstance(error, pynvml.NVMLError_NoPermission):
        return "no permission to query the NVIDIA driver"
    return f"NVML unavailable: {error}"


def discover_gpus() -> tuple[tuple[GPU, ...], str | None, str]:
    """GPUs, driver version and a note (empty when every GPU was read); never raises for a missing driver."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        note = _why_no_nvml(error)
        log.debug("GPU discovery: %s", note)
        return (), None, note
    try:
        driver = _optional(lambda: _text(pynvml.nvmlSystemGetDriverVersion()))
        gpus: list[GPU] = []
        unreadable: list[str] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                gpus.append(_read_gpu(index))
            except pynvml.NVMLError as error:  # e.g. a GPU fallen off the bus: report it, keep the others
                unreadable.append(f"GPU {index} unreadable: {error}")
        note = "; ".join(unreadable) if gpus or unreadable else "NVIDIA driver loaded but no GPU visible"
        return tuple(gpus), driver, note
    finally:
        pynvml.nvmlShutdown()


def _existing(path: Path) -> Path:
    """The path itself or its nearest existing parent: free space for an output folder not yet created."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def discover(path: str | Path = ".") -> HostInventory:
    """Inventory of this host; disk free is measured on the filesystem holding ``path``."""
    gpus, driver, note = discover_gpus()
    memory = psutil.virtual_memory()
    return HostInventory(
        hostname=socket.gethostname(),
        cpu_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        cpu_physical_cores=psutil.cpu_count(logical=False),
        ram_total_gb=round(memory.total / GIB, 2),
        ram_available_gb=round(memory.available / GIB, 2),
        disk_free_gb=round(psutil.disk_usage(str(_existing(Path(path)))).free / GIB, 2),
        gpus=gpus,
        driver=driver,
        note=note,
    )


def _optional_text(value: object, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def format_table(inventory: HostInventory) -> str:
    """The inventory as a few readable lines and a GPU table."""
    lines = [
        f"host      {inventory.hostname}",
        f"cpu       {inventory.cpu_cores} logical, {_optional_text(inventory.cpu_physical_cores)} physical",
        f"ram       {inventory.ram_available_gb:.1f} GiB available of {inventory.ram_total_gb:.1f} GiB",
        f"disk      {inventory.disk_free_gb:.1f} GiB free",
        f"driver    {_optional_text(inventory.driver)}",
    ]
    if inventory.note:
        lines.append(f"note      {inventory.note}")
    if not inventory.gpus:
        lines.append("gpus      none")
        return "\n".join(lines)
    header = ("#", "name", "memory used/total MiB", "util", "temp", "power", "pids", "uuid")
    rows = [
        (
            str(gpu.index),
            gpu.name,
            f"{gpu.memory_used_mb}/{gpu.memory_total_mb}",
            _optional_text(gpu.utilization_pct, "%"),
            _optional_text(gpu.temperature_c, "C"),
            _optional_text(gpu.power_w, "W"),
            ",".join(map(str, gpu.processes)) or "-",
            gpu.uuid,
        )
        for gpu in inventory.gpus
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines.append("")
    for row in (header, *rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.compute.gpus", description="Show this host's GPUs, CPU, RAM, disk."
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--path", default=".", help="where to measure free disk space (default: .)")
    args = parser.parse_args(argv)
    inventory = discover(args.path)
    print(json.dumps(json.loads(inventory.to_json()), indent=2) if args.json else format_table(inventory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
