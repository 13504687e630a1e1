"""The train flow end to end on a real Prefect server and a real MLflow server, with the torch trainer."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import onnx
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter
from prefect_logs import run_logs

from flows.train import train
from trainers.onnx_export import read_label_map

FAST = {"epochs": 2, "batch_size": 8, "image_size": 32, "trainer": "torch", "model": "tiny-cnn"}


@pytest.fixture(scope="module")
def finished(stack, shapes_cls):
    """One successful pipeline run, shared by the assertions below. Its training lasts about a second, and MLflow's
    sampler drops the sample in progress when the run ends: sample every 50 ms so that some are logged."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
        state = train(
            dataset=str(shapes_cls), experiment="flow-tests", tags={"suite": "flow"}, return_state=True, **FAST
        )
    assert state.is_completed(), state.message
    return state


def test_run_is_recorded_once_in_mlflow_with_params_metrics_and_tags(finished, shapes_cls):
    summary = finished.result()
    run = mlflow.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2" and run.data.params["augmentations.horizontal_flip"] == "0.5"
    tags = run.data.tags
    assert tags["dataset.version"].startswith("sha256:")
    assert json.loads(tags["dataset.labels"]) == {"0": "circle", "1": "square", "2": "triangle"}
    assert tags["prefect.flow_run_id"] == str(finished.state_details.flow_run_id)
    assert tags["prefect.flow_run_url"].endswith(str(finished.state_details.flow_run_id))
    assert len(tags["git.commit"]) in (40, len("unknown"))
    assert tags["suite"] == "flow"

    history = MlflowClient().get_metric_history(summary.mlflow_run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]  # one value per epoch, no duplicates
    assert "final_test_accuracy" in run.data.metrics and "final_val_accuracy" in run.data.metrics

    experiment = mlflow.get_experiment(run.info.experiment_id)
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    assert [r.info.run_id for r in runs] == [summary.mlflow_run_id]  # no stray runs


def test_model_version_carries_onnx_checkpoint_and_label_map(finished, tmp_path):
    summary = finished.result()
    client = MlflowClient()
    version = client.get_model_version_by_alias(summary.model_name, "candidate")
    assert version.version == summary.model_version and version.run_id == summary.mlflow_run_id

    local = mlflow.artifacts.download_artifacts(f"models:/{summary.model_name}@candidate", dst_path=str(tmp_path))
    files = {p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file()}
    assert {"MLmodel", "model.onnx", "labels.json", "checkpoint/best.pt"} <= files
    onnx.checker.check_model(f"{local}/model.onnx")
    assert read_label_map(Path(local) / "model.onnx") == {0: "circle", 1: "square", 2: "triangle"}


def test_prefect_run_shows_progress_metrics_and_summary(finished):
    flow_run_id = finished.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    by_key = {a.key: a for a in artifacts}
    assert by_key["training-progress"].data == 100.0
    assert {row["metric"] for row in json.loads(by_key["final-metrics"].data)} >= {
        "val_accuracy",
        "test_accuracy",
    }
    assert "candidate" in by_key["training-summary"].data and "MLflow run" in by_key["training-summary"].data
    decision = by_key["compute-decision"].data
    assert "Compute: **local** first" in decision
    assert "| k8s-a100 | disabled |" in decision  # every profile shows why it was not chosen
    assert {row["split"] for row in json.loads(by_key["dataset-stats"].data)} == {"train", "val", "test"}


def test_rerun_on_unchanged_data_skips_dataset_preparation(finished, shapes_cls):
    state = train(dataset=str(shapes_cls), experiment="flow-tests", return_state=True, **{**FAST, "epochs": 1})
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]}))
    prepare = next(r for r in runs if r.name.startswith("prepare_dataset"))
    assert prepare.state.name == "Cached"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]}))
    assert "dataset-stats" in {a.key for a in artifacts}  # the stats still show when preparation was cached


def test_the_trainers_own_logs_appear_in_the_flow_run_logs(finished):
    flow_run_id = finished.state_details.flow_run_id
    logs = run_logs(flow_run_id, until="epoch 1/2")
    assert any(log.name == "trainers.torch" and "epoch 1/2" in log.message for log in logs)


def test_the_host_and_its_system_metrics_are_on_the_run_and_a_cpu_only_host_leases_no_gpu(finished):
    import socket

    run = mlflow.get_run(finished.result().mlflow_run_id)
    host = socket.gethostname()
    assert run.data.tags["host"] == host and run.data.tags["device"] == "cpu"
    assert "gpus" not in run.data.tags  # this machine has no GPU: nothing to lease, no GPU metrics
    system = {name for name in run.data.metrics if name.startswith(f"system/{host}/")}
    assert {f"system/{host}/cpu_utilization_percentage", f"system/{host}/system_memory_usage_megabytes"} <= system
    assert not any("gpu_" in name for name in system)
