"""The shared setup (docs/scale-out.md) on real servers: Prefect and MLflow on PostgreSQL, MLflow artifacts and
Prefect results on S3 (moto's server mode), started with `python -m infra.stack up --role control` as a user would.

Each "host" is a process with its own environment and TRAINYARD_HOME: the control host has the S3 credentials,
a training host has none. PostgreSQL comes from TRAINYARD_TEST_DATABASE_URL; without it, the test session's own
cluster (tests/conftest.py, shared with the session's stack), or where the session runs on SQLite,
postgresql://postgres@127.0.0.1:5432 (the server of this kind of machine). Each module gets fresh databases, dropped
at the end. Without a reachable PostgreSQL these tests skip and say why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from prefect_logs import run_logs
from s3_server import ACCESS_KEY, SECRET_KEY, Endpoint, client, start_moto, stop
from waiting import final_flow_runs, free_port

from infra.settings import ROOT, ArtifactStore, Database, Settings
from infra.stack import services as trainyard_stack


def _admin_url() -> str:
    """postgresql://user[:password]@host:port of the server the shared stacks create their databases on."""
    if named := os.environ.get("TRAINYARD_TEST_DATABASE_URL"):
        return named
    if session := os.environ.get("TRAINYARD_DATABASE_URL"):  # only ever the session's cluster (tests/conftest.py)
        database = Database.parse(session)
        return f"postgresql://{database.user or 'postgres'}@{database.host}:{database.port}"
    return "postgresql://postgres@127.0.0.1:5432"


ADMIN_URL = _admin_url()
# The server here trusts local connections and ignores it; it is in the URL so the tests can look for leaks
# (a password in TRAINYARD_TEST_DATABASE_URL is used instead).
PG_PASSWORD = Database.parse(f"{ADMIN_URL}/x").password or "ty-pg-password-0b7e-never-log-me"
SECRETS = (SECRET_KEY, PG_PASSWORD)


@dataclass(frozen=True)
class SharedStack:
    """A running control host and how to be another host of it."""

    settings: Settings  # as the control host sees it
    control_env: dict[str, str]  # the control host's environment: S3 credentials and the database URL
    tmp: Path
    bucket: str
    s3: object  # a boto3 client with the credentials: how the tests look into the bucket

    def host_env(self, name: str) -> dict[str, str]:
        """A training host: its own TRAINYARD_HOME, the same two settings, no S3 credentials at all."""
        home = self.tmp / name
        home.mkdir(exist_ok=True)
        s3_settings = ("AWS_", "TRAINYARD_S3_ENDPOINT_URL")
        env = {k: v for k, v in self.control_env.items() if not k.startswith(s3_settings)}
        return {
            **env,
            "TRAINYARD_HOME": str(home),
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance role, no ~/.aws: nothing for boto3 to find
            "AWS_CONFIG_FILE": str(home / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        }

    def client_env(self, host_env: dict[str, str]) -> dict[str, str]:
        """A host's environment plus what `python -m infra.stack env` prints there (`source .trainyard/env`)."""
        printed = cli("env", env=host_env).stdout
        exports = dict(line.removeprefix("export ").split("=", 1) for line in printed.splitlines())
        return {**host_env, **exports}

    def objects(self, prefix: str) -> dict[str, int]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def cli(*args: str, env: dict[str, str], check: bool = True, timeout: float = 400) -> subprocess.CompletedProcess:
    """`python -m infra.stack ...` in a process of its own, as on a host."""
    done = subprocess.run(
        [sys.executable, "-m", "infra.stack", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        pytest.fail(f"infra.stack.services {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def python(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done


def deploy_torch_demo(shell_env: dict[str, str]) -> None:
    """`make deploy` as the scale test runs it on the control host: seeded profiles and the torch demo deployment
    (flows/train.py on the trainyard-local pool). `shell_env`: that host's shell after `source .trainyard/env`."""
    for command in (
        [sys.executable, "-m", "infra.compute.profiles", "seed", "--if-empty"],
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "-n", "torch-shapes"],
    ):
        done = subprocess.run(command, cwd=ROOT, env=shell_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(command[1:])}:\n{done.stdout}\n{done.stderr}"


def train_on_a_worker(prefect_api: str, dataset: Path, experiment: str, timeout: float = 600):
    """The smallest real training the scale test runs (1 epoch, 32 px), triggered on the torch demo deployment
    and waited for; its final flow run."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    parameters = {"dataset": str(dataset), "epochs": 1, "image_size": 32, "batch_size": 8}
    parameters |= {"experiment": experiment, "registered_model": experiment}
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        run = run_deployment("train/torch-shapes", parameters=parameters, timeout=0)
        with get_client(sync_client=True) as client:
            return final_flow_runs(client, [run.id], timeout)[str(run.id)]


def flow_run_logs(prefect_api: str, flow_run_id) -> str:
    """Every log line of a flow run on the Prefect server, as the UI shows them."""
    return "\n".join(log.message for log in run_logs(flow_run_id, prefect_api=prefect_api))


def clean_env(tmp: Path) -> dict[str, str]:
    """This process's environment without the session stack's settings (PREFECT_*, MLFLOW_*, TRAINYARD_*, AWS_*)."""
    dropped = ("PREFECT_", "MLFLOW_", "TRAINYARD_", "AWS_", "PG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    return {**env, "YOLO_CONFIG_DIR": str(tmp / "ultralytics")}


def postgres_or_skip():
    """A connection to the PostgreSQL server for the tests, or a skip that says what was tried."""
    import psycopg

    try:
        return psycopg.connect(f"{ADMIN_URL}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        pytest.skip(
            f"needs PostgreSQL: none at {ADMIN_URL} ({' '.join(str(error).split())}). Set TRAINYARD_TEST_DATABASE_URL "
            "to a server where this user may create databases"
        )


def new_bucket(endpoint: str, prefix: str):
    """A boto3 client with the tests' keys on `endpoint`, and a new bucket there: (client, bucket name)."""
    s3 = client(Endpoint(endpoint, "moto", ACCESS_KEY, SECRET_KEY))
    bucket = f"{prefix}-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket


def control_host_env(tmp: Path, host: str, database_url: str, artifact_store: str, endpoint: str) -> dict[str, str]:
    """The control host's environment: servers on `host` (free ports there), the shared settings, the S3 keys."""
    return {
        **clean_env(tmp),
        "TRAINYARD_HOME": str(tmp / "control"),
        "TRAINYARD_HOST": host,
        "TRAINYARD_PREFECT_PORT": str(free_port(host)),
        "TRAINYARD_MLFLOW_PORT": str(free_port(host)),
        "TRAINYARD_DATABASE_URL": database_url,
        "TRAINYARD_ARTIFACT_STORE": artifact_store,
        "TRAINYARD_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextmanager
def shared_stack(tmp: Path, settings_env: dict[str, str] | None = None) -> Iterator[SharedStack]:
    """Fresh databases, a moto S3 server and a bucket, then `up --role control` with `settings_env` added to the
    control host's environment; `down` and drop all at the end."""
    from psycopg import sql

    admin = postgres_or_skip()
    name = f"ty_test_{uuid.uuid4().hex[:10]}"
    moto, endpoint = start_moto()
    try:
        s3, bucket = new_bucket(endpoint, "ty-shared")
        admin_url = Database.parse(f"{ADMIN_URL}/x")
        login = f"{admin_url.user or 'postgres'}:{PG_PASSWORD}"
        server = f"{admin_url.host}:{admin_url.port}"
        database_url = f"postgresql://{login}@{server}/{name}"
        control_env = control_host_env(tmp, "127.0.0.1", database_url, f"s3://{bucket}/team", endpoint)
        control_env |= settings_env or {}
        settings = Settings.from_env(control_env)
        try:
            cli("up", "--role", "control", env=control_env)
            yield SharedStack(settings, control_env, tmp, bucket, s3)
        finally:
            cli("down", env=control_env, check=False)
            for database in settings.database.databases:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    finally:
        stop(moto)
        admin.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[SharedStack]:
    with shared_stack(tmp_path_factory.mktemp("shared")) as running:
        yield running


def _running(settings: Settings) -> list[psutil.Process | None]:
    """The stack's services in services() order: Prefect server, MLflow server, worker, warm start (None: not up)."""
    return [trainyard_stack.running(settings, service) for service in trainyard_stack.services(settings)]


def _stack_processes(settings: Settings) -> list[psutil.Process]:
    """Every process the stack's pid files name, with all their descendants (uvicorn, MLflow's job runners)."""
    processes = []
    for service in trainyard_stack.services(settings):
        process = trainyard_stack.running(settings, service)
        if process:
            processes += [process, *process.children(recursive=True)]
    return processes


# --- The settings alone: no servers --------------------------------------------------------------------------


def test_without_the_two_settings_the_stack_stays_embedded(tmp_path):
    settings = Settings.from_env(clean_env(tmp_path) | {"TRAINYARD_HOME": str(tmp_path)})
    assert settings.database is None and settings.artifact_store is None
    prefect, mlflow_server = trainyard_stack.services(settings)[:2]
    assert "PREFECT_SERVER_DATABASE_CONNECTION_URL" not in prefect.extra_env  # SQLite under PREFECT_HOME
    argv = mlflow_server.argv
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert argv[argv.index("--artifacts-destination") + 1] == str(tmp_path / "mlflow" / "artifacts")
    assert not {"TRAINYARD_STORE_URL", "PREFECT_RESULTS_PERSIST_BY_DEFAULT"} & settings.client_env().keys()


def test_the_database_url_gives_three_databases_and_never_shows_its_password():
    database = Database.parse(f"postgresql://trainyard:{PG_PASSWORD}@db.internal:6432/ml")
    assert database.databases == ["ml", "ml_prefect", "ml_mlflow"]
    assert database.url("postgresql+asyncpg", database.prefect_database) == (
        "postgresql+asyncpg://trainyard@db.internal:6432/ml_prefect"
    )
    assert database.env() == {"PGPASSWORD": PG_PASSWORD}
    assert PG_PASSWORD not in repr(database) and PG_PASSWORD not in str(database)
    assert Database.parse("postgresql://db.internal").name == "trainyard"


def test_the_artifact_store_is_s3_or_local():
    store = ArtifactStore.parse("s3://ml-artifacts/team-a/")
    assert store.mlflow_destination == "s3://ml-artifacts/team-a/mlflow"
    assert store.results_folder == "team-a/prefect-results"
    assert ArtifactStore.parse("/data/models") is None and ArtifactStore.parse("file:///data/models") is None


# --- Errors before anything starts ---------------------------------------------------------------------------


def test_an_unreachable_database_stops_up_at_once_without_the_password(tmp_path):
    env = clean_env(tmp_path) | {
        "TRAINYARD_HOME": str(tmp_path / "home"),
        "TRAINYARD_PREFECT_PORT": str(free_port()),
        "TRAINYARD_MLFLOW_PORT": str(free_port()),
        "TRAINYARD_DATABASE_URL": f"postgresql://trainyard:{PG_PASSWORD}@127.0.0.1:{free_port()}/ml",
    }
    done = cli("up", "--role", "control", env=env, check=False, timeout=60)
    assert done.returncode == 2
    assert "PostgreSQL at 127.0.0.1" in done.stderr and "cannot be reached" in done.stderr
    assert "TRAINYARD_DATABASE_URL" in done.stderr and PG_PASSWORD not in done.stdout + done.stderr
    assert not (tmp_path / "home" / "pids").exists()  # nothing was started


def test_a_missing_bucket_stops_up_at_once_without_the_secret(tmp_path):
    moto, endpoint = start_moto()
    try:
        env = clean_env(tmp_path) | {
            "TRAINYARD_HOME": str(tmp_path / "home"),
            "TRAINYARD_PREFECT_PORT": str(free_port()),
            "TRAINYARD_MLFLOW_PORT": str(free_port()),
            "TRAINYARD_ARTIFACT_STORE": "s3://no-such-bucket/team",
            "TRAINYARD_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        done = cli("up", "--role", "control", env=env, check=False, timeout=60)
    finally:
        stop(moto)
    assert done.returncode == 2
    assert "TRAINYARD_ARTIFACT_STORE=s3://no-such-bucket/team" in done.stderr
    assert "Bucket 'no-such-bucket' does not exist" in done.stderr
    assert SECRET_KEY not in done.stdout + done.stderr
    assert not (tmp_path / "home" / "pids").exists()


def test_a_worker_host_without_its_control_host_says_where_it_looked(tmp_path):
    port = free_port()
    env = clean_env(tmp_path) | {"TRAINYARD_HOME": str(tmp_path / "home"), "TRAINYARD_PREFECT_PORT": str(port)}
    done = cli("up", "--role", "worker", env=env, check=False, timeout=60)
    assert done.returncode == 2
    assert f"Prefect server at http://127.0.0.1:{port}/api does not answer" in done.stderr
    assert "--role control" in done.stderr and "TRAINYARD_HOST" in done.stderr


# --- The control host on PostgreSQL and S3 -------------------------------------------------------------------


def test_prefect_mlflow_and_the_store_keep_their_tables_in_postgresql(shared):
    import psycopg

    database = shared.settings.database
    expected = {
        database.prefect_database: {"flow_run", "work_pool", "block_document", "alembic_version"},
        database.mlflow_database: {"experiments", "runs", "registered_models", "alembic_version"},
        database.name: {"compute_profiles", "attempts"},
    }
    for name, tables in expected.items():
        with psycopg.connect(f"{ADMIN_URL}/{name}") as connection:
            found = {row[0] for row in connection.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert tables <= found, f"{name}: {sorted(found)}"
    assert not (shared.settings.home / "prefect" / "prefect.db").exists()
    assert not (shared.settings.home / "mlflow" / "mlflow.db").exists()


def test_an_mlflow_artifact_goes_through_the_server_to_the_bucket(shared):
    """A training host with no S3 credentials logs an artifact; the MLflow server puts it in the bucket."""
    env = shared.client_env(shared.host_env("gpu-host-a"))
    done = python(
        """
        import os, mlflow
        assert not [k for k in os.environ if k.startswith("AWS_ACCESS") or k.startswith("AWS_SECRET")]
        mlflow.set_experiment("shared-artifacts")
        with mlflow.start_run() as run:
            mlflow.log_text("hello from a training host", "notes/hello.txt")
        print(run.info.experiment_id, run.info.run_id, run.info.artifact_uri)
        """,
        env,
    )
    experiment_id, run_id, artifact_uri = done.stdout.split()[-3:]
    assert artifact_uri.startswith("mlflow-artifacts:/")  # proxied: the client never sees the bucket
    key = f"team/mlflow/{experiment_id}/{run_id}/artifacts/notes/hello.txt"
    assert key in shared.objects("team/mlflow/")
    assert shared.s3.get_object(Bucket=shared.bucket, Key=key)["Body"].read() == b"hello from a training host"


def test_a_flow_result_is_persisted_to_the_bucket_and_read_on_another_host(shared):
    """Any host can resume a flow: its results are in S3, and the credentials come from the Prefect server."""
    flow = """
        from prefect import flow, task

        @task
        def double(x: int) -> int:
            return 2 * x

        @flow
        def tiny(x: int = 21) -> int:
            return double(x)

        state = tiny(return_state=True)
        print(state.state_details.flow_run_id, state.data.metadata.storage_key)
        """
    done = python(flow, shared.client_env(shared.host_env("gpu-host-a")))
    flow_run_id, storage_key = done.stdout.split()[-2:]
    results = shared.objects("team/prefect-results/")
    assert f"team/prefect-results/{storage_key}" in results
    assert len(results) >= 2  # the task's result too

    read_back = f"""
        from prefect.client.orchestration import get_client
        with get_client(sync_client=True) as client:
            print(client.read_flow_run("{flow_run_id}").state.result())
        """
    assert python(read_back, shared.client_env(shared.host_env("gpu-host-b"))).stdout.split()[-1] == "42"


def test_no_secret_in_logs_command_lines_env_file_or_client_env(shared):
    home = shared.settings.home
    printed = (
        cli("env", env=shared.control_env).stdout + cli("status", "--role", "control", env=shared.control_env).stdout
    )
    texts = {"client_env()": json.dumps(shared.settings.client_env()), "env output": printed}
    texts["settings repr"] = repr(shared.settings)
    texts |= {str(path): path.read_text(errors="replace") for path in (home / "logs").glob("*.log")}
    texts[str(home / "env")] = (home / "env").read_text()
    processes = _stack_processes(shared.settings)
    assert len(processes) >= 3
    texts |= {f"pid {p.pid} command line": " ".join(p.cmdline()) for p in processes}
    leaks = [where for where, text in texts.items() for secret in SECRETS if secret in text]
    assert not leaks, f"a secret shows in: {leaks}"
    # ...and the servers got what they need where it belongs: in their environment.
    prefect, mlflow_server = _running(shared.settings)[:2]
    assert prefect.environ()["PGPASSWORD"] == PG_PASSWORD
    assert prefect.environ()["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert mlflow_server.environ()["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY
    assert "AWS_SECRET_ACCESS_KEY" not in shared.settings.client_env()


def test_down_stops_everything_and_up_finds_the_state_again(shared, tmp_path):
    """Restarting the control host loses nothing: runs, artifacts and the pool are in PostgreSQL and S3."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=shared.settings.mlflow_uri)
    experiment = client.create_experiment(f"restart-{uuid.uuid4().hex[:6]}")
    run = client.create_run(experiment)
    client.log_text(run.info.run_id, "kept", "kept.txt")
    client.set_terminated(run.info.run_id)

    processes = _stack_processes(shared.settings)
    cli("down", env=shared.control_env)
    gone, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"still running after down: {[p.cmdline()[:3] for p in alive]}"
    assert not list((shared.settings.home / "pids").glob("*.pid"))
    for port in (shared.settings.prefect_port, shared.settings.mlflow_port):
        assert not trainyard_stack._port_open("127.0.0.1", port)

    up = cli("up", "--role", "control", env=shared.control_env)
    assert "created" not in up.stdout.split("database:")[1].splitlines()[0]  # the databases were there
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    local = client.download_artifacts(run.info.run_id, "kept.txt", str(tmp_path))
    assert Path(local).read_text() == "kept"
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(shared.settings.prefect_api) as prefect:
        assert prefect.read_work_pool(shared.settings.work_pool).name == shared.settings.work_pool


def test_a_worker_host_starts_and_stops_against_the_control_host(shared):
    env = shared.host_env("gpu-host-w")
    up = cli("up", "--role", "worker", "--pool", "gpu-host-w", "--name", "gpu-host-w-1", "--limit", "1", env=env)
    assert "work pool gpu-host-w: created" in up.stdout
    worker_settings = dataclasses.replace(Settings.from_env(env), work_pool="gpu-host-w")
    processes = _stack_processes(worker_settings)  # the worker and the warm-start server, no servers
    worker, warm_start = _running(worker_settings)[2:]
    assert warm_start is not None and {p.pid for p in processes} >= {worker.pid, warm_start.pid}
    assert worker is not None and worker.cmdline()[-4:] == ["--name", "gpu-host-w-1", "--limit", "1"]
    assert not [k for k in worker.environ() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    cli("down", env=env)
    gone, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive
