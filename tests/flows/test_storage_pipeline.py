"""The train flow with S3: an s3:// dataset synced into the cache, checkpoints and the exported model in the artifact
store, a presigned URL in the summary, a resume on another host from the S3 checkpoints, and no credential anywhere.

A real Prefect server and MLflow server (the `stack` fixture), a real S3 endpoint (moto's server mode, `s3_endpoint`),
the torch trainer on a tiny generated dataset; everything runs in this process, like tests/flows/test_train_flow.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter
from prefect.settings import get_current_settings
from prefect_logs import run_logs
from pydantic import ValidationError
from s3_server import client, client_env, env_applied

from flows.request import TrainRequest
from flows.train import train
from flows.train_step import train_step
from infra.settings import Settings
from tasks.model_work import read_step_result
from tasks.remote_storage import sync_dataset_uri
from tasks.tracking import runs_of_flow_run
from trainers.data.validate import load_dataset

FAST = {"epochs": 2, "batch_size": 8, "image_size": 32, "trainer": "torch", "model": "tiny-cnn"}
EXPERIMENT = "storage-pipeline"
SYNCED = re.compile(r"synced to .*: (\d+) downloaded \((\d+) bytes\), (\d+) unchanged")


@dataclass(frozen=True)
class Remote:
    name: str
    s3: object  # a plain boto3 client, behind Trainyard's back
    dataset: str  # the s3:// URI of the uploaded dataset
    files: int  # objects in it
    secret: str  # the secret access key in the environment
    started: float  # when the module's first run started (persisted results newer than this are searched)


@pytest.fixture(scope="module")
def remote(stack, s3_endpoint, shapes_cls, tmp_path_factory):
    """The generated dataset uploaded to a new bucket; credentials, endpoint and artifact store in the environment."""
    with pytest.MonkeyPatch.context() as env:
        env_applied(env, client_env(s3_endpoint, tmp_path_factory.mktemp("aws")))
        s3 = client(s3_endpoint)
        name = f"ty-pipeline-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=name)
        files = [p for p in shapes_cls.rglob("*") if p.is_file()]
        for path in files:
            s3.upload_file(str(path), name, f"datasets/shapes/{path.relative_to(shapes_cls).as_posix()}")
        env.setenv("TRAINYARD_ARTIFACT_STORE", f"s3://{name}/trainyard")
        yield Remote(name, s3, f"s3://{name}/datasets/shapes", len(files), s3_endpoint.secret_key, time.time())


@pytest.fixture(scope="module")
def first(remote):
    state = train(dataset=remote.dataset, experiment=EXPERIMENT, tags={"suite": "storage"}, return_state=True, **FAST)
    assert state.is_completed(), state.message
    return state


def flow_run_id(state) -> str:
    return str(state.state_details.flow_run_id)


def artifacts_of(run_id: str) -> dict:
    with get_client(sync_client=True) as prefect:
        return {a.key: a for a in prefect.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [run_id]}))}


def task_names(run_id: str) -> set[str]:
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run_id]}))
    return {r.name.rsplit("-", 1)[0] for r in runs}


def sync_counts(run_id: str) -> tuple[int, int, int]:
    """(downloaded, bytes, unchanged) from the sync_dataset task's log line."""
    lines = [log.message for log in run_logs(run_id, until=SYNCED.pattern) if SYNCED.search(log.message)]
    assert len(lines) == 1, lines
    return tuple(int(n) for n in SYNCED.search(lines[0]).groups())


def run_prefix(state) -> str:
    return f"trainyard/{EXPERIMENT}/{flow_run_id(state)}"


def read_json(remote: Remote, key: str) -> dict:
    return json.loads(remote.s3.get_object(Bucket=remote.name, Key=key)["Body"].read())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the request ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ("s3://My_Bucket/shapes", "'My_Bucket' is not an S3 bucket name (3-63 characters"),
        ("s3://ml-data//shapes", "the prefix '/shapes' has an empty, '.' or '..' segment"),
        ("gs://ml-data/shapes", "only s3:// URIs are synced, not gs://"),
    ],
)
def test_a_malformed_dataset_uri_is_refused_naming_the_field_rule_and_fix(dataset, message):
    with pytest.raises(ValidationError) as error:
        TrainRequest(dataset=dataset)
    text = str(error.value)
    assert text.startswith("1 validation error for TrainRequest\ndataset\n") and message in text
    assert "Write s3://bucket/prefix (yolo: s3://bucket/prefix/data.yaml" in text


def test_a_well_formed_uri_is_accepted_without_touching_the_network():
    request = TrainRequest(dataset="s3://no-such-bucket-anywhere/pets/", trainer="yolo", model="yolov8n.yaml")
    assert request.dataset == "s3://no-such-bucket-anywhere/pets" and request.registered_model == "pets-yolo"
    assert request.train_config().dataset == "s3://no-such-bucket-anywhere/pets"


@pytest.mark.parametrize("form", ["data.yaml", "prefix"])
def test_a_yolo_dataset_syncs_from_its_data_yaml_uri_or_its_prefix(s3, bucket, tiny_yolo, tmp_path, form):
    for path in (p for p in tiny_yolo.parent.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"det/{path.relative_to(tiny_yolo.parent).as_posix()}")
    uri = f"s3://{bucket}/det/data.yaml" if form == "data.yaml" else f"s3://{bucket}/det"

    path, result = sync_dataset_uri(uri, tmp_path / "cache")

    assert result.path == tmp_path / "cache" / bucket / "det" and result.downloaded == 7
    assert Path(path) == (result.path / "data.yaml" if form == "data.yaml" else result.path)
    spec = load_dataset(path)
    assert spec.format == "yolo" and spec.labels == ["cat", "dog"]
    assert spec.version == load_dataset(tiny_yolo).version  # the same bytes: the same dataset version


# --- one run -------------------------------------------------------------------------------------------------


def test_an_s3_dataset_is_synced_trained_on_and_recorded_as_its_uri(first, remote):
    downloaded, size, unchanged = sync_counts(flow_run_id(first))
    assert (downloaded, unchanged) == (remote.files, 0) and size > 0
    cache = Settings.from_env().home / "cache" / "datasets" / remote.name / "datasets" / "shapes"
    assert (cache / "train").is_dir()
    run = mlflow.get_run(first.result().mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset"] == remote.dataset  # what the user gave, not the cache path
    assert run.data.tags["dataset.version"] == load_dataset(cache).version


# --- the artifact store --------------------------------------------------------------------------------------


def test_the_onnx_model_and_best_checkpoint_are_uploaded_with_their_sha256(first, remote):
    summary = first.result()
    key = f"{run_prefix(first)}/model/model.onnx"
    assert summary.onnx_uri == f"s3://{remote.name}/{key}"
    local = Path(summary.onnx_path).read_bytes()
    head = remote.s3.head_object(Bucket=remote.name, Key=key)
    assert head["Metadata"]["sha256"] == sha256(local) and head["ContentLength"] == len(local)
    best = remote.s3.get_object(Bucket=remote.name, Key=f"{run_prefix(first)}/model/checkpoint/best.pt")
    body = best["Body"].read()
    assert best["Metadata"]["sha256"] == sha256(body)
    pointer = read_json(remote, f"trainyard/{EXPERIMENT}/latest-model.json")  # the experiment's newest model
    assert (pointer["key"], pointer["sha256"]) == (f"{flow_run_id(first)}/model/model.onnx", sha256(local))
    tags = mlflow.get_run(summary.mlflow_run_id).data.tags
    assert tags["onnx.uri"] == summary.onnx_uri
    assert tags["checkpoints.uri"] == f"s3://{remote.name}/{run_prefix(first)}/checkpoints"


def test_the_summary_has_a_presigned_url_that_downloads_the_exact_onnx_bytes(first, remote):
    summary = artifacts_of(flow_run_id(first))["training-summary"].data
    url = re.search(r"\[presigned URL\]\((http[^)]+)\) \(until \d{4}-\d\d-\d\d \d\d:\d\d UTC\)", summary).group(1)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=86400" in url  # the library's default expiry
    with urllib.request.urlopen(url, timeout=10) as response:  # no credentials: the URL alone
        assert response.read() == Path(first.result().onnx_path).read_bytes()
    run = mlflow.get_run(first.result().mlflow_run_id)
    assert not any("X-Amz-Signature" in v for v in [*run.data.params.values(), *run.data.tags.values()])


def test_checkpoints_are_on_s3_with_a_manifest_written_last(first, remote):
    prefix = f"{run_prefix(first)}/checkpoints"
    pointer = read_json(remote, f"{prefix}/latest.json")
    manifest = read_json(remote, f"{prefix}/{pointer['key']}")
    assert manifest["progress"]["epoch"] == 2
    files = manifest["files"]
    assert {"checkpoints.json", "last.pt", "best.pt"} <= set(files)
    assert any(re.fullmatch(r"ckpt-e0002-s\d{8}\.pt", name) for name in files)
    listed = {o["Key"] for o in remote.s3.list_objects_v2(Bucket=remote.name, Prefix=f"{prefix}/")["Contents"]}
    for entry in files.values():
        assert f"{prefix}/blobs/{entry['sha256']}" in listed
    # Blobs of checkpoints that retention removed are deleted too: only what the manifest names stays.
    assert {k for k in listed if "/blobs/" in k} == {f"{prefix}/blobs/{e['sha256']}" for e in files.values()}
    local = json.loads((Settings.from_env().runs_dir / flow_run_id(first) / "checkpoints.json").read_text())
    remote = remote.s3.get_object(Bucket=remote.name, Key=f"{prefix}/blobs/{files['checkpoints.json']['sha256']}")
    assert json.loads(remote["Body"].read()) == local
    logs = run_logs(flow_run_id(first), until="checkpoints after epoch 2 uploaded")
    assert any("checkpoints after epoch 2 uploaded" in log.message for log in logs)


# --- failing early -------------------------------------------------------------------------------------------


def test_a_missing_bucket_fails_the_run_before_compute_is_selected(remote):
    state = train(dataset="s3://ty-no-such-bucket/shapes", experiment=EXPERIMENT, return_state=True, **FAST)

    assert state.is_failed()
    assert "Bucket 'ty-no-such-bucket' does not exist" in state.message
    assert "aws s3 mb s3://ty-no-such-bucket" in state.message
    assert "select_compute" not in task_names(flow_run_id(state))
    assert runs_of_flow_run(flow_run_id(state)) == []


def test_missing_credentials_fail_the_run_before_compute_is_selected(remote, monkeypatch):
    monkeypatch.delenv("TRAINYARD_ARTIFACT_STORE")  # the dataset sync is the first to need them
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    state = train(dataset=remote.dataset, experiment=EXPERIMENT, return_state=True, **FAST)

    assert state.is_failed()
    assert "No S3 credentials found" in state.message and "AWS_ACCESS_KEY_ID" in state.message
    assert "select_compute" not in task_names(flow_run_id(state))
    assert runs_of_flow_run(flow_run_id(state)) == []


# --- no credential anywhere ----------------------------------------------------------------------------------


def _files_holding(secret: bytes, root: Path, newer_than: float = 0) -> list[str]:
    return [
        str(p) for p in root.rglob("*") if p.is_file() and p.stat().st_mtime >= newer_than and secret in p.read_bytes()
    ]


def test_the_secret_key_appears_in_no_log_param_tag_artifact_result_or_upload(first, remote, tmp_path):
    secret = remote.secret
    assert len(secret) >= 16 and secret not in ("", "test", "testing")
    run_id = flow_run_id(first)

    logs = run_logs(run_id, until="Finished in state")
    assert len(logs) > 20  # the run's whole log, tasks and trainer included
    assert [log.message for log in logs if secret in log.message] == []

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(run_id)
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run_id]}))
    assert secret not in json.dumps(flow_run.parameters) + json.dumps([str(t.task_inputs) for t in task_runs])
    artifacts = artifacts_of(run_id)
    assert {"training-summary", "dataset-stats", "training-progress"} <= set(artifacts)
    assert [key for key, a in artifacts.items() if secret in f"{a.data} {a.description}"] == []

    summary = first.result()
    run = mlflow.get_run(summary.mlflow_run_id)
    assert [k for k, v in {**run.data.params, **run.data.tags}.items() if secret in f"{k}={v}"] == []
    downloaded = Path(mlflow.artifacts.download_artifacts(run_id=summary.mlflow_run_id, dst_path=str(tmp_path)))
    assert any(downloaded.rglob("*.onnx"))
    assert _files_holding(secret.encode(), downloaded) == []

    results = get_current_settings().results.local_storage_path
    assert any(p.stat().st_mtime >= remote.started for p in results.rglob("*") if p.is_file())  # some were written
    assert _files_holding(secret.encode(), results, newer_than=remote.started) == []
    assert _files_holding(secret.encode(), Settings.from_env().runs_dir / run_id) == []  # checkpoints, export

    uploaded = remote.s3.list_objects_v2(Bucket=remote.name, Prefix="trainyard/")["Contents"]
    assert [o["Key"] for o in uploaded if secret.encode() in _body(remote, o["Key"])] == []

    # The search finds the secret where it is: it would fail if the value had leaked.
    (tmp_path / "planted").write_bytes(b"key=" + secret.encode())
    assert _files_holding(secret.encode(), tmp_path) == [str(tmp_path / "planted")]


def _body(remote: Remote, key: str) -> bytes:
    return remote.s3.get_object(Bucket=remote.name, Key=key)["Body"].read()


def test_a_second_run_on_the_same_data_downloads_nothing(first, remote):
    cache = Settings.from_env().home / "cache" / "datasets" / remote.name / "datasets" / "shapes"
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.png")}

    state = train(dataset=remote.dataset, experiment=EXPERIMENT, return_state=True, **{**FAST, "epochs": 1})

    assert state.is_completed(), state.message
    assert sync_counts(flow_run_id(state)) == (0, 0, remote.files)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.png")} == before  # nothing rewritten either
    assert "prepare_dataset" in task_names(flow_run_id(state))


# --- another host --------------------------------------------------------------------------------------------


def test_an_attempt_on_another_host_resumes_from_the_s3_checkpoints(first, remote, tmp_path, monkeypatch):
    """The training step of the first run's request, as the fallback runs it on another host: its own
    TRAINYARD_HOME (no dataset cache, no run directory) and the first host's run directory gone."""
    run_id, host_a = flow_run_id(first), Settings.from_env()
    spec = load_dataset(host_a.home / "cache" / "datasets" / remote.name / "datasets" / "shapes")  # host A's paths
    shutil.rmtree(host_a.runs_dir / run_id)
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "host-b"))
    output_dir = tmp_path / "host-b" / "runs" / run_id
    request = TrainRequest(dataset=remote.dataset, experiment=EXPERIMENT, **{**FAST, "epochs": 3})
    mlflow_run = MlflowClient().create_run(mlflow.get_experiment_by_name(EXPERIMENT).experiment_id)

    state = train_step(
        request=request.model_dump(mode="json"),
        dataset=json.loads(spec.to_json()),
        output_dir=str(output_dir),
        mlflow_run_id=mlflow_run.info.run_id,
        request_run_id=run_id,
        return_state=True,
    )

    assert state.is_completed(), state.message
    messages = [log.message for log in run_logs(flow_run_id(state), until=r"checkpoints after epoch 3 uploaded")]
    assert any(re.search(r"restored \d+ checkpoint files .*epoch 2\)", m) for m in messages), messages
    assert any(re.search(r"resuming from .*ckpt-e0002-s\d+\.pt at epoch 2", m) for m in messages), messages
    assert not any("epoch 1/3" in m for m in messages)  # epochs 1 and 2 were not trained again
    assert any("epoch 3/3" in m for m in messages)
    assert (tmp_path / "host-b" / "cache" / "datasets" / remote.name / "datasets" / "shapes" / "train").is_dir()
    assert state.result()["train"]["epochs_completed"] == 3
    prefix = f"{run_prefix(first)}/checkpoints"
    manifest = read_json(remote, f"{prefix}/{read_json(remote, f'{prefix}/latest.json')['key']}")
    assert manifest["progress"]["epoch"] == 3  # host B's checkpoints went up in their turn

    # The train flow's host never had host B's directory (a step trains at the path the flow gave it), and needs
    # none of it: the step evaluated and exported there, and left its result in the MLflow run.
    shutil.rmtree(output_dir)
    step = read_step_result(mlflow_run.info.run_id)
    assert step.train.epochs_completed == 3 and step.stored is not None
    assert "final_val_accuracy" in mlflow.get_run(mlflow_run.info.run_id).data.metrics
