"""Evaluation after training holds a GPU lease of its own, like a training: it never runs on a GPU another training
holds. This machine has no GPU, so the first test supplies the host's GPU inventory (the stand-in the guide allows
for hardware it lacks); the lease, the other process holding the GPU and the Prefect server are real. The second
runs the real path on an NVIDIA GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect import flow
from test_allocation import WORKER, inventory

from flows.request import TrainRequest
from infra.compute.allocation import free_slots, limit_name, slots_of
from infra.compute.gpus import discover
from infra.settings import ROOT
from tasks import resources


def test_evaluation_waits_for_the_gpu_a_training_holds_and_then_leases_it(stack, tmp_path, monkeypatch):
    host = inventory(gpus=1)
    monkeypatch.setattr(resources, "discover", lambda path: host)
    (tmp_path / "inventory.json").write_text(host.to_json())
    (tmp_path / "need.json").write_text('{"gpus": 1}')
    release, records = tmp_path / "release", tmp_path / "records.jsonl"
    command = [sys.executable, str(WORKER), str(tmp_path / "inventory.json"), str(tmp_path / "need.json")]
    training = subprocess.Popen(
        [*command, f"until:{release}", str(records)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert training.stdout.readline().startswith("leased")  # another training holds the host's only GPU
    said: list[str] = []
    monkeypatch.setattr(resources, "get_run_logger", lambda: type("Log", (), {"warning": said.append})())

    @flow
    def evaluate() -> tuple[float, str, dict[str, int]]:
        with resources.evaluation_device(TrainRequest(dataset=str(tmp_path)), tmp_path) as device:
            return time.time(), device, free_slots(host.hostname, host.gpus)

    threading.Timer(3.0, release.touch).start()
    entered, device, free_while_evaluating = evaluate()
    assert training.wait(timeout=60) == 0

    (training_lease,) = [json.loads(line) for line in records.read_text().splitlines()]
    assert entered >= training_lease["end"]  # not before the training let the GPU go
    assert said and "next in line" in said[0]  # and it said why it waited
    gpu = limit_name(host.hostname, host.gpus[0])
    assert free_while_evaluating == {gpu: 0}  # evaluation held the whole GPU
    assert free_slots(host.hostname, host.gpus) == {gpu: slots_of(host.gpus[0])}  # and gave it back
    assert device == "cpu"  # the supplied GPU is not real: torch sees none here


@pytest.mark.gpu
def test_on_a_real_gpu_evaluation_after_training_in_the_same_process_uses_the_gpu_cuda_started_with(stack):
    if not discover().gpus:
        pytest.skip("needs an NVIDIA GPU with a driver (run on the GPU machine)")
    # A training in this process started CUDA with its leased GPU visible; evaluation afterwards must lease a GPU
    # that this process can still use, and find it among CUDA's devices.
    probe = (
        "import torch; from infra.compute.allocation import Need, gpu_lease; from infra.compute.gpus import discover;"
        "from tasks.resources import device_of, visible_to_this_process\n"
        "with gpu_lease(Need(gpus=1), discover()) as first:\n"
        "    torch.zeros(1, device='cuda:0')\n"
        "host = visible_to_this_process(discover())\n"
        "with gpu_lease(Need(gpus=1), host) as second:\n"
        "    device = device_of(second, 'auto'); torch.zeros(1, device=device)\n"
        "print(len(host.gpus), first.gpus[0].uuid == second.gpus[0].uuid, device)"
    )
    seen = subprocess.run([sys.executable, "-c", probe], cwd=Path(ROOT), capture_output=True, text=True, check=True)
    assert seen.stdout.split() == ["1", "True", "cuda:0"]
