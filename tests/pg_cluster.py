"""A throwaway PostgreSQL cluster for tests that need one of their own: passwords, or listening on another address.

`initdb` and `pg_ctl` from PG_BIN (TRAINYARD_TEST_PG_BIN, default Debian's /usr/lib/postgresql/15/bin), run as the
`postgres` OS user when the tests run as root (PostgreSQL refuses root). The cluster lives in a temporary folder and
is stopped and deleted on the way out, whatever happened.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

PG_BIN = Path(os.environ.get("TRAINYARD_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
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
    port: int, *, listen: str = "127.0.0.1", superuser_password: str | None = None, hba: str = ""
) -> Iterator[RunningCluster]:
    """initdb, append `hba` to pg_hba.conf, start on listen:port. With a superuser password every connection must
    give a password (scram-sha-256); without one, the cluster trusts what pg_hba.conf lets in."""
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
        pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]
        done = run_as_postgres(*pg_ctl)
        assert done.returncode == 0, f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{tail(log)}"
        yield RunningCluster(listen, port, root)
    finally:
        stop_cluster(data)
        shutil.rmtree(root, ignore_errors=True)


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
