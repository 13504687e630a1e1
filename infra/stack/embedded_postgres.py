"""The one-host stack's databases on a PostgreSQL cluster of its own, under TRAINYARD_HOME/postgres.

On SQLite, the Prefect server stalls on the database's write lock when several trainings, workers and its own
services write at once (`database is locked`, up to 60 s). Heartbeats then wait, workers look offline and live runs
were declared dead on a loaded machine (docs/monitoring.md, "On a busy machine"). So `make up` (role all) runs
Prefect, MLflow and the platform store on PostgreSQL when PostgreSQL's server programs are installed (Debian:
`apt-get install postgresql`; its system service is not needed), with the same settings as the shared setup's
TRAINYARD_DATABASE_URL (infra/settings.py). Without the programs, or with TRAINYARD_LOCAL_DATABASE=sqlite, or when
this home already holds SQLite databases from before, everything stays on SQLite and `up` says so.

The cluster listens on 127.0.0.1 only, trusts that address, and keeps its data between `up`s; `down` stops it.
While it runs, URL_FILE holds its TRAINYARD_DATABASE_URL, which Settings.from_env reads for every process.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
from pathlib import Path

URL_FILE = "url"  # under <home>/postgres
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROGRAMS = ("initdb", "pg_ctl", "postgres")


def directory(home: Path) -> Path:
    return home / "postgres"


def running_url(home: Path) -> str | None:
    """The cluster's TRAINYARD_DATABASE_URL while `up` has it running, else None."""
    path = directory(home) / URL_FILE
    return path.read_text().strip() if path.is_file() else None


def programs() -> Path | None:
    """The newest PostgreSQL's bin directory (TRAINYARD_PG_BIN, else Debian's /usr/lib/postgresql/*/bin, else
    PATH), or None when its server programs are not installed."""
    candidates = [os.environ.get("TRAINYARD_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    candidates.append(str(Path(shutil.which("pg_ctl") or "/nonexistent").parent))
    for bin_dir in filter(None, candidates):
        if all(os.access(Path(bin_dir) / name, os.X_OK) for name in PROGRAMS):
            return Path(bin_dir)
    return None


def why_not(home: Path) -> str | None:
    """Why this home stays on SQLite (None: it can have its own cluster)."""
    choice = os.environ.get("TRAINYARD_LOCAL_DATABASE", "").strip().lower()
    if choice == "sqlite":
        return "TRAINYARD_LOCAL_DATABASE=sqlite"
    if (home / "mlflow" / "mlflow.db").exists() or (home / "prefect" / "prefect.db").exists():
        return (
            f"{home} holds SQLite databases from before (runs and models stay there); to move to PostgreSQL, "
            f"`make clean` (it deletes them) or point TRAINYARD_HOME elsewhere"
        )
    if programs() is None:
        return "PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)"
    if os.geteuid() == 0 and not _postgres_user():
        return "no `postgres` OS user to run PostgreSQL as (it refuses to run as root)"
    if os.geteuid() == 0 and not _postgres_can_reach(home):
        return (
            f"the postgres OS user cannot reach {home} (a folder above it is private to root); give TRAINYARD_HOME "
            "a path it can enter"
        )
    return None


def start(home: Path) -> str:
    """Create the cluster on first use, start it, and return its TRAINYARD_DATABASE_URL."""
    bin_dir, root = programs(), directory(home)
    data, log, port_file = root / "data", root / "server.log", root / "port"
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    if not (data / "PG_VERSION").exists():
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8"]
        _run(*initdb, "--locale=C")
        port_file.write_text(str(_free_port()))
    port = int(port_file.read_text())
    if not _is_running(bin_dir, data):
        # No Unix socket (its path could exceed 108 bytes under a deep home): TCP on 127.0.0.1 only. Prefect's and
        # MLflow's servers and every worker keep connection pools: more than the default 100 connections.
        options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories= -c max_connections=300"
        _run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    url = f"postgresql://postgres@127.0.0.1:{port}/trainyard"
    (root / URL_FILE).write_text(url + "\n")
    return url


def stop(home: Path) -> bool:
    """Stop the cluster if it runs (its data stays); True when it was stopped here."""
    root = directory(home)
    (root / URL_FILE).unlink(missing_ok=True)
    bin_dir, data = programs(), root / "data"
    if bin_dir is None or not _is_running(bin_dir, data):
        return False
    _run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
    return True


def _is_running(bin_dir: Path, data: Path) -> bool:
    return data.is_dir() and _run(str(bin_dir / "pg_ctl"), "-D", str(data), "status", check=False).returncode == 0


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """A PostgreSQL program, as the `postgres` user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() == 0:
        argv = (shutil.which("runuser", path=SYSTEM_PATH) or "runuser", "-u", "postgres", "--", *argv)
    env = {"PATH": SYSTEM_PATH, "LC_ALL": "C", "LANG": "C"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        program = next(Path(a).name for a in argv[argv.index("--") + 1 if "--" in argv else 0 :])
        raise RuntimeError(f"{program} failed: {(done.stderr or done.stdout).strip()}")
    return done


def _postgres_user() -> bool:
    import pwd

    try:
        pwd.getpwnam("postgres")
        return shutil.which("runuser", path=SYSTEM_PATH) is not None
    except KeyError:
        return False


def _postgres_can_reach(home: Path) -> bool:
    """Whether the postgres user can enter the nearest existing folder of `home` (the cluster is made below it)."""
    existing = next(p for p in (home, *home.parents) if p.exists())
    runuser = shutil.which("runuser", path=SYSTEM_PATH) or "runuser"
    probe = subprocess.run([runuser, "-u", "postgres", "--", "test", "-x", str(existing)], capture_output=True)
    return probe.returncode == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
