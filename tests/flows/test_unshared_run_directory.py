"""Hosts that do not share the run directory, with the artifact store (S3, moto's server) between them.

- A host that still holds an older copy of an hf-image or yolo run directory restores the newer pushed one and
  trains only what is left (tests/flows/test_remote_resume.py's helpers: each training step as the fallback runs it).
- The training step on another host trains, evaluates and exports there, and the train flow registers the model
  without fetching anything: a real worker with its own TRAINYARD_HOME and its own disk at the train flow's runs
  directory (a private bind mount in a mount namespace: the same path, other files, as on another machine).
- Without an artifact store, a step that cannot see the train flow's run directory stops before it trains, naming
  the rule and the fix; a flow host that finds no step result in the MLflow run says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import test_remote_resume as remote_resume
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect_logs import run_logs
from test_remote_resume import HF, HF_STEPS_PER_EPOCH, YOLO, Request, assert_each_step_logged_once, metric_steps, upload

from flows.request import TrainRequest
from flows.train import train
from flows.train_step import train_step
from infra.compute.store import ComputeProfile, Store
from infra.settings import Settings
from infra.stack import services as local_stack
from infra.stack.apply import apply_profiles
from tasks.model_work import STEP_RESULT, StepResultMissing, read_step_result
from trainers.data.validate import load_dataset

store, shapes_det = remote_resume.store, remote_resume.shapes_det  # its fixtures: a new bucket, a YOLO dataset
EXPERIMENT = "unshared-run-directory"
TORCH = {"epochs": 2, "batch_size": 8, "image_size": 32, "trainer": "torch", "model": "tiny-cnn"}
SHARE_IT = ("TRAINYARD_ARTIFACT_STORE=s3://bucket/prefix", "'Shared checkpoint storage'")  # the fix, both ways


# --- an older copy on another host ---------------------------------------------------------------------------

OLDER_COPY = {  # trainer: (request fields, dataset fixture, the dataset's key in the bucket)
    "hf-image": (HF, "shapes_cls", "datasets/shapes"),
    "yolo": (YOLO, "shapes_det", "datasets/det/data.yaml"),
}


@pytest.mark.parametrize("trainer", sorted(OLDER_COPY))
def test_a_host_holding_an_older_copy_resumes_from_the_newer_push(trainer, store, request, tmp_path, monkeypatch):
    """Host A trains 1 epoch and pushes; host B keeps a copy of that directory; A goes on to 2 epochs and pushes.
    Asked for 3, host B must restore A's epoch 2 (not resume from its epoch 1), train epoch 3 only, and the one
    MLflow run must hold each epoch's metrics once."""
    fields, dataset, key = OLDER_COPY[trainer]
    s3, bucket = store
    upload(s3, bucket, request.getfixturevalue(dataset), key.removesuffix("/data.yaml"))
    job = Request(store, f"s3://{bucket}/{key}", fields, monkeypatch)
    host_a, host_b = Settings.from_env().home, tmp_path / "host-b"

    first = job.step(host_a, 1, until=r"checkpoints after epoch 1 uploaded")
    shutil.copytree(first["output_dir"], host_b / "runs" / job.id)  # host B's copy: epoch 1
    second = job.step(host_a, 2, until=r"checkpoints after epoch 2 uploaded")
    assert job.pushed_progress() == {"epoch": 2}
    kept = [m for m in second["messages"] if "nothing fetched" in m]  # host A's copy is the one it pushed
    assert len(kept) == 1 and kept[0].endswith("this host's copy is the pushed one (epoch 1)"), second["messages"]
    assert not any(m.startswith("restored ") for m in second["messages"])

    third = job.step(host_b, 3, until=r"checkpoints after epoch 3 uploaded")
    messages = third["messages"]
    restored = r"restored \d+ checkpoint files \(\d+ bytes, epoch 2\) from s3://.*: the pushed copy \(epoch 2\) is "
    assert any(re.search(restored + r"newer than this host's \(epoch 1\)", m) for m in messages), messages
    assert any("resuming at epoch 3 of 3" in m for m in messages), messages
    trained = [m for m in messages if re.match(r"epoch \d+/3:", m)]
    assert len(trained) == 1 and trained[0].startswith("epoch 3/3:"), messages  # epochs 1 and 2 not again
    assert third["result"]["epochs_completed"] == 3 and job.pushed_progress() == {"epoch": 3}

    job.finish()
    if trainer == "hf-image":
        assert_each_step_logged_once(job.run_id, skip=lambda key: key == "epoch")
        assert metric_steps(job.run_id, "eval_accuracy") == [HF_STEPS_PER_EPOCH * n for n in (1, 2, 3)]
    else:  # Ultralytics' own metrics/... and val/... add the best model's validation at step `epochs`
        assert_each_step_logged_once(job.run_id, skip=lambda key: key.startswith(("metrics/", "val/")))
        for key in ("val_map50_95", "train_box_loss", "learning_rate"):
            assert metric_steps(job.run_id, key) == [1, 2, 3], key
        assert metric_steps(job.run_id, "train/box_loss") == [0, 1, 2]  # 0-based, each epoch trained once


# --- the train flow after a step on another host ---------------------------------------------------------------


def private_mount_prefix() -> list[str]:
    """`unshare` for a process with its own mount table (root, or a user namespace), or a skip saying why not."""
    argv = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        argv.insert(1, "--map-root-user")
    probe = subprocess.run([*argv, "true"], capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        why = probe.stderr.strip() if probe else "no unshare command (util-linux)"
        pytest.skip(f"needs a private mount namespace to give the step's host its own disk: {why}")
    return argv


def wait_ready(pool: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while client.read_work_pool(pool).status.value != "READY":
            assert time.monotonic() < deadline, f"no worker came online for {pool}"
            time.sleep(0.5)


@dataclasses.dataclass(frozen=True)
class StepHost:
    store: Store  # the platform store: the one profile below, the attempts
    disk: Path  # what that host has at the train flow's runs directory


@pytest.fixture(scope="module")
def step_host(stack, store, tmp_path_factory):
    """Profile "elsewhere", whose pool is served by a worker on another host: its own TRAINYARD_HOME (dataset cache
    included) and, at the train flow's runs directory, its own disk. The artifact store is in its environment."""
    mount = private_mount_prefix()
    home = tmp_path_factory.mktemp("step-host")
    disk, runs = home / "disk", Settings.from_env().runs_dir
    disk.mkdir()
    runs.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{home / 'store.db'}"
    profiles = Store(url)
    profiles.save_profile(
        ComputeProfile(
            name="elsewhere", work_pool="elsewhere-pool", deployment="train-step/elsewhere", cpu_cores=2, ram_gb=8
        )
    )
    asyncio.run(apply_profiles(profiles.profiles()))
    env = {"TRAINYARD_STORE_URL": url, "TRAINYARD_HOME": str(home), "TRAINYARD_WARM_SOCKET": str(home / "none.sock")}
    worker = local_stack.worker_service(stack, "elsewhere-pool", "process", env)
    on_its_disk = ["sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(disk), str(runs)]
    worker = dataclasses.replace(worker, argv=[*mount, *on_its_disk, *worker.argv])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRAINYARD_STORE_URL", url)
        local_stack.start(stack, worker)
        try:
            wait_ready("elsewhere-pool")
            yield StepHost(profiles, disk)
        finally:
            local_stack.stop(stack, worker)


def test_the_step_on_another_host_trains_evaluates_and_exports_there_and_the_flow_registers(
    step_host, store, shapes_cls
):
    s3, bucket = store
    upload(s3, bucket, shapes_cls, "datasets/flow")
    state = train(
        dataset=f"s3://{bucket}/datasets/flow",
        experiment=EXPERIMENT,
        compute={"profiles": ["elsewhere"]},
        return_state=True,
        **TORCH,
    )

    assert state.is_completed(), state.message
    run, summary = str(state.state_details.flow_run_id), state.result()
    [attempt] = step_host.store.attempts(run)
    assert (attempt.profile, attempt.outcome) == ("elsewhere", "completed")
    trained = run_logs(attempt.flow_run_id, until=r"checkpoints after epoch 2 uploaded")
    assert any(m.message.startswith("epoch 2/2:") for m in trained)
    there, here = step_host.disk / run, Settings.from_env().runs_dir / run  # one path, two disks
    step = read_step_result_of(summary.mlflow_run_id)
    assert step["train"]["best_checkpoint"] == str(here / "best.pt")  # the path, on the step's disk
    assert (there / "best.pt").is_file() and Path(summary.onnx_path) == here / "export" / "model.onnx"
    assert (there / "export" / "model.onnx").is_file()  # exported where it trained

    # The flow's host fetched nothing: no checkpoint, no export, no second lease.
    assert not (here / "best.pt").exists() and not (here / "export").exists()
    assert not any("restored" in m.message for m in run_logs(run))
    assert summary.onnx_uri == f"s3://{bucket}/trainyard/{EXPERIMENT}/{run}/model/model.onnx"

    mlflow_run = mlflow.get_run(summary.mlflow_run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert {"final_val_accuracy", "onnx_parity_max_abs_diff"} <= set(mlflow_run.data.metrics)
    version = MlflowClient().get_model_version(summary.model_name, summary.model_version)
    assert version.run_id == summary.mlflow_run_id and version.status == "READY"
    # The best checkpoint is stored once: in the artifact store, which the MLflow model names.
    assert not MlflowClient().list_artifacts(summary.mlflow_run_id, "model/checkpoint")
    named = mlflow.artifacts.load_dict(f"runs:/{summary.mlflow_run_id}/model/checkpoint.json")
    assert named == {"uri": f"s3://{bucket}/trainyard/{EXPERIMENT}/{run}/model/checkpoint/best.pt", "name": "best.pt"}
    assert mlflow_run.data.tags["checkpoint.uri"] == named["uri"]


def read_step_result_of(run_id: str) -> dict:
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{STEP_RESULT}")


# --- without an artifact store -----------------------------------------------------------------------------------


def test_without_a_store_a_step_that_cannot_see_the_flows_run_directory_stops_before_training(
    stack, shapes_cls, tmp_path, monkeypatch
):
    monkeypatch.delenv("TRAINYARD_ARTIFACT_STORE", raising=False)
    output_dir = tmp_path / "runs" / "request-1"  # another host's: the train flow's mark is not there
    state = train_step(
        request=TrainRequest(dataset=str(shapes_cls), experiment=EXPERIMENT, **TORCH).model_dump(mode="json"),
        dataset=json.loads(load_dataset(shapes_cls).to_json()),
        output_dir=str(output_dir),
        mlflow_run_id=str(uuid.uuid4()),  # never reached
        request_run_id="request-1",
        return_state=True,
    )

    assert state.is_failed()
    message = state.message
    assert f"The run directory {output_dir} on this host is not the train flow's" in message, message
    assert "no artifact store is set" in message and all(fix in message for fix in SHARE_IT), message
    assert not output_dir.exists()  # nothing trained


def test_a_flow_host_that_finds_no_step_result_in_the_mlflow_run_says_what_and_how(stack):
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run() as run:  # a step that ended Completed without writing its result
        pass
    with pytest.raises(StepResultMissing) as error:
        read_step_result(run.info.run_id)

    message = str(error.value)
    assert message.startswith(f"The training step ended Completed, but its result {STEP_RESULT} is not in MLflow run")
    assert run.info.run_id in message and "run the request again to resume" in message
