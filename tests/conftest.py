"""Shared fixtures: tiny datasets written into tmp_path with PIL; the local stack; an S3 endpoint (moto)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from s3_server import (
    ACCESS_KEY,
    SECRET_KEY,
    Endpoint,
    client,
    client_env,
    env_applied,
    running_s3rver,
    s3rver_unavailable,
    start_moto,
    stop,
)
from waiting import free_port

MakeImage = Callable[..., Path]


@pytest.fixture
def make_image() -> MakeImage:
    """Write a small solid image at path (parents created) and return the path."""

    def make(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 8), colour: object = 128) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, colour).save(path)
        return path

    return make


@pytest.fixture
def tiny_imagefolder(tmp_path: Path, make_image: MakeImage) -> Path:
    """root/{train,val}/{cat,dog}/: two training images and one validation image per class."""
    root = tmp_path / "cls"
    for split, count in (("train", 2), ("val", 1)):
        for name in ("cat", "dog"):
            for i in range(count):
                make_image(root / split / name / f"{i}.png")
    return root


@pytest.fixture
def tiny_yolo(tmp_path: Path, make_image: MakeImage) -> Path:
    """A YOLO dataset, classes [cat, dog]: two train images, one val image, one box each; its data.yaml."""
    root = tmp_path / "det"
    for split, stems in (("train", ("a", "b")), ("val", ("c",))):
        for cls, stem in enumerate(stems):
            make_image(root / "images" / split / f"{stem}.png", size=(16, 16))
            label = root / "labels" / split / f"{stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(f"{cls} 0.5 0.5 0.25 0.25\n")
    data_yaml = root / "data.yaml"
    data_yaml.write_text("train: images/train\nval: images/val\nnames: [cat, dog]\n", encoding="utf-8")
    return data_yaml


# --- The real local stack for flow and deployment tests -------------------------------------------------------
# Ports and state are chosen before anything imports Prefect or MLflow, which read their settings at import.


_session_cluster = None  # pg_cluster.SessionCluster: the PostgreSQL the session's stack runs on, if any


def _session_database(home: Path) -> str | None:
    """TRAINYARD_DATABASE_URL of a throwaway PostgreSQL cluster started for this session, or None: SQLite.

    PostgreSQL by default: on SQLite, Prefect's server stalls up to a minute on its database lock when several
    workers and flow runs write at once ("database is locked"), enough to fail the tests that time a fallback.
    TRAINYARD_TEST_DATABASE=sqlite keeps SQLite; =postgresql insists on PostgreSQL; unset, a machine without
    PostgreSQL's server programs falls back to SQLite and says so."""
    global _session_cluster
    from pg_cluster import SessionCluster, missing_programs

    wanted = os.environ.get("TRAINYARD_TEST_DATABASE", "").strip().lower()
    if wanted not in ("", "postgresql", "sqlite"):
        raise pytest.UsageError(f"TRAINYARD_TEST_DATABASE={wanted!r}: write postgresql or sqlite (unset: postgresql)")
    if wanted == "sqlite":
        os.environ["TRAINYARD_LOCAL_DATABASE"] = "sqlite"  # nor a cluster of its own for `up --role all`
        print("trainyard tests: the stack runs on SQLite (TRAINYARD_TEST_DATABASE=sqlite)")
        return None
    if missing := missing_programs():
        if wanted == "postgresql":
            raise pytest.UsageError(f"TRAINYARD_TEST_DATABASE=postgresql, but this machine lacks: {', '.join(missing)}")
        print(f"trainyard tests: the stack runs on SQLite, PostgreSQL's server programs are missing ({missing[0]})")
        return None
    for attempt in (1, 2):  # the free port may be taken before the server binds it
        try:
            _session_cluster = SessionCluster(free_port(), keep_log=home / "logs" / "postgresql.log")
            break
        except AssertionError:
            if attempt == 2:
                raise
    return _session_cluster.database_url()


def pytest_configure(config: pytest.Config) -> None:
    import tempfile

    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller runs no test: each of its workers sets up a stack of its own

    home = Path(tempfile.mkdtemp(prefix="trainyard-test-"))
    os.environ.update(
        TRAINYARD_HOME=str(home),
        TRAINYARD_PREFECT_PORT=str(free_port()),
        TRAINYARD_MLFLOW_PORT=str(free_port()),
        YOLO_CONFIG_DIR=str(home / "ultralytics"),
    )
    # The session's stack is its own: never a database or store from the shell that runs the tests.
    for name in ("TRAINYARD_DATABASE_URL", "TRAINYARD_STORE_URL"):
        os.environ.pop(name, None)
    database_url = _session_database(home)
    if database_url:
        os.environ["TRAINYARD_DATABASE_URL"] = database_url
    from infra.settings import Settings

    os.environ.update(Settings.from_env().client_env())


# With pytest-xdist (make test TEST_WORKERS=N): a file's tests stay on one worker (they share module fixtures), and
# the two memory-hungry files never run at once (together they ran a 24 GiB machine out of memory).
HEAVY = {"test_scale.py", "test_network_hosts.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not getattr(config.option, "numprocesses", None):
        return
    for item in items:
        item.add_marker(pytest.mark.xdist_group("heavy" if item.path.name in HEAVY else str(item.path)))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _session_cluster is not None:  # after the session's fixtures: the stack is down by now
        _session_cluster.stop()


@pytest.fixture(scope="session")
def stack():
    """A real Prefect server and MLflow tracking server on free ports, for the whole session: on the session's
    PostgreSQL cluster (TRAINYARD_DATABASE_URL; the platform store too), or SQLite where there is none."""
    from infra.settings import Settings
    from infra.stack import services as local_stack

    settings = Settings.from_env()
    try:
        local_stack.up(settings, worker=False)
        yield settings
    finally:  # also when start-up fails half-way: never leave servers behind
        local_stack.down(settings)


@pytest.fixture(scope="session")
def shapes_cls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated ImageFolder dataset (3 classes) that trains in seconds."""
    from trainers.data.synthetic import make_shapes_classification

    root = tmp_path_factory.mktemp("datasets") / "shapes-cls"
    return make_shapes_classification(root, train_per_class=8, val_per_class=4, test_per_class=4, image_size=32)


# --- Real S3-compatible endpoints: moto's server mode and s3rver, once per session (tests/s3_server.py) ----------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[Endpoint]:
    external = os.environ.get("TRAINYARD_TEST_S3_ENDPOINT_URL")
    if external:
        yield Endpoint(external, "external", os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
        return
    proc, url = start_moto()
    try:
        yield Endpoint(url, "moto", ACCESS_KEY, SECRET_KEY)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def s3rver_endpoint() -> Iterator[Endpoint]:
    """s3rver: unlike moto it refuses expired presigned URLs; started only if a test asks for it."""
    unavailable = s3rver_unavailable()
    if unavailable:
        pytest.skip(unavailable)
    with running_s3rver(ACCESS_KEY, SECRET_KEY) as url:
        yield Endpoint(url, "s3rver", ACCESS_KEY, SECRET_KEY)


@pytest.fixture
def s3_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Endpoint:
    """Credentials and endpoint in the environment, as a user sets them; nothing from ~/.aws or an instance role.

    The endpoint is `s3_endpoint`; a test parametrized with `pytest.mark.parametrize("s3_env", ["moto", "s3rver"],
    indirect=True)` runs on each ("moto" stands for `s3_endpoint`, whichever server that is)."""
    server = getattr(request, "param", "moto")
    endpoint = request.getfixturevalue("s3rver_endpoint" if server == "s3rver" else "s3_endpoint")
    env_applied(monkeypatch, client_env(endpoint, tmp_path))
    return endpoint


@pytest.fixture
def s3(s3_env: Endpoint):
    """A plain boto3 client on the endpoint: how the tests arrange and inspect the bucket behind Trainyard's back."""
    return client(s3_env)


@pytest.fixture
def bucket(s3) -> str:
    """A new, empty bucket for one test."""
    name = f"ty-test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name
