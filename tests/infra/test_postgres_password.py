"""The shared setup (docs/scale-out.md) on a PostgreSQL server that checks passwords.

The machine's own server trusts local connections, so tests/infra/test_shared_stack.py cannot tell a right password
from a wrong one. This module starts a throwaway cluster of its own (initdb --auth=scram-sha-256, on 127.0.0.1 and
a free port, as the `postgres` OS user when run as root), with a user that may create databases and a random
password full of characters a URL must percent-encode. Then: `python -m infra.stack up --role control` with the
right password runs Prefect, MLflow and the platform store on that cluster; a wrong, missing or unquoted password
stops `up` at once with the fix; the password shows in no log, command line, env file or `env` output. The cluster
is stopped and deleted at the end of the module. Without the PostgreSQL binaries (TRAINYARD_TEST_PG_BIN, default
the newest /usr/lib/postgresql/*/bin) or, as root, without runuser and a `postgres` user, the module skips and says
what is missing.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
from pg_cluster import missing_programs, throwaway_cluster
from test_shared_stack import _stack_processes, clean_env, cli, deploy_torch_demo, python, train_on_a_worker
from waiting import free_port

from infra.settings import Settings
from infra.stack import services as trainyard_stack

USER = "ty_pw_user"
# Random per run, and every character that breaks a URL unless percent-encoded: @ : / % #
PASSWORD = f"p@ss:w/rd%#{secrets.token_hex(6)}"
POOL = "trainyard-local"  # the torch demo deployment's pool (prefect.yaml), served by the worker host
WRONG_PASSWORD = f"wr@ng:p/ss%#{secrets.token_hex(6)}"
SECRETS = (PASSWORD, quote(PASSWORD, safe=""), WRONG_PASSWORD, quote(WRONG_PASSWORD, safe=""))


@dataclass(frozen=True)
class Cluster:
    """A running throwaway PostgreSQL cluster: the superuser `postgres` and USER, both with passwords."""

    port: int
    root: Path
    superuser_password: str
    host: str = "127.0.0.1"

    def url(self, name: str, password: str | None = PASSWORD) -> str:
        """TRAINYARD_DATABASE_URL for USER, the password percent-encoded as a user must write it."""
        login = f"{USER}:{quote(password, safe='')}" if password is not None else USER
        return f"postgresql://{login}@{self.host}:{self.port}/{name}"

    def connect(self, dbname: str = "postgres", *, admin: bool = False):
        import psycopg

        user, password = ("postgres", self.superuser_password) if admin else (USER, PASSWORD)
        return psycopg.connect(
            host=self.host, port=self.port, user=user, password=password, dbname=dbname, autocommit=True
        )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if missing := missing_programs():
        pytest.skip(f"needs PostgreSQL's server programs to start a cluster with passwords; missing: {missing}")
    from psycopg import sql

    superuser_password = secrets.token_urlsafe(16)
    with throwaway_cluster(free_port(), superuser_password=superuser_password) as started:
        running = Cluster(started.port, started.root, superuser_password)
        with running.connect(admin=True) as admin:
            role = sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}")
            admin.execute(role.format(sql.Identifier(USER), sql.Literal(PASSWORD)))
        yield running


def _env(cluster: Cluster, home: Path, database_url: str) -> dict[str, str]:
    """A control host's environment: its own TRAINYARD_HOME and ports, no PG* variables unless a test adds one."""
    return clean_env(home) | {
        "TRAINYARD_HOME": str(home / "home"),
        "TRAINYARD_HOST": "127.0.0.1",
        "TRAINYARD_PREFECT_PORT": str(free_port()),
        "TRAINYARD_MLFLOW_PORT": str(free_port()),
        "TRAINYARD_DATABASE_URL": database_url,
    }


def _leaks(texts: dict[str, str]) -> list[str]:
    return [where for where, text in texts.items() for secret in SECRETS if secret in text]


# --- The cluster really checks passwords ---------------------------------------------------------------------


def test_the_cluster_takes_only_the_right_password(cluster):
    import psycopg

    with cluster.connect(admin=True) as admin:
        methods = {row[0] for row in admin.execute("SELECT auth_method FROM pg_hba_file_rules")}
        (verifier,) = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", [USER]).fetchone()
    assert methods == {"scram-sha-256"}  # no `trust`, no `peer`: every connection shows a password
    assert verifier.startswith("SCRAM-SHA-256$")
    with cluster.connect() as connection:
        assert connection.execute("SELECT current_user").fetchone()[0] == USER
    for password, says in ((WRONG_PASSWORD, "password authentication failed"), (None, "no password supplied")):
        with pytest.raises(psycopg.OperationalError, match=says):
            psycopg.connect(host=cluster.host, port=cluster.port, user=USER, password=password, dbname="postgres")


# --- A wrong password stops `up` before anything starts ------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("url", ["the password in TRAINYARD_DATABASE_URL", "password authentication failed", "%40", "PGPASSWORD"]),
        ("PGPASSWORD", ["the password in PGPASSWORD", "password authentication failed", "Correct PGPASSWORD"]),
        ("none", ["no password", "no password supplied", "as PGPASSWORD", "%40"]),
        ("pgpass", ["the password in ~/.pgpass", "password authentication failed", "or set PGPASSWORD"]),
        ("unquoted", ["not a database URL", "percent-encoded", "%40", "PGPASSWORD"]),
    ],
)
def test_a_wrong_password_stops_up_at_once_with_the_fix(cluster, tmp_path, given, says):
    name = f"ty_wrong_{uuid.uuid4().hex[:8]}"
    url = {
        "url": cluster.url(name, WRONG_PASSWORD),
        "PGPASSWORD": cluster.url(name, None),
        "none": cluster.url(name, None),
        "pgpass": cluster.url(name, None),
        "unquoted": f"postgresql://{USER}:{PASSWORD}@{cluster.host}:{cluster.port}/{name}",  # as typed, unencoded
    }[given]
    env = _env(cluster, tmp_path, url) | ({"PGPASSWORD": WRONG_PASSWORD} if given == "PGPASSWORD" else {})
    env["PGPASSFILE"] = str(tmp_path / "pgpass")  # not ~/.pgpass of whoever runs the tests
    if given == "pgpass":
        escaped = WRONG_PASSWORD.replace("\\", "\\\\").replace(":", "\\:")
        Path(env["PGPASSFILE"]).write_text(f"{cluster.host}:{cluster.port}:*:{USER}:{escaped}\n")
        Path(env["PGPASSFILE"]).chmod(0o600)
    done = cli("up", "--role", "control", env=env, check=False, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: "), error
    if given != "unquoted":  # a URL that does not parse names no server
        assert f"PostgreSQL at {cluster.host}:{cluster.port}" in error and f"user {USER}" in error, error
    for words in says:
        assert words in error, error
    assert not _leaks({"stdout": done.stdout, "stderr": done.stderr}), error
    home = Path(env["TRAINYARD_HOME"])
    assert not (home / "pids").exists() and not (home / "logs").exists()  # nothing was started
    for port in (env["TRAINYARD_PREFECT_PORT"], env["TRAINYARD_MLFLOW_PORT"]):
        assert not trainyard_stack._port_open("127.0.0.1", int(port))
    with cluster.connect(admin=True) as admin:
        assert not admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", [f"{name}%"]).fetchall()


# --- The right password: the control host on the cluster ----------------------------------------------------


@dataclass(frozen=True)
class Control:
    settings: Settings
    env: dict[str, str]
    up_output: str


@pytest.fixture(scope="module")
def control(cluster, tmp_path_factory) -> Iterator[Control]:
    env = _env(cluster, tmp_path_factory.mktemp("pg-password"), cluster.url("ty_pw"))
    env["PGPASSFILE"] = env["TRAINYARD_HOME"] + "-no-pgpass"  # the password comes from the URL alone
    try:
        up = cli("up", "--role", "control", env=env)
        yield Control(Settings.from_env(env), env, up.stdout)
    finally:
        cli("down", env=env, check=False)


def test_prefect_mlflow_and_the_store_keep_their_data_in_the_password_cluster(control, cluster):
    from mlflow import MlflowClient

    database = control.settings.database
    assert (database.user, database.password, database.port) == (USER, PASSWORD, cluster.port)
    assert f"database: postgresql://{USER}@127.0.0.1:{cluster.port}/ty_pw" in control.up_output
    assert "created ty_pw, ty_pw_prefect, ty_pw_mlflow" in control.up_output

    mlflow_client = MlflowClient(tracking_uri=control.settings.mlflow_uri)
    experiment = mlflow_client.create_experiment(f"pg-password-{uuid.uuid4().hex[:6]}")
    run = mlflow_client.create_run(experiment)
    mlflow_client.log_metric(run.info.run_id, "loss", 0.25)
    mlflow_client.set_terminated(run.info.run_id)

    flow = """
        from prefect import flow

        @flow
        def tiny(x: int = 21) -> int:
            return 2 * x

        state = tiny(return_state=True)
        print(state.state_details.flow_run_id, state.result())
        """
    printed = cli("env", env=control.env).stdout
    client_env = control.env | dict(line.removeprefix("export ").split("=", 1) for line in printed.splitlines())
    flow_run_id, result = python(flow, client_env).stdout.split()[-2:]
    assert result == "42"

    # ...and it is all in the cluster, read back with USER's password.
    with cluster.connect(database.mlflow_database) as mlflow_db:
        row = mlflow_db.execute("SELECT status FROM runs WHERE run_uuid = %s", [run.info.run_id]).fetchone()
        assert row == ("FINISHED",)
        assert mlflow_db.execute("SELECT value FROM metrics WHERE run_uuid = %s", [run.info.run_id]).fetchone() == (
            0.25,
        )
    with cluster.connect(database.prefect_database) as prefect_db:
        row = prefect_db.execute("SELECT state_type FROM flow_run WHERE id = %s", [flow_run_id]).fetchone()
        assert row is not None and row[0] == "COMPLETED"
        pools = {r[0] for r in prefect_db.execute("SELECT name FROM work_pool")}
        assert control.settings.work_pool in pools  # made by `up`
    with cluster.connect(database.name) as store_db:
        tables = {r[0] for r in store_db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"compute_profiles", "attempts"} <= tables
    with cluster.connect(admin=True) as admin:
        owners = admin.execute(
            "SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname = ANY(%s)", [database.databases]
        ).fetchall()
    assert dict(owners) == dict.fromkeys(database.databases, USER)  # `up` made them, logged in as USER
    assert not (control.settings.home / "prefect" / "prefect.db").exists()
    assert not (control.settings.home / "mlflow" / "mlflow.db").exists()


def test_the_password_shows_in_no_log_command_line_env_file_or_env_output(control):
    home = control.settings.home
    printed = cli("env", env=control.env).stdout + cli("status", "--role", "control", env=control.env).stdout
    texts = {"env output": printed, "client_env()": repr(control.settings.client_env())}
    texts["settings repr"] = repr(control.settings)
    texts["up output"] = control.up_output
    texts |= {str(path): path.read_text(errors="replace") for path in (home / "logs").glob("*.log")}
    texts[str(home / "env")] = (home / "env").read_text()
    processes = _stack_processes(control.settings)
    assert len(processes) >= 2
    texts |= {f"pid {p.pid} command line": " ".join(p.cmdline()) for p in processes}
    assert not _leaks(texts), f"the password shows in: {_leaks(texts)}"
    # The servers got it where it belongs: PGPASSWORD in their environment, decoded from the URL.
    for service in trainyard_stack.services(control.settings)[:2]:  # the Prefect server, the MLflow server
        assert trainyard_stack.running(control.settings, service).environ()["PGPASSWORD"] == PASSWORD
    assert "PGPASSWORD" not in control.settings.client_env()


# --- A training host on the same cluster ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerHost:
    settings: Settings
    env: dict[str, str]
    up_output: str


def _shell(env: dict[str, str]) -> dict[str, str]:
    """A host's shell after `source .trainyard/env`: its environment and what `infra.stack env` prints."""
    printed = cli("env", env=env).stdout
    return env | dict(line.removeprefix("export ").split("=", 1) for line in printed.splitlines())


@pytest.fixture(scope="module")
def worker_host(control, tmp_path_factory) -> Iterator[WorkerHost]:
    """The torch demo deployed from the control host's shell (which has PGPASSWORD for the store, as the docs
    say), then `up --role worker` on a host of its own: the same URL with the password percent-encoded in it."""
    deploy_torch_demo(_shell(control.env) | {"PGPASSWORD": PASSWORD})
    home = tmp_path_factory.mktemp("pg-password-worker")
    env = control.env | {"TRAINYARD_HOME": str(home / "home"), "PGPASSFILE": str(home / "no-pgpass")}
    try:
        up = cli("up", "--role", "worker", "--pool", POOL, "--name", "pw-gpu-host", env=env)
        yield WorkerHost(Settings.from_env(env), env, up.stdout)
    finally:
        cli("down", env=env, check=False)


def test_a_training_run_through_the_worker_host_records_in_the_password_cluster(cluster, worker_host, shapes_cls):
    settings = worker_host.settings
    experiment = f"pw-worker-{uuid.uuid4().hex[:6]}"
    run = train_on_a_worker(settings.prefect_api, shapes_cls, experiment)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    worker_log = (settings.home / "logs" / "worker.log").read_text(errors="replace")
    assert f"Worker 'pw-gpu-host' submitting flow run '{run.id}'" in worker_log  # this host ran it

    database = settings.database
    with cluster.connect(database.mlflow_database) as mlflow_db:
        runs = mlflow_db.execute(
            "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "JOIN experiments e ON e.experiment_id = r.experiment_id "
            "WHERE t.key = 'prefect.flow_run_id' AND t.value = %s AND e.name = %s",
            [str(run.id), experiment],
        ).fetchall()
        assert [status for _, status in runs] == ["FINISHED"]
        recorded = mlflow_db.execute(
            "SELECT key || '=' || value FROM params WHERE run_uuid = %(run)s "
            "UNION ALL SELECT key || '=' || value FROM tags WHERE run_uuid = %(run)s "
            "UNION ALL SELECT key FROM metrics WHERE run_uuid = %(run)s",
            {"run": runs[0][0]},
        ).fetchall()
    with cluster.connect(database.name) as store_db:
        attempts = store_db.execute("SELECT * FROM attempts WHERE request_id = %s", [str(run.id)]).fetchall()
        outcomes = store_db.execute("SELECT outcome FROM attempts WHERE request_id = %s", [str(run.id)]).fetchall()
    assert outcomes == [("completed",)]  # the ledger, written from the worker host's flow run
    with cluster.connect(database.prefect_database) as prefect_db:
        (parameters,) = prefect_db.execute("SELECT parameters::text FROM flow_run WHERE id = %s", [run.id]).fetchone()
        logs = [row[0] for row in prefect_db.execute("SELECT message FROM log WHERE flow_run_id = %s", [run.id])]
    assert logs, "the flow run sent no logs"

    texts = {
        "MLflow params, tags and metric names": "\n".join(row[0] for row in recorded),
        "attempts rows": repr(attempts),
        "flow run parameters": parameters,
        "flow run logs": "\n".join(logs),
        "worker host up output": worker_host.up_output,
        "worker host env output": cli("env", env=worker_host.env).stdout,
        "worker host status": cli("status", "--role", "worker", env=worker_host.env).stdout,
        str(settings.home / "env"): (settings.home / "env").read_text(),
    }
    texts |= {str(path): path.read_text(errors="replace") for path in (settings.home / "logs").glob("*.log")}
    processes = _stack_processes(settings)  # the worker and the warm-start server (flow runs are forked from it)
    assert len(processes) >= 2
    texts |= {f"pid {p.pid} command line": " ".join(p.cmdline()) for p in processes}
    assert not _leaks(texts), f"the password shows in: {_leaks(texts)}"
    for service in trainyard_stack.services(settings)[2:]:  # where it belongs: the worker's and warm start's env
        assert trainyard_stack.running(settings, service).environ()["PGPASSWORD"] == PASSWORD


@pytest.mark.parametrize("given", ["url", "PGPASSWORD", "none"])
def test_a_wrong_or_missing_password_stops_the_worker_host_as_it_stops_the_control_host(control, tmp_path, given):
    """The worker host checks its password before it starts anything, with the control host's one-line error."""
    right = control.env["TRAINYARD_DATABASE_URL"]  # the password percent-encoded in it
    if given == "url":
        url = right.replace(quote(PASSWORD, safe=""), quote(WRONG_PASSWORD, safe=""))
    else:
        url = right.replace(f":{quote(PASSWORD, safe='')}@", "@")
    env = control.env | {"TRAINYARD_HOME": str(tmp_path / "worker"), "TRAINYARD_DATABASE_URL": url}
    env |= {"PGPASSWORD": WRONG_PASSWORD} if given == "PGPASSWORD" else {}
    worker = cli("up", "--role", "worker", "--pool", "pw-refused", env=env, check=False, timeout=120)
    as_control = cli("up", "--role", "control", env=env | {"TRAINYARD_HOME": str(tmp_path / "c")}, check=False)
    assert worker.returncode == 2, worker.stdout + worker.stderr
    error = worker.stderr.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: PostgreSQL at "), error
    assert error == as_control.stderr.strip()  # word for word what the control host says
    assert f"refused user {USER}" in error and ("PGPASSWORD" in error), error
    assert not _leaks({"stdout": worker.stdout, "stderr": worker.stderr})
    assert not (tmp_path / "worker" / "pids").exists() and not (tmp_path / "worker" / "logs").exists()


def test_down_leaves_nothing_running(control):
    processes = _stack_processes(control.settings)
    cli("down", env=control.env)
    gone, alive = psutil.wait_procs(processes, timeout=15)
    assert not alive, f"still running after down: {[p.cmdline()[:3] for p in alive]}"
    for port in (control.settings.prefect_port, control.settings.mlflow_port):
        assert not trainyard_stack._port_open("127.0.0.1", port)
