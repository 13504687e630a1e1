"""GPU allocation: leases on a real Prefect server, competing processes, kill -9, and what can never fit.

This machine has no GPU, so most tests supply a GPU inventory (the stand-in the guide allows for hardware it
lacks); the allocation, the leases and the server are real. The last test runs the real path on an NVIDIA GPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from infra.compute.allocation import LEASE_S, AllocationError, Need, choose, gpu_lease, limit_name
from infra.compute.gpus import GPU, HostInventory, discover
from infra.settings import ROOT

WORKER = Path(__file__).with_name("allocation_worker.py")


def inventory(gpus: int = 2, memory_gb: int = 8, **host) -> HostInventory:
    tag = uuid.uuid4().hex[:8]  # fresh GPUs per test: no lease or limit of another test applies
    values = dict(
        hostname=f"testhost-{tag}",
        cpu_cores=8,
        cpu_physical_cores=4,
        ram_total_gb=32.0,
        ram_available_gb=30.0,
        disk_free_gb=100.0,
        driver="test",
        note="",
    )
    values.update(host)
    return HostInventory(
        gpus=tuple(GPU(i, f"GPU-{tag}-{i}", "Test GPU", memory_gb * 1024, 0, 0, 30, 50.0, ()) for i in range(gpus)),
        **values,
    )


def compete(tmp_path: Path, host: HostInventory, need: Need, count: int, hold_s: float) -> list[dict]:
    (tmp_path / "inventory.json").write_text(host.to_json())
    (tmp_path / "need.json").write_text(json.dumps(dataclasses.asdict(need)))
    records = tmp_path / "records.jsonl"
    args = [str(tmp_path / "inventory.json"), str(tmp_path / "need.json"), str(hold_s), str(records)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for _ in range(count)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
    return [json.loads(line) for line in records.read_text().splitlines()]


def test_twelve_processes_competing_for_two_gpus_never_share_one_and_all_finish(stack, tmp_path):
    host = inventory(gpus=2)
    leases = compete(tmp_path, host, Need(gpus=1), count=12, hold_s=0.5)
    assert len(leases) == 12
    for gpu in host.gpus:
        held = sorted((r["start"], r["end"]) for r in leases if r["gpus"] == [gpu.uuid])
        assert held, f"{gpu.uuid} was never used"
        for (_, end), (start, _) in itertools.pairwise(held):
            assert start >= end, f"{gpu.uuid} held by two trainings at once"
    assert {g for r in leases for g in r["gpus"]} == {g.uuid for g in host.gpus}


def test_small_jobs_share_a_gpu_by_memory_and_never_exceed_it(stack, tmp_path):
    host = inventory(gpus=1, memory_gb=8)
    leases = compete(tmp_path, host, Need(gpu_memory_gb=3), count=6, hold_s=1.0)
    assert all(r["slots"] == [3] for r in leases)
    moments = sorted({r["start"] for r in leases})
    overlapping = [sum(1 for r in leases if r["start"] <= t < r["end"]) for t in moments]
    assert max(overlapping) == 2  # two 3 GiB jobs fit an 8 GiB GPU together; a third never joins them


def test_the_lease_of_a_process_killed_with_kill_9_expires_and_the_gpu_is_allocated_again(stack, tmp_path):
    host = inventory(gpus=1)
    (tmp_path / "inventory.json").write_text(host.to_json())
    (tmp_path / "need.json").write_text(json.dumps(dataclasses.asdict(Need(gpus=1))))
    args = [str(tmp_path / "inventory.json"), str(tmp_path / "need.json")]
    holder = subprocess.Popen(
        [sys.executable, str(WORKER), *args, "3600", str(tmp_path / "holder.jsonl")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().startswith("leased")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed_at = time.time()
    records = compete(tmp_path, host, Need(gpus=1), count=1, hold_s=0)
    waited = records[0]["start"] - killed_at
    assert waited <= LEASE_S + 30, f"the dead process's GPU came back after {waited:.0f} s"


def test_a_cpu_only_request_takes_no_lease_and_leaves_cuda_alone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "untouched")
    with gpu_lease(Need(cpu_cores=1), inventory(gpus=0)) as lease:  # no server call either: none is running here
        assert lease is None
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "untouched"


@pytest.mark.parametrize(
    ("need", "host", "says"),
    [
        (Need(gpus=3), {}, "3 GPU(s) requested, testhost-"),
        (Need(gpus=1, gpu_memory_gb=16), {}, "16 GiB of GPU memory requested"),
        (Need(gpu_memory_gb=2), {"gpus": 0}, "GPU memory requested, testhost-"),
        (Need(ram_gb=64), {}, "64 GiB of RAM requested"),
        (Need(cpu_cores=16), {}, "16 CPU cores requested"),
        (Need(disk_gb=500), {}, "compute.disk_gb=500 GiB and 100.0 GiB are free"),
    ],
    ids=["gpus", "gpu-memory", "cpu-only-host", "ram", "cores", "disk"],
)
def test_what_can_never_fit_fails_at_once_naming_the_resource_and_the_fix(need, host, says):
    gpus = host.pop("gpus", 2)
    started = time.monotonic()
    with pytest.raises(AllocationError, match="compute") as refused, gpu_lease(need, inventory(gpus=gpus, **host)):
        pass
    assert says in str(refused.value)
    assert time.monotonic() - started < 1  # before any waiting


def test_shares_pack_onto_the_fullest_gpu_that_fits():
    host = inventory(gpus=3, memory_gb=8)
    names = [limit_name(host.hostname, gpu) for gpu in host.gpus]
    free = dict(zip(names, [8, 3, 5], strict=True))
    [(gpu, slots)] = choose(host.gpus, Need(gpu_memory_gb=2.5), free, host.hostname)
    assert (gpu.index, slots) == (1, 3)  # 3 GiB slots, onto the GPU with least room left that still fits
    assert choose(host.gpus, Need(gpus=2), free, host.hostname) is None  # only GPU 0 is wholly free
    assert [g.index for g, _ in choose(host.gpus, Need(gpus=1), free, host.hostname)] == [0]


@pytest.mark.gpu
def test_on_a_real_gpu_the_training_process_sees_only_its_leased_gpu(stack):
    host = discover()
    if not host.gpus:
        pytest.skip("needs an NVIDIA GPU with a driver (run on the GPU machine)")
    with gpu_lease(Need(gpus=1), host) as lease:
        probe = "import torch; print(torch.cuda.device_count(), torch.cuda.get_device_name(0))"
        seen = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert seen.split()[0] == "1"
    assert lease.gpus[0].name in seen


def test_waiters_are_served_first_come_first_served_and_see_their_position(stack, tmp_path):
    """One GPU held; three requests arrive one after another while it is busy: they get it in arrival order, each
    told its place in line while it waits."""
    host = inventory(gpus=1)
    (tmp_path / "inventory.json").write_text(host.to_json())
    (tmp_path / "need.json").write_text(json.dumps(dataclasses.asdict(Need(gpus=1))))
    records = tmp_path / "records.jsonl"
    args = [str(tmp_path / "inventory.json"), str(tmp_path / "need.json")]

    def start(hold: str) -> subprocess.Popen:
        command = [sys.executable, str(WORKER), *args, hold, str(records)]
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    release = tmp_path / "release"
    holder = start(f"until:{release}")
    assert holder.stdout.readline().startswith("leased")
    waiters, said = [], [""]
    for _ in range(3):  # each is waiting in line before the next one starts
        waiters.append(start("0.3"))
        said.append(waiters[-1].stderr.readline())
    release.touch()
    for proc in [holder, *waiters]:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    leases = sorted((json.loads(line) for line in records.read_text().splitlines()), key=lambda r: r["start"])
    assert [r["pid"] for r in leases] == [holder.pid, *(w.pid for w in waiters)]
    assert "next in line" in said[1]
    assert "position 2 in line" in said[2] and "position 3 in line" in said[3]
