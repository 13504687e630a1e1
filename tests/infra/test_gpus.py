"""GPU and host discovery against the real machine: NVML, psutil and the filesystem, no mocks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from infra.compute.gpus import GIB, HostInventory, discover, format_table, main

REPO = Path(__file__).resolve().parents[2]
NEEDS_GPU = "needs an NVIDIA GPU with a driver (run on the GPU machine)"


@pytest.fixture(scope="module")
def has_gpu() -> bool:
    return bool(discover().gpus)


@pytest.fixture
def cpu_only(has_gpu: bool) -> None:
    if has_gpu:
        pytest.skip("an NVIDIA GPU is visible: the CPU-only case cannot be checked here")


def test_cpu_only_host_is_normal(cpu_only, tmp_path: Path, recwarn, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="infra.compute.gpus")
    inventory = discover(tmp_path)

    assert inventory.gpus == ()
    assert inventory.note  # says why, e.g. "no NVIDIA driver (NVML could not be loaded)"
    assert "NVIDIA" in inventory.note or "NVML" in inventory.note
    assert len(recwarn) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(caplog.records) <= 1


def test_host_numbers_match_psutil_and_shutil(tmp_path: Path) -> None:
    inventory = discover(tmp_path)

    assert inventory.hostname
    assert inventory.cpu_cores == psutil.cpu_count(logical=True) == os.cpu_count()
    assert inventory.cpu_physical_cores is None or 1 <= inventory.cpu_physical_cores <= inventory.cpu_cores
    assert inventory.ram_total_gb == pytest.approx(psutil.virtual_memory().total / GIB, abs=0.01)
    assert 0 < inventory.ram_available_gb <= inventory.ram_total_gb
    # Free disk moves as other processes write: a tolerance of 1 GiB.
    assert inventory.disk_free_gb == pytest.approx(shutil.disk_usage(tmp_path).free / GIB, abs=1.0)


def test_disk_free_for_a_folder_not_yet_created(tmp_path: Path) -> None:
    inventory = discover(tmp_path / "runs" / "not-yet")

    assert inventory.disk_free_gb == pytest.approx(shutil.disk_usage(tmp_path).free / GIB, abs=1.0)


def test_table_and_json_output(tmp_path: Path, capsys) -> None:
    assert main(["--json", "--path", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {f.name for f in HostInventory.__dataclass_fields__.values()}
    assert isinstance(data["gpus"], list)

    table = format_table(discover(tmp_path))
    assert "cpu" in table and "ram" in table and "disk" in table


def test_cli_runs_as_module(tmp_path: Path) -> None:
    for extra in ([], ["--json"]):
        result = subprocess.run(
            [sys.executable, "-m", "infra.compute.gpus", "--path", str(tmp_path), *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert result.stderr == ""
        if extra:
            assert json.loads(result.stdout)["cpu_cores"] >= 1
        else:
            assert "host" in result.stdout


@pytest.mark.gpu
def test_real_gpu_is_discovered(has_gpu: bool) -> None:
    if not has_gpu:
        pytest.skip(NEEDS_GPU)
    inventory = discover()

    assert inventory.driver
    assert any(gpu.memory_total_mb > 0 and gpu.uuid for gpu in inventory.gpus)
    assert inventory.gpus[0].uuid in format_table(inventory)
