"""Direct MLflow artifacts (TRAINYARD_MLFLOW_ARTIFACTS=direct, docs/scale-out.md) on real servers: the control host
runs `up --role control` with the MLflow server on PostgreSQL, `--no-serve-artifacts` and an s3:// default artifact
root (moto's server mode); a training host with its own S3 credentials runs a real training through its worker and
writes the artifacts to the bucket itself. A host without credentials is stopped early, saying which and the fix.
Without a reachable PostgreSQL these tests skip and say why (tests/infra/test_shared_stack.py).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import ACCESS_KEY, SECRET_KEY
from test_shared_stack import (
    SharedStack,
    clean_env,
    cli,
    deploy_torch_demo,
    python,
    shared_stack,
    train_on_a_worker,
)

from infra.settings import Settings
from infra.stack import services as trainyard_stack

DIRECT = {"TRAINYARD_MLFLOW_ARTIFACTS": "direct"}
POOL = "trainyard-local"  # the torch demo deployment's pool (prefect.yaml)


@pytest.fixture(scope="module")
def direct(tmp_path_factory) -> Iterator[SharedStack]:
    """The control host in direct mode, with the torch demo deployed there (profiles seeded)."""
    with shared_stack(tmp_path_factory.mktemp("direct"), DIRECT) as shared:
        deploy_torch_demo(shared.client_env(shared.control_env))
        yield shared


def with_s3_credentials(shared: SharedStack, host_env: dict[str, str]) -> dict[str, str]:
    """A training host of direct mode: its own S3 keys and endpoint in its environment."""
    endpoint = shared.control_env["TRAINYARD_S3_ENDPOINT_URL"]
    return host_env | {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "TRAINYARD_S3_ENDPOINT_URL": endpoint,
    }


# --- The setting alone: no servers ---------------------------------------------------------------------------


def test_direct_mode_starts_the_mlflow_server_without_serving_artifacts(tmp_path):
    env = clean_env(tmp_path) | DIRECT | {"TRAINYARD_HOME": str(tmp_path), "TRAINYARD_ARTIFACT_STORE": "s3://bkt/team"}
    argv = trainyard_stack.mlflow_server_service(Settings.from_env(env)).argv
    assert "--no-serve-artifacts" in argv and "--artifacts-destination" not in argv
    assert argv[argv.index("--default-artifact-root") + 1] == "s3://bkt/team/mlflow"
    proxied = trainyard_stack.mlflow_server_service(Settings.from_env(env | {"TRAINYARD_MLFLOW_ARTIFACTS": ""})).argv
    assert proxied[proxied.index("--artifacts-destination") + 1] == "s3://bkt/team/mlflow"  # the default: proxied


# --- A training host with its own credentials ----------------------------------------------------------------


@pytest.fixture(scope="module")
def training_host(direct) -> Iterator[dict[str, str]]:
    """A worker host of the demo's pool, with S3 credentials of its own."""
    env = with_s3_credentials(direct, direct.host_env("direct-host"))
    try:
        cli("up", "--role", "worker", "--pool", POOL, "--name", "direct-host", env=env)
        yield env
    finally:
        cli("down", env=env, check=False)


def test_a_training_run_writes_its_artifacts_straight_to_the_bucket(direct, training_host, shapes_cls):
    from mlflow import MlflowClient

    printed = cli("env", env=training_host).stdout
    assert "export TRAINYARD_MLFLOW_ARTIFACTS=direct" in printed  # its flow runs know the mode...
    assert f"export MLFLOW_S3_ENDPOINT_URL={training_host['TRAINYARD_S3_ENDPOINT_URL']}" in printed  # ...and where
    assert SECRET_KEY not in printed

    experiment = f"direct-{uuid.uuid4().hex[:6]}"
    run = train_on_a_worker(direct.settings.prefect_api, shapes_cls, experiment)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    mlflow_client = MlflowClient(tracking_uri=direct.settings.mlflow_uri)
    experiment_id = mlflow_client.get_experiment_by_name(experiment).experiment_id
    (mlflow_run,) = mlflow_client.search_runs([experiment_id], f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert mlflow_run.info.status == "FINISHED"
    run_id = mlflow_run.info.run_id
    run_prefix = f"team/mlflow/{experiment_id}/{run_id}/artifacts"
    assert mlflow_run.info.artifact_uri == f"s3://{direct.bucket}/{run_prefix}"  # the client writes there itself

    # What the run lists through MLflow (read straight from S3: with the host's credentials) is in the bucket.
    listed = _artifacts_listed_on(direct.client_env(training_host), run_id)
    assert listed, "the training run logged no artifact"
    in_bucket = direct.objects(f"{run_prefix}/")
    assert {f"{run_prefix}/{path}" for path in listed} == set(in_bucket)
    (version,) = mlflow_client.search_model_versions(f"run_id = '{run_id}'")
    assert version.source.startswith(f"s3://{direct.bucket}/team/mlflow/{experiment_id}/")  # the registered model
    model_prefix = version.source.removeprefix(f"s3://{direct.bucket}/")
    assert f"{model_prefix}/MLmodel" in direct.objects(f"{model_prefix}/")

    # ...and the MLflow server never carried them: it refuses artifact uploads, and none reached it.
    with pytest.raises(urllib.error.HTTPError):
        request = urllib.request.Request(
            f"{direct.settings.mlflow_uri}/api/2.0/mlflow-artifacts/artifacts/probe.txt", data=b"x", method="PUT"
        )
        urllib.request.urlopen(request, timeout=10)
    server_log = (direct.settings.home / "logs" / "mlflow-server.log").read_text(errors="replace")
    assert "mlflow-artifacts/artifacts/" not in server_log.replace("artifacts/probe.txt", "")


def _artifacts_listed_on(host_env: dict[str, str], run_id: str) -> list[str]:
    """Every artifact file of the run as MLflow lists it on that host."""
    done = python(
        f"""
        import json
        from mlflow import MlflowClient

        def files(path=None):
            entries = MlflowClient().list_artifacts({run_id!r}, path)
            return [f for e in entries for f in (files(e.path) if e.is_dir else [e.path])]

        print(json.dumps(files()))
        """,
        host_env,
    )
    return json.loads(done.stdout.splitlines()[-1])


# --- A host without credentials: stopped early, with the fix -------------------------------------------------


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({}, "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set"),
        ({"AWS_ACCESS_KEY_ID": ACCESS_KEY}, "AWS_SECRET_ACCESS_KEY is not set"),
    ],
)
def test_a_worker_host_without_s3_credentials_is_stopped_by_up_with_the_fix(direct, given, missing):
    env = direct.host_env(f"no-keys-{uuid.uuid4().hex[:6]}") | given
    done = cli("up", "--role", "worker", "--pool", "direct-no-keys", env=env, check=False, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: TRAINYARD_MLFLOW_ARTIFACTS=direct: "), error
    assert f"straight to s3://{direct.bucket}/team/mlflow" in error and missing in error, error
    assert "unset TRAINYARD_MLFLOW_ARTIFACTS" in error and "proxied" in error, error  # the other way out
    assert not (Path(env["TRAINYARD_HOME"]) / "pids").exists()  # no worker, no warm start


def test_a_flow_run_on_a_host_without_s3_credentials_fails_before_training_with_the_fix(direct, shapes_cls):
    """A flow run that got past `up` anyway (a worker started some other way) stops before training, not at its
    first upload inside MLflow; no MLflow run is left behind."""
    from mlflow import MlflowClient

    experiment = f"direct-no-keys-{uuid.uuid4().hex[:6]}"
    flow = f"""
        from flows.train import train

        state = train(dataset={str(shapes_cls)!r}, trainer="torch", model="tiny-cnn", epochs=1, image_size=32,
                      batch_size=8, experiment={experiment!r}, registered_model={experiment!r}, return_state=True)
        print(state.type.value)
        print(state.message)
        """
    out = python(flow, direct.client_env(direct.host_env("no-keys-flow"))).stdout.strip().splitlines()
    assert out[-2] == "FAILED", out
    assert "MissingS3Credentials" in out[-1] and f"MLflow experiment {experiment!r}" in out[-1], out[-1]
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set" in out[-1] and "proxied" in out[-1], out[-1]
    mlflow_client = MlflowClient(tracking_uri=direct.settings.mlflow_uri)
    made = mlflow_client.get_experiment_by_name(experiment)
    assert made.artifact_location == f"s3://{direct.bucket}/team/mlflow/{made.experiment_id}"
    assert not mlflow_client.search_runs([made.experiment_id], run_view_type=3)  # stopped before the run began
