"""`up` on one host runs Prefect, MLflow and the platform store on a PostgreSQL cluster of its own when PostgreSQL's
server programs are installed (infra/stack/embedded_postgres.py): Prefect's server on SQLite stalls under load."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from test_shared_stack import clean_env, cli
from waiting import free_port

from infra.settings import Settings
from infra.stack import embedded_postgres


@pytest.fixture
def one_host(tmp_path):
    # PostgreSQL runs as the postgres user: pytest's own temporary folders are private to the user running it.
    home = Path(tempfile.mkdtemp(prefix="ty-home-"))
    home.chmod(0o755)
    env = {
        **clean_env(tmp_path),
        "TRAINYARD_HOME": str(home),
        "TRAINYARD_PREFECT_PORT": str(free_port()),
        "TRAINYARD_MLFLOW_PORT": str(free_port()),
        "TRAINYARD_WORK_POOL": "embedded-pool",
    }
    yield home, env
    cli("down", env=env, check=False)
    shutil.rmtree(home, ignore_errors=True)


def test_one_host_gets_its_own_postgresql_cluster_and_down_stops_it(one_host):
    if why := embedded_postgres.why_not(one_host[0]):
        pytest.skip(f"no local cluster here: {why}")
    home, env = one_host
    started = cli("up", env=env)
    assert "postgresql: the stack's own cluster" in started.stdout, started.stdout
    settings = Settings.from_env(env)  # what every process of this host reads while the cluster runs
    assert settings.database is not None and settings.database.host == "127.0.0.1"
    assert "local PostgreSQL" in cli("status", env=env).stdout

    import psycopg

    with psycopg.connect(settings.database.url("postgresql", "postgres"), autocommit=True) as connection:
        names = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
    assert set(settings.database.databases) <= names  # the store's, Prefect's and MLflow's

    stopped = cli("down", env=env)
    assert "postgresql: stopped" in stopped.stdout
    assert Settings.from_env(env).database is None and embedded_postgres.running_url(home) is None
    assert (home / "postgres" / "data" / "PG_VERSION").exists()  # the data stays for the next `up`


def test_a_home_private_to_root_stays_on_sqlite_and_says_why(tmp_path, monkeypatch):
    if os.geteuid() != 0 or embedded_postgres.programs() is None:
        pytest.skip("needs root, which runs PostgreSQL as the postgres user, and PostgreSQL's server programs")
    monkeypatch.delenv("TRAINYARD_LOCAL_DATABASE", raising=False)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert "the postgres OS user cannot reach" in embedded_postgres.why_not(private / "home")


def test_a_home_with_sqlite_databases_from_before_stays_on_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("TRAINYARD_LOCAL_DATABASE", raising=False)
    (tmp_path / "mlflow").mkdir()
    (tmp_path / "mlflow" / "mlflow.db").touch()  # its runs and models would vanish from view on PostgreSQL
    assert "SQLite databases from before" in embedded_postgres.why_not(tmp_path)
    monkeypatch.setenv("TRAINYARD_LOCAL_DATABASE", "sqlite")
    assert embedded_postgres.why_not(tmp_path / "new") == "TRAINYARD_LOCAL_DATABASE=sqlite"
