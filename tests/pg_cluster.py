"""Throwaway PostgreSQL clusters: the one the test session's stack runs on (tests/conftest.py, SessionCluster),
and those of tests that need one of their own: passwords, or listening on another address.

`initdb` and `pg_ctl` from PG_BIN (TRAINYARD_TEST_PG_BIN, default the newest of Debian's /usr/lib/postgresql/*/bin),
run as the `postgres` OS user when the tests run as root (PostgreSQL refuses root). A cluster lives in a temporary
folder and is stopped and deleted on the way out, whatever happened.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil


def _newest_debian_bin() -> Path:
    """/usr/lib/postgresql/<newest major>/bin with an initdb in it (what `apt-get install postgresql` gives on this
    Debian release), else the 15 of bookworm, for the message of missing_programs()."""

    def version(initdb: Path) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in initdb.parent.parent.name.split("."))
        except ValueError:
            return ()

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = Path(os.environ.get("TRAINYARD_TEST_PG_BIN") or _newest_debian_bin())
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class RunningCluster:
    host: str
    port: int
    root: Path


def missing_programs() -> list[str]:
    """What this machine lacks to start a cluster (empty: nothing); a test skips with it."""
    missing = [str(PG_BIN / b) for b in ("initdb", "pg_ctl", "postgres") if not os.access(PG_BIN / b, os.X_OK)]
    if os.geteuid() == 0:
        if not shutil.which("runuser", path=SYSTEM_PATH):
            missing.append("runuser (util-linux), to run PostgreSQL as the postgres user")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("a `postgres` OS user (PostgreSQL refuses to run as root)")
    return missing


def run_as_postgres(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A PostgreSQL program as the `postgres` user when we are root, with none of this process's PG* variables."""
    as_postgres = [shutil.which("runuser", path=SYSTEM_PATH) or "runuser", "-u", "postgres", "--"]
    env = {"PATH": SYSTEM_PATH, "LC_ALL": "C", "LANG": "C"}
    argv = (*as_postgres, *argv) if os.geteuid() == 0 else argv
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


@contextmanager
def throwaway_cluster(
    port: int,
    *,
    listen: str = "127.0.0.1",
    superuser_password: str | None = None,
    hba: str = "",
    settings: dict[str, str] | None = None,
    keep_log: Path | None = None,
) -> Iterator[RunningCluster]:
    """initdb, append `hba` to pg_hba.conf, start on listen:port. With a superuser password every connection must
    give a password (scram-sha-256); without one, the cluster trusts what pg_hba.conf lets in. `settings`: more
    server settings (-c name=value); `keep_log`: where the server's log is copied before the cluster is deleted.
    No durability: fsync, full-page writes and synchronous commit are off (a crash loses a test's data, no more)."""
    root = Path(tempfile.mkdtemp(prefix="ty-pg-"))  # short: the socket path must stay under 108 bytes
    data, sockets, log, pwfile = root / "data", root / "sock", root / "server.log", root / "pwfile"
    try:
        sockets.mkdir()
        auth = ["--auth=trust"]
        if superuser_password is not None:
            pwfile.write_text(superuser_password + "\n")
            auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        if os.geteuid() == 0:
            for path in (root, sockets, *([pwfile] if pwfile.exists() else [])):
                shutil.chown(path, "postgres", "postgres")
        initdb = [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--locale=C", "--encoding=UTF8"]
        done = run_as_postgres(*initdb, "--no-sync", *auth)
        pwfile.unlink(missing_ok=True)
        assert done.returncode == 0, f"initdb failed:\n{done.stdout}\n{done.stderr}"
        if hba:
            with open(data / "pg_hba.conf", "a") as conf:
                conf.write(hba.rstrip() + "\n")
        options = f"-p {port} -k {sockets} -c listen_addresses={listen} -c fsync=off -c full_page_writes=off"
        options += " -c synchronous_commit=off" + "".join(f" -c {k}={v}" for k, v in (settings or {}).items())
        pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]
        done = run_as_postgres(*pg_ctl)
        assert done.returncode == 0, f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{tail(log)}"
        yield RunningCluster(listen, port, root)
    finally:
        stop_cluster(data)
        if keep_log is not None and log.exists():
            with suppress(OSError):
                keep_log.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log, keep_log)
        shutil.rmtree(root, ignore_errors=True)


class SessionCluster:
    """One cluster for a whole test session, started outside any fixture (pytest_configure: before anything imports
    Prefect or MLflow) and stopped by stop(): from pytest_unconfigure, or at exit if the session ends another way.
    It trusts connections on 127.0.0.1 (no password) and gives a TRAINYARD_DATABASE_URL for its superuser."""

    def __init__(self, port: int, *, keep_log: Path | None = None) -> None:
        self._exit = ExitStack()
        # Prefect's server, MLflow's and each worker's store keep pools of connections: more than the default 100.
        settings = {"max_connections": "300"}
        self.running = self._exit.enter_context(throwaway_cluster(port, settings=settings, keep_log=keep_log))
        atexit.register(self.stop)

    def database_url(self, name: str = "trainyard") -> str:
        return f"postgresql://postgres@{self.running.host}:{self.running.port}/{name}"

    def stop(self) -> None:
        """Stop and delete the cluster; again is a no-op."""
        atexit.unregister(self.stop)
        self._exit.close()


def stop_cluster(data: Path) -> None:
    if not (data / "postmaster.pid").exists():
        return
    done = run_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)
    if done.returncode != 0 and (data / "postmaster.pid").exists():  # our own postmaster, by its pid
        pid = int((data / "postmaster.pid").read_text().split()[0])
        try:
            os.kill(pid, signal.SIGKILL)
            psutil.Process(pid).wait(timeout=10)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass


def tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else ""
