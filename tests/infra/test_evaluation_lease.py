"""An attempt holds one GPU lease for training and evaluation, taken like any training's: it waits while another
training holds the GPU, and evaluation never runs on a GPU it does not hold. This machine has no GPU, so the first
test supplies the host's GPU inventory (the stand-in the guide allows for hardware it lacks); the lease, the other
process holding the GPU, the training step, MLflow and the Prefect server are real. The second runs the real path on
an NVIDIA GPU."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from prefect_logs import run_logs
from test_allocation import WORKER, inventory

from flows.request import TrainRequest
from flows.train_step import train_step
from infra.compute.allocation import free_slots, limit_name, slots_of
from infra.compute.gpus import discover
from infra.settings import ROOT
from tasks import model_work, resources
from trainers.data.validate import load_dataset

TORCH = {"epochs": 1, "batch_size": 8, "image_size": 32, "trainer": "torch", "model": "tiny-cnn"}


def test_an_attempt_waits_for_the_gpu_then_trains_and_evaluates_under_that_one_lease(
    stack, shapes_cls, tmp_path, monkeypatch
):
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

    leases, while_evaluating = [], []
    real_lease, real_evaluate = resources.gpu_lease, model_work.evaluate_model

    @contextlib.contextmanager
    def counted_lease(need, inventory, on_wait):
        def waiting(message: str) -> None:  # the attempt waits in line: now the other training lets the GPU go
            on_wait(message)
            threading.Timer(2.0, release.touch).start()

        with real_lease(need, inventory, on_wait=waiting) as lease:
            leases.append((time.time(), lease))
            yield lease

    def evaluate(*args, **kwargs):
        while_evaluating.append(free_slots(host.hostname, host.gpus))
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(resources, "gpu_lease", counted_lease)
    monkeypatch.setattr(model_work, "evaluate_model", evaluate)
    mlflow.set_experiment("one-lease")
    run = MlflowClient().create_run(mlflow.get_experiment_by_name("one-lease").experiment_id)
    state = train_step(
        request=TrainRequest(dataset=str(shapes_cls), experiment="one-lease", **TORCH).model_dump(mode="json"),
        dataset=json.loads(load_dataset(shapes_cls).to_json()),
        output_dir=str(tmp_path / "run"),
        mlflow_run_id=run.info.run_id,
        return_state=True,
    )
    assert state.is_completed(), state.message
    assert training.wait(timeout=60) == 0

    gpu = limit_name(host.hostname, host.gpus[0])
    assert len(leases) == 1  # one lease for the attempt: training and evaluation
    (leased_at, lease) = leases[0]
    assert while_evaluating == [{gpu: 0}]  # evaluation ran while the attempt still held the whole GPU
    assert free_slots(host.hostname, host.gpus) == {gpu: slots_of(host.gpus[0])}  # and gave it back
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["gpus"] == lease.describe() and tags["device"] == "cpu"  # the stand-in GPU is not real
    (other,) = [json.loads(line) for line in records.read_text().splitlines()]
    assert leased_at >= other["end"] and lease.waited_s >= 1.5  # it waited in line until the other let the GPU go
    said = run_logs(state.state_details.flow_run_id, until="next in line")
    assert any("next in line" in log.message for log in said)  # and it said why it waited
    assert "final_val_accuracy" in mlflow.get_run(run.info.run_id).data.metrics


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
