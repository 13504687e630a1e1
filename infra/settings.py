"""Where the stack lives and how to reach it. Environment variables override every default.

The embedded default keeps everything on this host: SQLite databases and local artifact files under TRAINYARD_HOME.
Two settings switch to the shared setup (docs/scale-out.md), each on its own:

    TRAINYARD_DATABASE_URL=postgresql://user@host:5432/trainyard   Prefect, MLflow and the platform store on PostgreSQL
    TRAINYARD_ARTIFACT_STORE=s3://bucket/prefix                    MLflow artifacts (proxied) and Prefect results on S3

With an S3 store, TRAINYARD_MLFLOW_ARTIFACTS=direct makes every host write its MLflow artifacts to the bucket itself,
with its own S3 credentials, instead of sending them through the MLflow server (proxied, the default).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from infra.stack import embedded_postgres
from trainers.data.uris import s3_uri_problem

ROOT = Path(__file__).resolve().parent.parent

RESULTS_BLOCK = "trainyard-results"  # the prefect-aws S3Bucket block every flow run persists its results to
CREDENTIALS_BLOCK = "trainyard-s3"  # the AwsCredentials block it uses, unless TRAINYARD_S3_CREDENTIALS_BLOCK names one
MLFLOW_ARTIFACT_MODES = ("proxied", "direct")  # TRAINYARD_MLFLOW_ARTIFACTS (docs/scale-out.md)
_DATABASE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,53}$")  # + "_prefect" stays within PostgreSQL's 63 characters


class SettingsError(ValueError):
    """A setting that cannot work, named with the fix; never shows a password."""


@dataclass(frozen=True)
class Database:
    """The PostgreSQL server of the shared setup: Prefect, MLflow and the platform store each get a database.

    `TRAINYARD_DATABASE_URL=postgresql://user@host:5432/trainyard` gives the databases trainyard (platform store),
    trainyard_prefect and trainyard_mlflow. Every URL built from it leaves the password out: the processes that
    connect get it as PGPASSWORD (read by libpq and asyncpg alike), so it never shows in a command line, a log or
    the env file.
    """

    host: str
    port: int
    user: str | None
    name: str
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> Database:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            raise SettingsError(
                "TRAINYARD_DATABASE_URL is not a database URL; write postgresql://user@host:5432/trainyard. A "
                "password in it must be percent-encoded (@ as %40, : as %3A, / as %2F, % as %25), or leave it out "
                "and set PGPASSWORD"
            ) from None
        shown = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() not in ("postgresql", "postgres"):
            raise SettingsError(
                f"TRAINYARD_DATABASE_URL must name a PostgreSQL server (postgresql://user@host:5432/trainyard), not "
                f"{parsed.get_backend_name()!r} ({shown}); leave it unset for the embedded SQLite databases"
            )
        if not parsed.host:
            raise SettingsError(f"TRAINYARD_DATABASE_URL has no host: {shown}; write postgresql://user@host:5432/db")
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise SettingsError(
                f"TRAINYARD_DATABASE_URL has port {parsed.port}, not a TCP port (1 to 65535): {shown}; PostgreSQL "
                "listens on 5432 unless its server says otherwise"
            )
        if parsed.query:
            raise SettingsError(
                f"TRAINYARD_DATABASE_URL takes no query parameters ({shown}): give TLS and other connection options "
                "as libpq environment variables (PGSSLMODE, PGSSLROOTCERT, ...), which every server here reads"
            )
        name = parsed.database or "trainyard"
        if not _DATABASE_NAME.match(name):
            raise SettingsError(
                f"database name {name!r} in TRAINYARD_DATABASE_URL: use lowercase letters, digits and '_' "
                "(at most 54 characters); Trainyard adds _prefect and _mlflow to it"
            )
        return cls(parsed.host, parsed.port or 5432, parsed.username, name, parsed.password)

    def url(self, driver: str = "postgresql", database: str | None = None) -> str:
        """A SQLAlchemy URL of one of the databases, without the password."""
        user = f"{self.user}@" if self.user else ""
        return f"{driver}://{user}{self.host}:{self.port}/{database or self.name}"

    @property
    def prefect_database(self) -> str:
        return f"{self.name}_prefect"

    @property
    def mlflow_database(self) -> str:
        return f"{self.name}_mlflow"

    @property
    def databases(self) -> list[str]:
        return [self.name, self.prefect_database, self.mlflow_database]

    def env(self) -> dict[str, str]:
        """The secret part, for the processes that connect (servers, workers), never for client_env()."""
        return {"PGPASSWORD": self.password} if self.password else {}

    def __str__(self) -> str:
        return self.url()


@dataclass(frozen=True)
class ArtifactStore:
    """An S3 location for the shared setup: MLflow artifacts under <prefix>/mlflow, Prefect results under
    <prefix>/prefect-results. Credentials never come from here: the control host's environment, or a block."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> ArtifactStore | None:
        """The S3 store a URI names; None for a local path or file:// URI (everything then stays on the host)."""
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            return None
        if parsed.scheme != "s3" or not uri.startswith("s3://") or parsed.query or "@" in parsed.netloc:
            raise SettingsError(  # the value itself is not shown: a URI with '@' may hold credentials
                "TRAINYARD_ARTIFACT_STORE must be s3://bucket/prefix (no credentials, no '?' part) or a local "
                f"directory, not this {parsed.scheme}: URI"
            )
        prefix = parsed.path.strip("/")
        if ".." in prefix.split("/"):
            raise SettingsError("TRAINYARD_ARTIFACT_STORE: a prefix cannot contain '..'")
        if problem := s3_uri_problem(f"s3://{parsed.netloc}"):
            raise SettingsError(f"TRAINYARD_ARTIFACT_STORE={uri!r}: {problem}; write s3://bucket/prefix")
        return cls(parsed.netloc, prefix)

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *(p for p in (self.prefix, *parts) if p)])

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    @property
    def mlflow_destination(self) -> str:
        return self.uri("mlflow")

    @property
    def results_folder(self) -> str:
        return self.key("prefect-results")


def mlflow_artifact_mode(value: str, artifact_store: ArtifactStore | None) -> str:
    """TRAINYARD_MLFLOW_ARTIFACTS: `proxied` (default; only the MLflow server needs S3 credentials) or `direct`
    (every host writes to S3 with its own), which only an S3 artifact store can be."""
    mode = value.strip().lower() or "proxied"
    if mode not in MLFLOW_ARTIFACT_MODES:
        raise SettingsError(
            f"TRAINYARD_MLFLOW_ARTIFACTS={value!r}: write proxied (the MLflow server uploads artifacts; only it needs "
            "S3 credentials) or direct (every host uploads to S3 with its own credentials); unset means proxied"
        )
    if mode == "direct" and artifact_store is None:
        raise SettingsError(
            "TRAINYARD_MLFLOW_ARTIFACTS=direct needs TRAINYARD_ARTIFACT_STORE=s3://bucket/prefix, the bucket every "
            "host writes to; set it, or unset TRAINYARD_MLFLOW_ARTIFACTS"
        )
    return mode


def tcp_port(env: Mapping[str, str], name: str, default: int) -> int:
    """A TCP port from the environment; unset or empty means the default."""
    text = env.get(name, "").strip()
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise SettingsError(
            f"{name}={text!r} is not a TCP port; write a number from 1 to 65535, or unset it for {default}"
        )
    return int(text)


def check_store_url(url: str) -> None:
    """TRAINYARD_STORE_URL must be a SQLAlchemy URL; the platform store (infra/compute/store.py) connects with it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except (ArgumentError, ValueError):
        raise SettingsError(  # the value is not shown: it may hold a password
            "TRAINYARD_STORE_URL is not a database URL; write sqlite:///<file> or postgresql+psycopg://user@host/db "
            "(a password percent-encoded), or unset it for SQLite in TRAINYARD_HOME"
        ) from None


def s3_endpoint_url(env: Mapping[str, str] | None = None) -> str | None:
    """The S3 endpoint, as infra.storage reads it (None: AWS itself)."""
    env = os.environ if env is None else env
    return env.get("TRAINYARD_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None


@dataclass(frozen=True)
class Settings:
    home: Path  # all local state: databases, artifacts, runs, logs, pids (git-ignored)
    host: str  # how every process, on this host or another, reaches the servers
    prefect_port: int
    mlflow_port: int
    work_pool: str
    bind_host: str | None = None  # where the servers listen (0.0.0.0 on a control host); default: host
    database: Database | None = None  # PostgreSQL (shared setup); None: SQLite under home
    artifact_store: ArtifactStore | None = None  # S3 (shared setup); None: local files under home
    mlflow_artifacts: str = "proxied"  # TRAINYARD_MLFLOW_ARTIFACTS: through the MLflow server, or `direct` to S3
    credentials_block: str | None = None  # TRAINYARD_S3_CREDENTIALS_BLOCK, a block of the user's; None: trainyard-s3
    own_store_url: bool = False  # TRAINYARD_STORE_URL is set: the platform store is elsewhere, not in `database`
    store_url_given: str | None = field(default=None, repr=False)  # TRAINYARD_STORE_URL (may hold a password)
    artifact_store_uri: str | None = None  # TRAINYARD_ARTIFACT_STORE as given: s3://bucket/prefix or a directory
    s3_endpoint: str | None = None  # TRAINYARD_S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL; None: AWS
    checkpoint_dir: Path | None = (
        None  # TRAINYARD_CHECKPOINT_DIR: the runs directory containers mount (default runs_dir)
    )
    checkpoint_pvc: str = "trainyard-checkpoints"  # TRAINYARD_CHECKPOINT_PVC: the Kubernetes claim mounted there

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """From this process's environment, or from `env`: another host's, as a test or a tool sees it."""
        env = os.environ if env is None else env
        home = Path(env.get("TRAINYARD_HOME") or ROOT / ".trainyard").resolve()  # empty is unset, not "here"
        # Unset: the one-host stack's own PostgreSQL cluster while `up` runs it (infra/stack/embedded_postgres.py).
        database_url = env.get("TRAINYARD_DATABASE_URL", "").strip() or embedded_postgres.running_url(home) or ""
        artifact_store = ArtifactStore.parse(env.get("TRAINYARD_ARTIFACT_STORE", "").strip())
        own_store_url = env.get("TRAINYARD_STORE_URL", "").strip()
        if own_store_url:
            check_store_url(own_store_url)
        prefect_port = tcp_port(env, "TRAINYARD_PREFECT_PORT", 4200)
        mlflow_port = tcp_port(env, "TRAINYARD_MLFLOW_PORT", 5000)
        if prefect_port == mlflow_port:
            raise SettingsError(
                f"TRAINYARD_PREFECT_PORT and TRAINYARD_MLFLOW_PORT are both {prefect_port}; the Prefect and MLflow "
                "servers each need a port of their own (defaults 4200 and 5000)"
            )
        return cls(
            home=home,
            host=env.get("TRAINYARD_HOST", "127.0.0.1"),
            prefect_port=prefect_port,
            mlflow_port=mlflow_port,
            work_pool=env.get("TRAINYARD_WORK_POOL", "trainyard-local"),
            bind_host=env.get("TRAINYARD_BIND_HOST") or None,
            database=Database.parse(database_url) if database_url else None,
            artifact_store=artifact_store,
            mlflow_artifacts=mlflow_artifact_mode(env.get("TRAINYARD_MLFLOW_ARTIFACTS", ""), artifact_store),
            credentials_block=env.get("TRAINYARD_S3_CREDENTIALS_BLOCK") or None,
            own_store_url=bool(own_store_url),
            store_url_given=own_store_url or None,
            artifact_store_uri=env.get("TRAINYARD_ARTIFACT_STORE", "").strip() or None,
            s3_endpoint=s3_endpoint_url(env),
            checkpoint_dir=Path(env["TRAINYARD_CHECKPOINT_DIR"]) if env.get("TRAINYARD_CHECKPOINT_DIR") else None,
            checkpoint_pvc=env.get("TRAINYARD_CHECKPOINT_PVC") or "trainyard-checkpoints",
        )

    @property
    def s3_credentials_block(self) -> str:
        """The AwsCredentials block flow runs use for S3: the user's, or the one `up` makes from its environment."""
        return self.credentials_block or CREDENTIALS_BLOCK

    @property
    def listen_host(self) -> str:
        return self.bind_host or self.host

    @property
    def prefect_ui(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def prefect_api(self) -> str:
        return f"{self.prefect_ui}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def warm_socket(self) -> Path:
        """The warm-start server's socket (infra/runs/warm_start.py); a Unix socket path must stay under 108 bytes."""
        path = self.home / "warm-start.sock"
        if len(str(path)) < 100:
            return path
        return Path(tempfile.gettempdir()) / f"trainyard-{hashlib.sha1(str(self.home).encode()).hexdigest()[:12]}.sock"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def store_url(self) -> str:
        """The platform store (compute profiles, attempts ledger): TRAINYARD_STORE_URL, else SQLite under home."""
        return self.store_url_given or f"sqlite:///{self.home / 'trainyard.db'}"

    def client_env(self) -> dict[str, str]:
        """What a process needs to talk to this stack (the worker, the CLI, the demo). Never a secret: the env file
        and `python -m infra.stack env` print it."""
        return {
            **self._shared_env(),
            "TRAINYARD_HOME": str(self.home),
            "TRAINYARD_ROOT": str(ROOT),
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_UI_URL": self.prefect_ui,
            "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", self.mlflow_uri),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            # Trainers log through these loggers; Prefect forwards them into the flow run's logs.
            "PREFECT_LOGGING_EXTRA_LOGGERS": "trainers,ultralytics,transformers",
            # ...and stays quiet about them when a trainer runs outside any flow (a script, a notebook).
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        }

    def _shared_env(self) -> dict[str, str]:
        env = {}
        if self.database and not self.own_store_url:
            # Compute profiles and the attempts ledger: one store for every host (infra/compute/store.py).
            env["TRAINYARD_STORE_URL"] = self.database.url("postgresql+psycopg")
        if self.artifact_store:
            env.update(
                TRAINYARD_ARTIFACT_STORE=self.artifact_store.uri(),
                # Every flow run persists its results to S3, so a run can resume on any host.
                PREFECT_RESULTS_PERSIST_BY_DEFAULT="true",
                PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=f"s3-bucket/{RESULTS_BLOCK}",
                # S3 credentials reach flow runs from this Prefect block (infra/storage), not from their environment.
                TRAINYARD_S3_CREDENTIALS_BLOCK=self.s3_credentials_block,
                TRAINYARD_MLFLOW_ARTIFACTS=self.mlflow_artifacts,
            )
        if self.mlflow_artifacts == "direct" and self.s3_endpoint:
            # MLflow's own S3 client, used by every host in direct mode, reads this name only.
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        return env


# The variables settings are made of: a change to any of them (a test's monkeypatch, `up` exporting the stack's
# environment) gives new settings; otherwise they are read and validated once.
_PREFIXES = ("TRAINYARD_", "AWS_ENDPOINT_URL")


@functools.lru_cache(maxsize=8)
def _settings_for(variables: tuple[tuple[str, str], ...], embedded_database: str | None) -> Settings:
    return Settings.from_env(dict(variables))


def get_settings() -> Settings:
    """This process's settings: one typed object, read from the environment once (per distinct environment)."""
    variables = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_PREFIXES)))
    home = Path(os.environ.get("TRAINYARD_HOME") or ROOT / ".trainyard").resolve()
    # The one-host stack's own PostgreSQL cluster may start or stop while this process lives.
    return _settings_for(variables, embedded_postgres.running_url(home))
