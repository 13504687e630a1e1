"""prefect.yaml as a user applies it, and a run triggered through a real process worker."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from prefect.deployments import run_deployment
from prefect.utilities.importtools import import_object
from waiting import mlflow_runs, wait_for, wait_state

from flows.request import TrainRequest
from infra.runs import warm_start
from infra.settings import ROOT
from infra.stack import services as local_stack
from trainers.data.synthetic import make_shapes_classification, make_shapes_detection

DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
# A checkpoint at every (sub-second) epoch: the tests act once the first is written, long before the last epoch.
EVERY_EPOCH = {"checkpoint": {"min_interval_seconds": 0}}


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_every_entrypoint_imports_and_its_defaults_validate(deployment, tmp_path, monkeypatch):
    home = tmp_path / "home"
    make_shapes_classification(home / "datasets" / "shapes-cls", train_per_class=1, val_per_class=1, test_per_class=0)
    make_shapes_detection(home / "datasets" / "shapes-det", train_images=2, val_images=1)
    flow = import_object(deployment["entrypoint"])
    parameters = {
        key: value.replace("{{ $TRAINYARD_HOME }}", str(home)) if isinstance(value, str) else value
        for key, value in deployment["parameters"].items()
    }
    assert flow.validate_parameters(parameters)
    if deployment["entrypoint"] == "flows/train.py:train":
        assert TrainRequest(**parameters).dataset.startswith(str(home))
    assert deployment["work_pool"]["name"] == "trainyard-local"


def test_the_nightly_schedule_is_declared_and_documented_as_inactive():
    nightly = next(d for d in DEPLOYMENTS if d["name"] == "nightly-retrain")
    assert nightly["schedules"][0]["cron"] == "0 3 * * *"
    assert nightly["schedules"][0]["active"] is False


@pytest.fixture(scope="module")
def worker(stack):
    """`make deploy` for the torch demo, and a real process worker polling the local pool, with its warm start."""
    from infra.stack.services import ensure_work_pool

    ensure_work_pool(stack)
    env = {**os.environ, **stack.client_env()}
    subprocess.run(
        [str(Path(os.sys.executable).parent / "prefect"), "--no-prompt", "deploy", "-n", "torch-shapes"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    services = [local_stack.warm_start_service(stack), local_stack.worker_service(stack, stack.work_pool)]
    for service in services:
        local_stack.start(stack, service)
    deadline = time.monotonic() + 120
    while not warm_start.ready(stack.warm_socket) and time.monotonic() < deadline:
        time.sleep(0.5)
    yield stack
    for service in reversed(services):
        local_stack.stop(stack, service)


def test_deployment_run_through_a_process_worker_registers_an_onnx_model(worker, shapes_cls, tmp_path):
    run = run_deployment(
        "train/torch-shapes",
        parameters={
            "dataset": str(shapes_cls),
            "epochs": 2,
            "image_size": 32,
            "batch_size": 8,
            "registered_model": "deployment-test",
        },
        timeout=300,
    )
    assert run.state.is_completed(), run.state.message
    warm_log = (worker.home / "logs" / "warm-start.log").read_text()
    assert f"flow run {run.id} forked" in warm_log  # started warm, from the preloaded server (infra/runs/warm_start.py)

    mlflow_run = mlflow_runs(run.id)
    assert [r.info.status for r in mlflow_run] == ["FINISHED"]
    version = MlflowClient().get_model_version_by_alias("deployment-test", "candidate")
    assert version.run_id == mlflow_run[0].info.run_id
    local = mlflow.artifacts.download_artifacts(f"models:/deployment-test/{version.version}", dst_path=str(tmp_path))
    assert (Path(local) / "model.onnx").stat().st_size > 1000


def test_a_cancelled_training_keeps_its_work_and_a_retry_resumes_it_in_the_same_mlflow_run(worker, shapes_cls):
    """Cancel from the UI or `prefect flow-run cancel` (both set Cancelling): the worker's SIGTERM interrupts the
    trainer, which checkpoints the work up to its last complete step; the run ends Cancelled and its MLflow run
    KILLED, naming that checkpoint. `prefect flow-run retry` then resumes from it, in the same MLflow run."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter
    from prefect.states import Cancelling

    from infra.settings import Settings
    from trainers.checkpoints import CheckpointStore

    epochs = 60
    parameters = {"dataset": str(shapes_cls), "epochs": epochs, "image_size": 32, "batch_size": 4, **EVERY_EPOCH}
    run = run_deployment("train/torch-shapes", parameters=parameters, timeout=0)
    store = CheckpointStore(Settings.from_env().runs_dir / str(run.id))
    wait_for(store.entries, "training's first checkpoint", timeout=180)  # training has started and saved once
    with get_client(sync_client=True) as client:
        cancelled_at = time.time()
        client.set_flow_run_state(run.id, Cancelling(message="cancelled by the test"))
        state = wait_state(client, run.id)
        assert state.is_cancelled(), state
        newest = store.entries()[-1]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [run.id]}))
        # Written on the way out, unless the signal landed in the middle of a step (the trainer then says so).
        mid_step = any("in the middle of a training step" in log.message for log in logs)
        assert newest.written_at >= cancelled_at or mid_step
        assert store.verified(newest) and newest.epoch < epochs
        [mlflow_run] = mlflow_runs(run.id)
        assert mlflow_run.info.status == "KILLED"
        assert mlflow_run.data.tags["checkpoint.last"].endswith(newest.file)

        prefect = str(Path(os.sys.executable).parent / "prefect")
        subprocess.run([prefect, "flow-run", "retry", str(run.id)], check=True, capture_output=True, timeout=120)
        state = wait_state(client, run.id, after=state.timestamp)
        assert state.is_completed(), state
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [run.id]}))
    assert any(f"resuming from {store.directory}" in log.message for log in logs)
    [mlflow_run] = mlflow_runs(run.id)  # still one run: the retry continued it
    assert mlflow_run.info.status == "FINISHED"
    history = MlflowClient().get_metric_history(mlflow_run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))  # every epoch once: no gap, no repeat


def test_checkpoint_now_then_pause_frees_the_process_and_resume_finishes_in_the_same_mlflow_run(worker, shapes_cls):
    """`python -m flows.control checkpoint` writes a checkpoint and training goes on; `pause` (what the Prefect UI's
    Pause does) checkpoints, ends the run's process and leaves the run Suspended and its MLflow run SCHEDULED;
    `resume` reschedules it and training continues from the checkpoint to the end, every epoch logged once."""
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    from infra.settings import Settings
    from trainers.checkpoints import CheckpointStore

    epochs = 60
    parameters = {"dataset": str(shapes_cls), "epochs": epochs, "image_size": 32, "batch_size": 4, **EVERY_EPOCH}
    run = run_deployment("train/torch-shapes", parameters=parameters, timeout=0)
    store = CheckpointStore(Settings.from_env().runs_dir / str(run.id))
    wait_for(store.entries, "training's first checkpoint", timeout=180)

    asked = time.time()
    done = _control("checkpoint", run.id, "--wait", "60")
    assert done.returncode == 0 and "checkpoint written" in done.stdout, done.stderr
    assert any(entry.written_at >= asked for entry in store.entries())

    with get_client(sync_client=True) as client:
        asked = time.time()
        paused = _control("pause", run.id)
        assert paused.returncode == 0, paused.stderr
        pid = int(re.search(rf"flow run {run.id} forked as pid (\d+)", _warm_log(worker)).group(1))
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), "the paused run's process is still running"
        state = client.read_flow_run(run.id).state
        assert state.is_paused() and state.name == "Suspended", state
        newest = store.entries()[-1]
        assert newest.written_at >= asked and newest.written_at - asked < 30  # checkpointed on the way out
        assert newest.epoch < epochs
        [mlflow_run] = mlflow_runs(run.id)
        assert mlflow_run.info.status == "SCHEDULED"
        assert mlflow_run.data.tags["checkpoint.last"].endswith(newest.file)

        # Past the zombie automation's window (60 s without a heartbeat): a paused run is not a lost one.
        time.sleep(70)
        assert client.read_flow_run(run.id).state.name == "Suspended"

        resumed = _control("resume", run.id)
        assert resumed.returncode == 0, resumed.stderr
        state = wait_state(client, run.id)
        assert state.is_completed(), state
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [run.id]}))
    assert any(f"resuming from {store.directory}" in log.message for log in logs)
    [mlflow_run] = mlflow_runs(run.id)
    assert mlflow_run.info.status == "FINISHED"
    history = MlflowClient().get_metric_history(mlflow_run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))


def test_control_commands_refuse_a_run_that_is_not_running_with_the_reason(worker, shapes_cls):
    run = run_deployment("train/torch-shapes", parameters={"dataset": str(shapes_cls), "epochs": 1}, timeout=300)
    assert run.state.is_completed(), run.state.message
    for command in ("pause", "checkpoint"):
        refused = _control(command, run.id)
        assert refused.returncode == 2
        assert f"flow run {run.id} is Completed: only a running training can be asked to {command}" in refused.stderr
    refused = _control("resume", run.id)
    assert refused.returncode == 2 and "cannot be resumed" in refused.stderr


def _control(*args) -> subprocess.CompletedProcess:
    command = [os.sys.executable, "-m", "flows.control", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _warm_log(stack) -> str:
    return (stack.home / "logs" / "warm-start.log").read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
