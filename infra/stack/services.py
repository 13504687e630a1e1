"""The stack: Prefect server, MLflow tracking server, a process worker and its warm start. Local state (logs, pids,
runs, and by default the SQLite databases and the artifact files) lives under TRAINYARD_HOME (default .trainyard/).

    python -m infra.stack up [--role all|control|worker] [--pool POOL] [--name NAME] [--limit N] | down | status | env

Roles: `all` (default) is everything on one host; `control` the servers only; `worker` a worker and its warm start
on a training host, for the servers at TRAINYARD_HOST. TRAINYARD_DATABASE_URL (PostgreSQL) and
TRAINYARD_ARTIFACT_STORE (s3://) switch the servers to the shared setup (infra/settings.py, docs/scale-out.md);
TRAINYARD_MLFLOW_ARTIFACTS=direct makes every host write MLflow artifacts to S3 itself.

`up` is idempotent: a service already running from this stack is reused; a port held by something else is
reported with the process that holds it and how to pick another port.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from infra.settings import RESULTS_BLOCK, ROOT, Database, Settings, SettingsError, get_settings
from infra.stack import embedded_postgres
from infra.stack.automations import HEARTBEAT_S, ensure_zombie_automation

BIN = Path(sys.executable).parent


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    port: int | None  # None: no port (the worker)
    health_url: str | None
    extra_env: dict[str, str]


ROLES = ("all", "control", "worker")


def services(settings: Settings) -> list[Service]:
    """The Prefect server, the MLflow server, the worker of the local pool and its warm start, in start order."""
    return [
        prefect_server_service(settings),
        mlflow_server_service(settings),
        worker_service(settings, settings.work_pool),
        warm_start_service(settings),
    ]


def prefect_server_service(settings: Settings) -> Service:
    """SQLite under TRAINYARD_HOME, or the <name>_prefect database of TRAINYARD_DATABASE_URL."""
    env = {"PREFECT_HOME": str(settings.home / "prefect"), "PREFECT_UI_API_URL": settings.prefect_api}
    if settings.database:
        database = settings.database
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database.url("postgresql+asyncpg", database.prefect_database)
        env.update(database.env())
    argv = [str(BIN / "prefect"), "server", "start", "--host", settings.listen_host]
    argv += ["--port", str(settings.prefect_port)]
    return Service("prefect-server", argv, settings.prefect_port, f"{settings.prefect_api}/health", env)


def mlflow_server_service(settings: Settings) -> Service:
    """Runs and models in SQLite or the <name>_mlflow database; artifacts as _mlflow_artifact_arguments says."""
    env = {}
    backend = f"sqlite:///{settings.home / 'mlflow' / 'mlflow.db'}"
    if settings.database:
        backend = settings.database.url("postgresql+psycopg", settings.database.mlflow_database)
        env.update(settings.database.env())
    if settings.artifact_store and settings.s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint  # also direct: the UI lists artifacts through the server
    argv = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        settings.listen_host,
        "--port",
        str(settings.mlflow_port),
        "--workers",
        "1",  # the default 4 is too many for a 2-core box
        "--backend-store-uri",
        backend,
        *_mlflow_artifact_arguments(settings),
        "--allowed-hosts",
        f"{settings.host}:{settings.mlflow_port},localhost:{settings.mlflow_port}",
    ]
    return Service("mlflow-server", argv, settings.mlflow_port, f"{settings.mlflow_uri}/health", env)


def _mlflow_artifact_arguments(settings: Settings) -> list[str]:
    """Proxied (default): clients send artifacts to the server, which writes them to a local directory or, alone
    holding S3 credentials (its environment), to S3. Direct: the server only records s3:// locations and
    refuses artifact uploads; each host writes to the bucket with its own credentials."""
    store = settings.artifact_store
    if store is None:
        return ["--artifacts-destination", str(settings.home / "mlflow" / "artifacts")]
    if settings.mlflow_artifacts == "direct":
        return ["--no-serve-artifacts", "--default-artifact-root", store.mlflow_destination]
    return ["--artifacts-destination", store.mlflow_destination]


def warm_start_service(settings: Settings) -> Service:
    """Forks each flow run of this host's process workers from a process with Prefect, torch and the flows
    imported (infra/runs/warm_start.py): a run starts in milliseconds instead of seconds."""
    return Service(
        "warm-start",
        [sys.executable, "-m", "infra.runs.warm_start", "serve", "--socket", str(settings.warm_socket)],
        None,
        None,
        _run_env(settings),
    )


def _run_env(settings: Settings) -> dict[str, str]:
    """What flow runs started on this host see, whether forked warm or started cold by a worker."""
    return {
        # Runs it starts send heartbeats; the zombie automation marks them Crashed when those stop.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
        "PREFECT_HOME": str(settings.home / "prefect"),
        # The job command `python -m infra.runs.warm_start` (infra/stack/work_pools.py) is this virtualenv's Python.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TRAINYARD_WARM_SOCKET": str(settings.warm_socket),
        # The platform store on PostgreSQL (shared setup): its password, if the URL has one.
        **(settings.database.env() if settings.database else {}),
    }


def worker_service(
    settings: Settings,
    pool: str,
    kind: str = "process",
    extra_env: dict[str, str] | None = None,
    *,
    name: str | None = None,
    limit: int | None = None,
) -> Service:
    """A Prefect worker for `pool` (the local pool by default; tests and GPU hosts start more). `name` is the
    worker's name on the server (default <hostname>-<pool>: two workers of one pool need two names); `limit`
    caps the flow runs it runs at once and leaves the rest to the pool's other workers."""
    service_name = "worker" if pool == settings.work_pool else f"worker-{pool}"
    argv = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", kind]
    argv += ["--name", name or f"{socket.gethostname()}-{pool}"]
    if limit is not None:
        argv += ["--limit", str(limit)]
    return Service(
        service_name,
        argv,
        None,
        None,
        {
            # Poll twice a second: the default 10 s makes a triggered run wait 11-13 s to start.
            "PREFECT_WORKER_QUERY_SECONDS": "0.5",
            "PREFECT_WORKER_HEARTBEAT_SECONDS": "10",
            **_run_env(settings),
            **(extra_env or {}),
        },
    )


def _pidfile(settings: Settings, service: Service) -> Path:
    return settings.home / "pids" / f"{service.name}.pid"


def running(settings: Settings, service: Service) -> psutil.Process | None:
    try:
        pid = int(_pidfile(settings, service).read_text())
        process = psutil.Process(pid)
    except (FileNotFoundError, ValueError, psutil.NoSuchProcess):
        return None
    return process if process.is_running() and process.status() != psutil.STATUS_ZOMBIE else None


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _holder(port: int) -> str:
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            try:
                return f"pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline()[:4])})"
            except psutil.NoSuchProcess:
                break
    return "another process"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start(settings: Settings, service: Service) -> None:
    if running(settings, service):
        print(f"  {service.name}: already running (reused)")
        return
    if service.port is not None and _port_open(settings.host, service.port):
        variable = "TRAINYARD_PREFECT_PORT" if service.name.startswith("prefect") else "TRAINYARD_MLFLOW_PORT"
        raise StackError(
            f"port {service.port} on {settings.host} is taken by {_holder(service.port)}, which is not this stack's "
            f"{service.name}. Stop it, or use another port: {variable}={service.port + 1} make up"
        )
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    _pidfile(settings, service).parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings.client_env(), **service.extra_env}
    with open(logs / f"{service.name}.log", "ab") as log:
        process = subprocess.Popen(
            service.argv,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives `make` exiting; stopped by `down`
        )
    _pidfile(settings, service).write_text(str(process.pid))
    print(f"  {service.name}: started (pid {process.pid}, log {logs / (service.name + '.log')})")


def _wait_healthy(settings: Settings, service: Service, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(service.health_url):
            return
        if not running(settings, service):
            log = settings.home / "logs" / f"{service.name}.log"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
            raise StackError(f"{service.name} exited during start-up; last lines of {log}:\n{tail}")
        time.sleep(0.5)
    raise StackError(f"{service.name} did not answer {service.health_url} within {timeout:.0f} s")


def ensure_work_pool(settings: Settings) -> None:
    """The local process pool, its job command the warm-start launcher (`infra.stack.apply` gives it the same)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    from infra.stack.work_pools import WARM_START_COMMAND, default_template

    template = default_template("process")
    template["variables"]["properties"]["command"]["default"] = WARM_START_COMMAND
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=settings.work_pool, type="process", base_job_template=template))
            print(f"  work pool {settings.work_pool}: created")
        except ObjectAlreadyExists:
            existing = client.read_work_pool(settings.work_pool).base_job_template
            if existing["variables"]["properties"].get("command", {}).get("default") is None:
                client.update_work_pool(settings.work_pool, WorkPoolUpdate(base_job_template=template))
            print(f"  work pool {settings.work_pool}: exists")


def _with_local_database(settings: Settings) -> Settings:
    """One host, no TRAINYARD_DATABASE_URL: its own PostgreSQL cluster when it can have one, else SQLite."""
    why_not = embedded_postgres.why_not(settings.home)
    if why_not:
        print(
            f"  database: SQLite under {settings.home} ({why_not}); under load its write lock stalls the Prefect "
            "server, see docs/monitoring.md"
        )
        return settings
    try:
        url = embedded_postgres.start(settings.home)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        raise StackError(
            f"the local PostgreSQL cluster in {embedded_postgres.directory(settings.home)} did not start: {error}. "
            "Its log is server.log there; TRAINYARD_LOCAL_DATABASE=sqlite runs the stack on SQLite instead"
        ) from None
    print(f"  postgresql: the stack's own cluster, data in {embedded_postgres.directory(settings.home)}")
    return dataclasses.replace(settings, database=Database.parse(url))


def write_env_file(settings: Settings) -> Path:
    path = settings.home / "env"
    path.write_text("".join(f"export {k}={v}\n" for k, v in settings.client_env().items()))
    return path


def up(
    settings: Settings,
    worker: bool = True,
    *,
    role: str | None = None,
    worker_name: str | None = None,
    limit: int | None = None,
) -> None:
    """Start this host's part of the stack: `all`, `control` (servers; also `worker=False`) or `worker`."""
    role = role or ("all" if worker else "control")
    print(f"Starting the Trainyard stack, role {role} (state in {settings.home})")
    settings.home.mkdir(parents=True, exist_ok=True)
    if role == "all" and settings.database is None:
        settings = _with_local_database(settings)
    (settings.home / "mlflow").mkdir(exist_ok=True)
    os.environ.update(settings.client_env())
    if settings.database:
        os.environ.update(settings.database.env())  # this process creates the store's tables
    if role == "worker":
        check_training_host(settings)  # before anything starts: its password and its S3 credentials
        check_control_host(settings)
    else:
        prepare_shared_storage(settings)  # databases and bucket first: a wrong setting fails before anything starts
        servers = services(settings)[:2]
        for service in servers:  # start both, then wait: they boot in parallel
            start(settings, service)
        for service in servers:
            _wait_healthy(settings, service)
    ensure_work_pool(settings)
    if role != "worker":
        if ensure_zombie_automation():
            print("  automation: zombie runs are marked Crashed after 60 s without a heartbeat")
        if settings.artifact_store:
            ensure_result_storage(settings)
        if settings.database:
            from infra.compute.store import Store

            Store()  # its tables, once here: twenty flow runs creating them at once would race
    elif settings.artifact_store:
        check_result_storage(settings)
    if role != "control":
        start(settings, warm_start_service(settings))
        start(settings, worker_service(settings, settings.work_pool, name=worker_name, limit=limit))
    env_file = write_env_file(settings)
    print(f"Prefect UI  {settings.prefect_ui}\nMLflow UI   {settings.mlflow_uri}\nCLI env     source {env_file}")


# --- the shared setup: PostgreSQL and S3 ------------------------------------------------------------------------


def prepare_shared_storage(settings: Settings) -> None:
    if settings.database:
        created = ensure_databases(settings.database)
        print(
            f"  database: {settings.database} (PostgreSQL; {', '.join(settings.database.databases)}"
            + (f"; created {', '.join(created)})" if created else ")")
        )
    if settings.artifact_store:
        check_artifact_store(settings)
        store = settings.artifact_store
        how = "written by each host to" if settings.mlflow_artifacts == "direct" else "proxied to"
        print(
            f"  artifacts: {store.uri()} (MLflow artifacts {how} {store.mlflow_destination}, "
            f"Prefect results in {store.uri('prefect-results')})"
        )


def _connect_postgres(database: Database, dbnames: tuple[str, ...] | None = None):
    """A connection to the first of `dbnames` that exists (default: a maintenance database of the server), or a
    StackError saying why not (never the password)."""
    import psycopg

    where = f"PostgreSQL at {database.host}:{database.port} (TRAINYARD_DATABASE_URL={database})"
    problem = ""
    for dbname in dbnames or ("postgres", database.name, "template1"):
        try:
            return psycopg.connect(
                host=database.host,
                port=database.port,
                user=database.user,
                password=database.password,
                dbname=dbname,
                connect_timeout=5,
                autocommit=True,
            )
        except psycopg.OperationalError as error:
            problem = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
            for secret in {database.password, os.environ.get("PGPASSWORD")} - {None, ""}:
                problem = problem.replace(secret, "***")
            if "does not exist" not in problem:  # unreachable, refused, authentication: another database won't help
                break
    if "password authentication failed" in problem or "no password supplied" in problem:
        raise StackError(_password_refused(database, where, problem))
    if "does not exist" in problem:
        raise StackError(
            f"{where}: {problem}. The control host creates Trainyard's databases: run `python -m infra.stack up "
            "--role control` there first, with the same TRAINYARD_DATABASE_URL"
        )
    raise StackError(
        f"{where} cannot be reached: {problem}. Start PostgreSQL, or fix the host, port or user in "
        "TRAINYARD_DATABASE_URL (give a password as PGPASSWORD or in ~/.pgpass); unset it for the embedded SQLite"
    )


def _password_refused(database: Database, where: str, problem: str) -> str:
    """The server wants a password it did not get: say which one was sent (never its value) and how to give it."""
    import getpass

    user = database.user or os.environ.get("PGUSER") or getpass.getuser()
    quoting = "percent-encoded: @ as %40, : as %3A, / as %2F, % as %25, # as %23"
    if database.password:
        sent = "the password in TRAINYARD_DATABASE_URL"
        fix = f"Correct it there ({quoting}), or leave it out of the URL and set PGPASSWORD"
    elif os.environ.get("PGPASSWORD"):
        sent = "the password in PGPASSWORD"
        fix = "Correct PGPASSWORD, or unset it to use ~/.pgpass"
    elif "no password supplied" in problem:
        sent = "no password (none in TRAINYARD_DATABASE_URL, PGPASSWORD or ~/.pgpass)"
        fix = f"Give {user}'s password as PGPASSWORD, in ~/.pgpass, or in TRAINYARD_DATABASE_URL ({quoting})"
    else:
        sent = "the password in ~/.pgpass (or PGPASSFILE)"
        fix = "Correct that file's line for this host, port and user, or set PGPASSWORD"
    return f"{where} refused user {user} with {sent}: {problem}. {fix}"


def ensure_databases(database: Database) -> list[str]:
    """Create the store's, Prefect's and MLflow's databases where missing; the names created."""
    import psycopg
    from psycopg import sql

    created = []
    with _connect_postgres(database) as connection:
        rows = connection.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", [database.databases])
        existing = {row[0] for row in rows}
        for name in database.databases:
            if name in existing:
                continue
            try:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                created.append(name)
            except psycopg.errors.DuplicateDatabase:
                pass  # another `up` made it meanwhile
            except psycopg.errors.InsufficientPrivilege:
                user = database.user or "<user>"
                raise StackError(
                    f"PostgreSQL user {user} may not create the database {name} ({database}). Create "
                    f"{', '.join(database.databases)} once as an administrator (createdb -O {user} {name}), or "
                    f"grant it: ALTER ROLE {user} CREATEDB"
                ) from None
    return created


def check_artifact_store(settings: Settings) -> None:
    """The bucket exists and this host's credentials reach it: the MLflow server will write there with them."""
    from infra.storage import StorageError
    from infra.storage.s3 import S3Settings, S3Storage
    from infra.storage.s3_errors import translated_errors

    store = settings.artifact_store
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    try:
        storage = S3Storage(store.bucket, store.prefix, S3Settings(endpoint_url=settings.s3_endpoint, region=region))
        with translated_errors(storage, "reach the artifact store", ""):
            storage.client.head_bucket(Bucket=store.bucket)
    except StorageError as error:
        raise StackError(f"TRAINYARD_ARTIFACT_STORE={store.uri()}: {error}") from None


def ensure_result_storage(settings: Settings) -> None:
    """The S3Bucket block every flow run persists its results to (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK), with the
    credentials block it uses: the one TRAINYARD_S3_CREDENTIALS_BLOCK names, else `trainyard-s3` made from this
    host's environment. Flow runs load both from the Prefect API: training hosts need no S3 credentials."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from infra.storage import StorageError
    from infra.storage.s3 import SECRET_BLOCK, load_credentials_block

    if settings.credentials_block:
        try:
            credentials = load_credentials_block(settings.credentials_block)
        except StorageError as error:
            fallback = "Or unset it to use this host's AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
            raise StackError(f"{error} {fallback}") from None
    else:
        env = os.environ
        credentials = AwsCredentials(
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            aws_client_parameters=AwsClientParameters(endpoint_url=settings.s3_endpoint),
        )
        credentials.save(settings.s3_credentials_block, overwrite=True)  # follows the keys when they are rotated
    store = settings.artifact_store
    bucket = S3Bucket(bucket_name=store.bucket, bucket_folder=store.results_folder, credentials=credentials)
    bucket.save(RESULTS_BLOCK, overwrite=True)
    source = settings.s3_credentials_block
    source = source if source.startswith(SECRET_BLOCK) else f"aws-credentials/{source}"
    print(f"  result storage: s3-bucket/{RESULTS_BLOCK} (credentials {source})")


def check_result_storage(settings: Settings) -> None:
    """The control host made the results block (a worker host cannot: it has no S3 credentials)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:  # no secrets read, no block-loaded event sent
            client.read_block_document_by_name(RESULTS_BLOCK, "s3-bucket", include_secrets=False)
    except ObjectNotFound:
        raise StackError(
            f"the Prefect server at {settings.prefect_api} has no s3-bucket/{RESULTS_BLOCK} block for flow results: "
            "start the control host with the same TRAINYARD_ARTIFACT_STORE (python -m infra.stack up --role control)"
        ) from None


def check_training_host(settings: Settings) -> None:
    """What this host's flow runs will need on their own, checked before its worker starts: the platform store's
    database with this host's password, and, with direct MLflow artifacts, S3 credentials that reach the bucket."""
    from infra.storage.mlflow_artifacts import MissingS3Credentials, require_s3_credentials

    if settings.database and not settings.own_store_url:
        _connect_postgres(settings.database, (settings.database.name,)).close()
    if settings.mlflow_artifacts == "direct":
        try:
            require_s3_credentials(settings.artifact_store.mlflow_destination, "TRAINYARD_MLFLOW_ARTIFACTS=direct")
        except MissingS3Credentials as error:
            raise StackError(str(error)) from None
        check_artifact_store(settings)  # wrong keys or endpoint: said here, not at the first upload


def check_control_host(settings: Settings) -> None:
    """A worker host needs the control host's servers: say which one does not answer, and how to point at it."""
    for name, url in (
        ("Prefect server", settings.prefect_api),
        ("MLflow server", settings.client_env()["MLFLOW_TRACKING_URI"]),
    ):
        if not _healthy(f"{url}/health"):
            raise StackError(
                f"the {name} at {url} does not answer. Start the control host first (python -m infra.stack up "
                "--role control there), and set TRAINYARD_HOST (and TRAINYARD_PREFECT_PORT, TRAINYARD_MLFLOW_PORT) "
                "here to reach it"
            )


def _stop(process: psutil.Process, name: str, gentle: signal.Signals) -> None:
    group = [process, *process.children(recursive=True)]
    # A Prefect worker ignores one SIGTERM for a long time; two SIGINTs stop it promptly.
    for _ in range(2 if gentle == signal.SIGINT else 1):
        for proc in group:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(gentle)
        time.sleep(0.3)
    _, alive = psutil.wait_procs(group, timeout=15)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=5)
    print(f"  {name}: stopped")


def stop(settings: Settings, service: Service) -> None:
    process = running(settings, service)
    if process:
        _stop(process, service.name, signal.SIGINT if service.name.startswith("worker") else signal.SIGTERM)
    _pidfile(settings, service).unlink(missing_ok=True)


def down(settings: Settings) -> None:
    """Stop every worker this stack started (any pool), then the servers."""
    extra_workers = [Service(pid.stem, [], None, None, {}) for pid in (settings.home / "pids").glob("worker-*.pid")]
    for service in [*extra_workers, *reversed(services(settings))]:
        stop(settings, service)
    if embedded_postgres.stop(settings.home):
        print("  postgresql: stopped")


def status(settings: Settings, role: str = "all") -> bool:
    ok = True
    chosen = {"all": services(settings), "control": services(settings)[:2], "worker": services(settings)[2:]}[role]
    if role != "worker":
        local = embedded_postgres.running_url(settings.home)
        where = f"local PostgreSQL ({local})" if local else (str(settings.database) if settings.database else "SQLite")
        print(f"  {'database':15} {where}")
    for service in chosen:
        process = running(settings, service)
        healthy = process is not None and (service.health_url is None or _healthy(service.health_url))
        ok &= healthy
        print(f"  {service.name:15} {'up' if healthy else 'down'}" + (f" (pid {process.pid})" if process else ""))
    if role == "worker":
        try:
            check_control_host(settings)
            print(f"  control host    up ({settings.prefect_api})")
        except StackError as error:
            print(f"  control host    down: {error}")
            ok = False
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help="all: everything on this host (default); control: the servers only; worker: a worker and its warm "
        "start for the servers at TRAINYARD_HOST",
    )
    parser.add_argument("--no-worker", action="store_true", help="the servers only (the same as --role control)")
    parser.add_argument("--pool", help="the work pool this host's worker serves (default TRAINYARD_WORK_POOL)")
    parser.add_argument("--name", help="the worker's name on the Prefect server (default <hostname>-<pool>)")
    parser.add_argument("--limit", type=int, help="flow runs the worker runs at once (default: no limit)")
    args = parser.parse_args(argv)
    role = "control" if args.no_worker else args.role
    try:
        settings = get_settings()
        if args.pool:
            settings = dataclasses.replace(settings, work_pool=args.pool)
        if args.command == "up":
            up(settings, role=role, worker_name=args.name, limit=args.limit)
        elif args.command == "down":
            down(settings)
        elif args.command == "status":
            return 0 if status(settings, role) else 1
        else:
            print("".join(f"export {k}={v}\n" for k, v in settings.client_env().items()), end="")
    except (StackError, SettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
