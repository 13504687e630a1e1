"""The local stack: reused when running, a clear message when a port is taken by something else."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from infra.compute.devices import NoComputeError, local_device
from infra.stack import services as local_stack


def test_up_again_reuses_the_running_servers(stack, capsys):
    local_stack.up(stack, worker=False)
    out = capsys.readouterr().out
    assert out.count("already running (reused)") == 2
    assert local_stack._healthy(f"{stack.prefect_api}/health") and local_stack._healthy(f"{stack.mlflow_uri}/health")


def test_a_port_held_by_another_process_is_named_with_the_fix(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = dataclasses.replace(local_stack.Settings.from_env(), home=tmp_path / "home", prefect_port=port)
        with pytest.raises(local_stack.StackError) as error:
            local_stack.start(settings, local_stack.services(settings)[0])
    message = str(error.value)
    assert f"port {port}" in message and "TRAINYARD_PREFECT_PORT" in message and "python" in message


def test_cpu_only_machine_trains_on_the_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU-only case needs one without")
    assert local_device("auto") == "cpu" and local_device("cpu") == "cpu"


def test_a_gpu_request_without_a_gpu_is_refused_at_once():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for machines without one")
    with pytest.raises(NoComputeError, match="needs a GPU"):
        local_device("cuda")


@pytest.mark.gpu
def test_a_visible_gpu_is_used():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU with a driver (run on the GPU machine)")
    assert local_device("auto") == "cuda:0" and local_device("cpu") == "cpu"
