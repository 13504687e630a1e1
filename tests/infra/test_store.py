"""The platform store on SQLite and on PostgreSQL: profile CRUD, the YAML seed, the attempts ledger."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel

from infra.compute.profiles import SEED_FILE, ProfileError, compare, load_seed, seed_profiles, validate_profile
from infra.compute.store import Attempt, ComputeProfile, Store

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database for this session, dropped at the end."""
    import psycopg

    name = f"trainyard_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {str(error).strip().splitlines()[0]}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store' / 'trainyard.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    store = Store(url)
    yield store
    if request.param == "postgresql":  # one database per session: each test starts from empty tables
        SQLModel.metadata.drop_all(store.engine)
    store.engine.dispose()


def test_profile_crud(store: Store):
    store.save_profile(ComputeProfile(name="b", work_pool="pool-b", deployment="train-step/b", priority=5))
    added = store.add_profile(
        ComputeProfile(name="a", work_pool="pool-a", deployment="train-step/a", credential_blocks=["aws-credentials/x"])
    )
    assert added and not store.add_profile(ComputeProfile(name="a", work_pool="other", deployment="f/d"))
    assert [p.name for p in store.profiles()] == ["b", "a"]  # by priority
    assert store.profile("a").work_pool == "pool-a" and store.profile("a").credential_blocks == ["aws-credentials/x"]

    changed = store.profile("b")
    changed.enabled, changed.gpu_count = False, 2
    store.save_profile(changed)
    assert store.profile("b").gpu_count == 2
    assert [p.name for p in store.profiles(enabled_only=True)] == ["a"]
    assert store.remove_profile("b") and not store.remove_profile("b")
    assert store.profile("b") is None


def test_seed_inserts_what_is_missing_and_never_overwrites_edits(store: Store):
    assert seed_profiles(store, SEED_FILE).added == ["local", "gpu-host-0", "docker-gpu", "k8s-a100", "ecs-g5"]
    local = store.profile("local")
    assert (local.work_pool, local.deployment, local.cpu_cores, local.ram_gb) == (
        "trainyard-local",
        "train-step/local",
        2,
        16,
    )
    assert (local.max_concurrent, local.priority, local.enabled) == (2, 10, True)
    k8s = store.profile("k8s-a100")
    assert (k8s.kind, k8s.gpu_memory_gb, k8s.price_per_hour, k8s.enabled) == ("kubernetes", 80, 3.2, False)
    assert k8s.credential_blocks == ["kubernetes-cluster-config/trainyard"]

    local.max_concurrent = 5
    store.save_profile(local)
    store.remove_profile("ecs-g5")
    result = seed_profiles(store, SEED_FILE)
    assert result.added == ["ecs-g5"] and "local" in result.kept
    assert store.profile("local").max_concurrent == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("profiles:\n  box:\n    work_pool: box\n    gpus: 2\n", "profile 'box': unknown field.*'gpus'"),
        (
            "profiles:\n  box:\n    work_pool: box\n    gpu_count: two\n",
            "profile 'box': field 'gpu_count' must be an integer, got 'two'",
        ),
        ("profiles:\n  box:\n    work_pool: box\n    enabled: 'yes please'\n", "profile 'box': field 'enabled'"),
        ("profiles:\n  box:\n    kind: process\n", "profile 'box': field 'work_pool' is required"),
        ("- not a mapping\n", "'profiles:' mapping"),
        (
            "profiles:\n  box:\n    work_pool: box\n    gpu_count: '1'\n",
            "profile 'box': field 'gpu_count' must be an integer, got '1' .*fix it there",
        ),
        ("profiles:\n  box:\n    work_pool: a\n  box:\n    work_pool: b\n", "line 4.*'box' is given twice"),
        ("profiles: {}\nprofile: {}\n", "unknown top-level key.*'profile'"),
    ],
    ids=[
        "unknown-field",
        "wrong-type",
        "not-a-boolean",
        "missing-pool",
        "not-a-mapping",
        "quoted-number",
        "profile-given-twice",
        "unknown-top-level-key",
    ],
)
def test_seed_rejects_unknown_fields_and_wrong_types_naming_them(tmp_path: Path, text: str, message: str):
    seed = tmp_path / "profiles.yaml"
    seed.write_text(text)
    with pytest.raises(ProfileError, match=message):
        load_seed(seed)


def test_a_seeded_profile_defaults_its_deployment_to_train_step_of_its_name(tmp_path: Path):
    seed = tmp_path / "profiles.yaml"
    seed.write_text("profiles:\n  box:\n    work_pool: box\n")
    assert load_seed(seed)[0].deployment == "train-step/box"


def test_profile_changes_apply_in_one_transaction(store: Store):
    for name in ("a", "b", "c"):
        store.save_profile(ComputeProfile(name=name, work_pool=f"pool-{name}", deployment=f"train-step/{name}"))
    changed = store.profile("a")
    changed.speed = 3.0
    new = ComputeProfile(name="d", work_pool="pool-d", deployment="train-step/d")
    store.apply_profile_changes(save=[changed, new], remove=["b", "no-such"])
    assert sorted(p.name for p in store.profiles()) == ["a", "c", "d"] and store.profile("a").speed == 3.0

    broken = ComputeProfile(name="e", work_pool=None, deployment="train-step/e")  # NOT NULL: the commit fails
    with pytest.raises(IntegrityError):
        store.apply_profile_changes(save=[broken], remove=["c"])
    assert sorted(p.name for p in store.profiles()) == ["a", "c", "d"]  # nothing of it applied


def test_compare_names_each_profile_and_field_that_differs():
    file_ = [validate_profile("a", {"work_pool": "p", "speed": 2}), validate_profile("b", {"work_pool": "p"})]
    store_ = [validate_profile("a", {"work_pool": "p", "speed": 3.0}), validate_profile("c", {"work_pool": "p"})]
    comparison = compare(file_, store_)
    assert [p.name for p in comparison.only_in_file] == ["b"] and [p.name for p in comparison.only_in_store] == ["c"]
    [(defined, stored, fields)] = comparison.changed
    assert (defined.speed, stored.speed, fields) == (2.0, 3.0, ["speed"])
    assert not compare(file_, file_) and compare(file_, file_).same == ["a", "b"]


def test_attempts_ledger_round_trip_with_timestamps(store: Store):
    started = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    first = store.record_attempt(
        Attempt(request_id="req-1", profile="local", trainer="yolo", dataset_version="v1", started_at=started)
    )
    store.record_attempt(Attempt(request_id="req-2", profile="local"))
    store.update_attempt(first.id, flow_run_id="run-1", outcome="running", estimated_cost_usd=0.5)
    store.finish_attempt(first.id, "completed", "trained", actual_cost_usd=0.25)

    assert [a.request_id for a in store.attempts()] == ["req-1", "req-2"]
    (read,) = store.attempts("req-1")
    assert (read.flow_run_id, read.outcome, read.reason) == ("run-1", "completed", "trained")
    assert (read.estimated_cost_usd, read.actual_cost_usd) == (0.5, 0.25)

    def utc(moment: datetime) -> datetime:  # SQLite hands back naive UTC, PostgreSQL aware
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    assert utc(read.started_at) == started
    assert timedelta(0) <= datetime.now(UTC) - utc(read.ended_at) < timedelta(minutes=1)


def test_a_store_created_before_the_gpus_column_gets_it_and_keeps_its_attempts(tmp_path: Path):
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the attempts table as an earlier Trainyard created it
        db.execute(
            "CREATE TABLE attempts (id INTEGER PRIMARY KEY, request_id VARCHAR NOT NULL, profile VARCHAR NOT NULL, "
            "flow_run_id VARCHAR, trainer VARCHAR NOT NULL, dataset_version VARCHAR NOT NULL, started_at DATETIME "
            "NOT NULL, ended_at DATETIME, outcome VARCHAR NOT NULL, reason VARCHAR NOT NULL, estimated_cost_usd "
            "FLOAT, actual_cost_usd FLOAT)"
        )
        db.execute(
            "INSERT INTO attempts VALUES (1, 'r1', 'local', NULL, 'torch', 'v1', '2026-11-01 10:00:00', NULL, "
            "'running', '', NULL, NULL)"
        )
    store = Store(f"sqlite:///{path}")
    [old] = store.attempts("r1")
    assert old.gpus == "" and old.outcome == "running"
    store.record_gpus("r1", "0:Test GPU (GPU-1)")
    assert store.attempts("r1")[0].gpus == "0:Test GPU (GPU-1)"


def test_the_gpus_go_on_the_requests_attempt_that_is_training(store: Store):
    request = f"req-{uuid.uuid4().hex[:8]}"
    late = store.record_attempt(Attempt(request_id=request, profile="a", outcome="late"))
    store.finish_attempt(late.id, "late", "not started")
    training = store.record_attempt(Attempt(request_id=request, profile="b", outcome="running"))
    store.record_gpus(request, "1:H100 (GPU-x)")
    assert store.attempt(training.id).gpus == "1:H100 (GPU-x)"
    assert store.attempt(late.id).gpus == ""
