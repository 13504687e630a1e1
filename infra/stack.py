"""The embedded local stack: Prefect server (SQLite), MLflow tracking server (SQLite + local artifacts), one
process worker. All state lives under TRAINYARD_HOME (default .trainyard/ in the repo).

    python -m infra.stack up | down | status | env

`up` is idempotent: a service already running from this stack is reused; a port held by something else is
reported with the process that holds it and how to pick another port.
"""

from __future__ import annotations

import argparse
import contextlib
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

from infra.automations import HEARTBEAT_S, ensure_zombie_automation
from infra.settings import ROOT, Settings

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


def services(settings: Settings) -> list[Service]:
    home = settings.home
    return [
        Service(
            "prefect-server",
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                settings.host,
                "--port",
                str(settings.prefect_port),
            ],
            settings.prefect_port,
            f"{settings.prefect_api}/health",
            {"PREFECT_HOME": str(home / "prefect"), "PREFECT_UI_API_URL": settings.prefect_api},
        ),
        Service(
            "mlflow-server",
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                settings.host,
                "--port",
                str(settings.mlflow_port),
                "--workers",
                "1",  # the default 4 is too many for a 2-core box
                "--backend-store-uri",
                f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
                "--artifacts-destination",
                str(home / "mlflow" / "artifacts"),
                "--allowed-hosts",
                f"{settings.host}:{settings.mlflow_port},localhost:{settings.mlflow_port}",
            ],
            settings.mlflow_port,
            f"{settings.mlflow_uri}/health",
            {},
        ),
        worker_service(settings, settings.work_pool),
        warm_start_service(settings),
    ]


def warm_start_service(settings: Settings) -> Service:
    """Forks each flow run of this host's process workers from a process with Prefect, torch and the flows
    imported (infra/warm_start.py): a run starts in milliseconds instead of seconds."""
    return Service(
        "warm-start",
        [sys.executable, "-m", "infra.warm_start", "serve", "--socket", str(settings.warm_socket)],
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
        # The job command `python -m infra.warm_start` (infra/work_pools.py) is this virtualenv's Python.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TRAINYARD_WARM_SOCKET": str(settings.warm_socket),
    }


def worker_service(
    settings: Settings, pool: str, kind: str = "process", extra_env: dict[str, str] | None = None
) -> Service:
    """A Prefect worker for `pool` (the local pool by default; tests and GPU hosts start more)."""
    name = "worker" if pool == settings.work_pool else f"worker-{pool}"
    return Service(
        name,
        [
            str(BIN / "prefect"),
            "worker",
            "start",
            "--pool",
            pool,
            "--type",
            kind,
            "--name",
            f"{socket.gethostname()}-{pool}",
        ],
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


def _wait_healthy(settings: Settings, service: Service, timeout: float = 120) -> None:
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
    """The local process pool, its job command the warm-start launcher (`infra.apply` gives it the same)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    from infra.work_pools import WARM_START_COMMAND, default_template

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


def write_env_file(settings: Settings) -> Path:
    path = settings.home / "env"
    path.write_text("".join(f"export {k}={v}\n" for k, v in settings.client_env().items()))
    return path


def up(settings: Settings, worker: bool = True) -> None:
    print(f"Starting the Trainyard stack (state in {settings.home})")
    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "mlflow").mkdir(exist_ok=True)
    os.environ.update(settings.client_env())
    servers, worker_service, warm_start = services(settings)[:2], services(settings)[2], services(settings)[3]
    for service in servers:  # start both, then wait: they boot in parallel
        start(settings, service)
    for service in servers:
        _wait_healthy(settings, service)
    ensure_work_pool(settings)
    if ensure_zombie_automation():
        print("  automation: zombie runs are marked Crashed after 60 s without a heartbeat")
    if worker:
        start(settings, warm_start)
        start(settings, worker_service)
    env_file = write_env_file(settings)
    print(f"Prefect UI  {settings.prefect_ui}\nMLflow UI   {settings.mlflow_uri}\nCLI env     source {env_file}")


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


def status(settings: Settings) -> bool:
    ok = True
    for service in services(settings):
        process = running(settings, service)
        healthy = process is not None and (service.health_url is None or _healthy(service.health_url))
        ok &= healthy
        print(f"  {service.name:15} {'up' if healthy else 'down'}" + (f" (pid {process.pid})" if process else ""))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--no-worker", action="store_true", help="start the servers only")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    try:
        if args.command == "up":
            up(settings, worker=not args.no_worker)
        elif args.command == "down":
            down(settings)
        elif args.command == "status":
            return 0 if status(settings) else 1
        else:
            print("".join(f"export {k}={v}\n" for k, v in settings.client_env().items()), end="")
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
