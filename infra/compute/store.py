"""The platform store: compute profiles and the attempts ledger (sqlmodel; SQLite by default, any SQLAlchemy URL).

TRAINYARD_STORE_URL=postgresql+psycopg://user@host/db   (default: sqlite:///$TRAINYARD_HOME/trainyard.db)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import JSON, Column
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, create_engine, select

from infra.settings import get_settings

ProfileKind = Literal["process", "docker", "kubernetes", "ecs"]
Outcome = Literal[
    "queued",
    "dequeued",
    "submitted",
    "running",
    "completed",
    "failed",
    "crashed",
    "cancelled",
    "no-worker",
    "full",
    "late",
]


class ComputeProfile(SQLModel, table=True):
    """A named place to train: a Prefect work pool and the training-step deployment that runs there.

    The store row only: every profile is validated by infra.compute.profiles.ProfileSpec (the same fields, with
    their rules) before it is saved here."""

    __tablename__ = "compute_profiles"

    name: str = Field(primary_key=True)
    kind: str = "process"  # ProfileKind
    work_pool: str
    deployment: str  # "<flow name>/<deployment name>" of the training step on this pool
    gpu_type: str | None = None
    gpu_count: int = 0
    gpu_memory_gb: float = 0.0  # per GPU
    cpu_cores: int = 1
    ram_gb: float = 1.0
    price_per_hour: float = 0.0  # USD
    speed: float = 1.0  # relative throughput; this machine's CPU is 1.0
    max_concurrent: int = 1
    priority: int = 100  # lower goes first where the request gives no order
    credential_blocks: list[str] = Field(default_factory=list, sa_column=Column(JSON))  # "<type>/<name>" slugs
    enabled: bool = True


class Attempt(SQLModel, table=True):
    """One try of a training request on one profile: the ledger behind fallback, cost estimates and audits."""

    __tablename__ = "attempts"

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(index=True)  # the train flow run's id: stable across the request's attempts
    profile: str = Field(index=True)
    flow_run_id: str | None = None  # the training-step flow run on the profile's pool
    trainer: str = ""
    dataset_version: str = ""
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    ended_at: datetime | None = None
    outcome: str = "submitted"  # Outcome
    reason: str = ""
    estimated_cost_usd: float | None = None
    actual_cost_usd: float | None = None
    gpus: str = Field(default="", sa_column_kwargs={"server_default": ""})  # the GPUs its training leased


class GpuWaiter(SQLModel, table=True):
    """A request waiting for GPUs on a host: the line is served first come, first served (lowest id first)."""

    __tablename__ = "gpu_waiters"

    id: int | None = Field(default=None, primary_key=True)
    host: str = Field(index=True)
    need: str = ""  # what it asks for, as the log and the monitor show it
    holder: str = ""  # who waits: flow run, pid
    joined_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    seen_at: datetime = Field(default_factory=lambda: datetime.now(UTC))  # refreshed while it waits


def store_url() -> str:
    return get_settings().store_url


class Store:
    def __init__(self, url: str | None = None) -> None:
        self.url = url or store_url()
        if self.url.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.url.removeprefix("sqlite:///")) or ".", exist_ok=True)
        self.engine = create_engine(self.url, pool_pre_ping=True)
        SQLModel.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)

    @classmethod
    def shared(cls) -> Store:
        """One Store per URL for this process: its engine (and the table check) is made once, not per call."""
        return _shared(store_url())

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    # --- profiles ---
    def profiles(self, enabled_only: bool = False) -> list[ComputeProfile]:
        with self.session() as session:
            query = select(ComputeProfile).order_by(ComputeProfile.priority, ComputeProfile.name)
            if enabled_only:
                query = query.where(ComputeProfile.enabled == True)  # noqa: E712 (SQL expression)
            return list(session.exec(query))

    def profile(self, name: str) -> ComputeProfile | None:
        with self.session() as session:
            return session.get(ComputeProfile, name)

    def save_profile(self, profile: ComputeProfile) -> ComputeProfile:
        with self.session() as session:
            merged = session.merge(profile)
            session.commit()
            return merged

    def add_profile(self, profile: ComputeProfile) -> bool:
        """Insert the profile unless one of that name exists (never overwrites); True when inserted."""
        with self.session() as session:
            if session.get(ComputeProfile, profile.name) is not None:
                return False
            session.add(profile)
            try:
                session.commit()
            except IntegrityError:  # inserted concurrently by another process
                session.rollback()
                return False
            return True

    def apply_profile_changes(self, save: Iterable[ComputeProfile], remove: Iterable[str]) -> None:
        """Insert or overwrite the `save` profiles and delete the `remove` names, in one transaction (an import
        applies entirely or not at all). The YAML file and its validation: infra.compute.profiles."""
        with self.session() as session:
            for profile in save:
                session.merge(profile)
            for name in remove:
                profile = session.get(ComputeProfile, name)
                if profile is not None:
                    session.delete(profile)
            session.commit()

    def remove_profile(self, name: str) -> bool:
        with self.session() as session:
            profile = session.get(ComputeProfile, name)
            if profile is None:
                return False
            session.delete(profile)
            session.commit()
            return True

    # --- attempts ---
    def record_attempt(self, attempt: Attempt) -> Attempt:
        with self.session() as session:
            session.add(attempt)
            session.commit()
            session.refresh(attempt)
            return attempt

    def finish_attempt(self, attempt_id: int, outcome: str, reason: str, actual_cost_usd: float | None = None) -> None:
        with self.session() as session:
            attempt = session.get(Attempt, attempt_id)
            attempt.outcome, attempt.reason = outcome, reason
            attempt.ended_at = datetime.now(UTC)
            attempt.actual_cost_usd = actual_cost_usd
            session.add(attempt)
            session.commit()

    def update_attempt(self, attempt_id: int, **values) -> None:
        with self.session() as session:
            attempt = session.get(Attempt, attempt_id)
            for key, value in values.items():
                setattr(attempt, key, value)
            session.add(attempt)
            session.commit()

    def open_tickets(self, profile: str) -> list[Attempt]:
        """Requests waiting in line for `profile` (the queue strategy), oldest first."""
        with self.session() as session:
            query = (
                select(Attempt)
                .where(Attempt.profile == profile, Attempt.outcome == "queued", Attempt.ended_at == None)  # noqa: E711
                .order_by(Attempt.id)
            )
            return list(session.exec(query))

    def record_gpus(self, request_id: str, gpus: str) -> None:
        """Write the leased GPUs on the request's attempt that is training now (its newest open one)."""
        with self.session() as session:
            query = (
                select(Attempt)
                .where(Attempt.request_id == request_id, Attempt.ended_at == None)  # noqa: E711
                .order_by(Attempt.id.desc())
            )
            attempt = session.exec(query).first()
            if attempt is not None:
                attempt.gpus = gpus
                session.add(attempt)
                session.commit()

    def attempt(self, attempt_id: int) -> Attempt | None:
        with self.session() as session:
            return session.get(Attempt, attempt_id)

    # --- the GPU waiting line ---
    def join_gpu_line(self, host: str, need: str, holder: str) -> GpuWaiter:
        with self.session() as session:
            waiter = GpuWaiter(host=host, need=need, holder=holder)
            session.add(waiter)
            session.commit()
            session.refresh(waiter)
            return waiter

    def gpu_line(self, host: str | None = None, alive_within_s: float | None = None) -> list[GpuWaiter]:
        """The waiters, first come first; with alive_within_s, only those seen that recently (a killed waiter
        stops refreshing and drops out of the line)."""
        with self.session() as session:
            query = select(GpuWaiter).order_by(GpuWaiter.id)
            if host is not None:
                query = query.where(GpuWaiter.host == host)
            waiters = list(session.exec(query))
        if alive_within_s is None:
            return waiters
        cutoff = datetime.now(UTC).timestamp() - alive_within_s
        return [w for w in waiters if w.seen_at.replace(tzinfo=UTC).timestamp() >= cutoff]

    def still_waiting(self, waiter_id: int) -> None:
        with self.session() as session:
            waiter = session.get(GpuWaiter, waiter_id)
            if waiter is not None:
                waiter.seen_at = datetime.now(UTC)
                session.add(waiter)
                session.commit()

    def leave_gpu_line(self, waiter_id: int) -> None:
        with self.session() as session:
            waiter = session.get(GpuWaiter, waiter_id)
            if waiter is not None:
                session.delete(waiter)
                session.commit()

    def attempts(self, request_id: str | None = None) -> list[Attempt]:
        with self.session() as session:
            query = select(Attempt).order_by(Attempt.id)
            if request_id:
                query = query.where(Attempt.request_id == request_id)
            return list(session.exec(query))


def _add_missing_columns(engine) -> None:
    """Columns added to a table since a store was created (e.g. attempts.gpus): create_all adds tables only."""
    from sqlalchemy import inspect, text

    inspector = inspect(engine)
    with engine.begin() as connection:
        for table in SQLModel.metadata.sorted_tables:
            existing = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in existing:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                default = column.server_default.arg if column.server_default is not None else None
                clause = f" NOT NULL DEFAULT '{default}'" if isinstance(default, str) else ""
                connection.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}{clause}'))


@functools.cache
def _shared(url: str) -> Store:
    return Store(url)
