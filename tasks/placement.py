"""Stages 3-5: run the training step (train, evaluate, export) on the best compute profile, and on the next one
when that place fails.

Each attempt ends one way, and each is recorded in the attempts ledger, a table artifact and the MLflow run:
- no-worker: the profile's pool had no online worker at submission time -> next profile at once
- full: the profile's concurrency slots are all held (its global concurrency limit) -> next profile
- late: not running by the start deadline -> cancelled, so it can never start late and twice -> next profile
- crashed: the infrastructure failed (container engine missing, pod failed, worker lost) -> once its process is
  known to be gone (infra/runs/fencing.py: a verdict of death may be wrong), the next profile, which resumes from the
  last checkpoint in the shared checkpoint directory
- failed: the training code raised -> stop: another machine would fail the same way (unless fallback_on_failure)
- paused: the user paused the train flow run; training checkpointed -> the run is suspended until resumed
- completed
Attempts run one after another, never two at once.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, Pause
from prefect.runtime import flow_run
from prefect.states import Cancelled

from infra.compute.pool_health import observe
from infra.compute.selection import Ranking
from infra.compute.store import Attempt, ComputeProfile, Store
from infra.runs.fencing import StillAlive, confirm_gone
from tasks.choose_compute import NoComputeNow, current_work_pool, runs_here
from tasks.control_watch import PAUSED
from tasks.model_work import StepResult, read_step_result, train_evaluate_export
from tasks.run_directory import mark_run_directory
from tasks.tracking import ensure_active
from trainers.base import TrainingPaused
from trainers.data.spec import DatasetSpec

POLL_S = 0.5
FRESH_S = 5.0
QUEUE_POLL_S = 1.0


class TrainingFailed(RuntimeError):
    """The training code failed on a healthy machine; retrying elsewhere would fail the same way."""


class NoComputeLeft(RuntimeError):
    """Every eligible profile was tried and none could run the training."""


def profile_limit(profile: ComputeProfile) -> str:
    return f"trainyard-profile-{profile.name}"


def ensure_profile_limit(profile: ComputeProfile) -> bool:
    """One strict global concurrency limit per profile, sized by its max_concurrent: it never oversubscribes.

    Returns whether a slot looks free now (acquiring it is still the only guarantee)."""
    name = profile_limit(profile)
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # several first runs of a profile at once: one creates it
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=profile.max_concurrent)
                )
            return True
        if limit.limit != profile.max_concurrent:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=profile.max_concurrent))
        return limit.active_slots < profile.max_concurrent


@contextlib.contextmanager
def profile_slot(profile: ComputeProfile) -> Iterator[bool]:
    """Hold one of the profile's slots for the attempt; yields False at once when all are taken.

    The slot is a lease renewed in the background: if this process dies, it frees itself within a minute.
    """
    if not ensure_profile_limit(profile):
        yield False  # every slot is held: say so without a 423 round trip (Prefect logs those as errors)
        return
    slot = concurrency(profile_limit(profile), timeout_seconds=30, max_retries=0, strict=True, lease_duration=60)
    try:
        slot.__enter__()
    except ConcurrencySlotAcquisitionError as error:
        if "423" not in str(error):  # 423 Locked: every slot is held; anything else is a real error
            raise
        yield False
        return
    try:
        yield True
    finally:
        slot.__exit__(None, None, None)


class Placement:
    """The attempts of one request, in order, with their record."""

    def __init__(self, request, dataset: DatasetSpec, output_dir: Path, run_id: str, ranking: Ranking) -> None:
        self.request, self.dataset, self.output_dir, self.run_id = request, dataset, output_dir, run_id
        self.ranking = ranking
        self.request_id = str(flow_run.id or run_id)
        self.store = Store.shared()
        self.log = get_run_logger()
        self.attempts: list[Attempt] = []

    # --- the record ---
    def _begin(self, profile: ComputeProfile, outcome: str, reason: str = "", flow_run_id=None) -> Attempt:
        attempt = self.store.record_attempt(
            Attempt(
                request_id=self.request_id,
                profile=profile.name,
                flow_run_id=str(flow_run_id) if flow_run_id else None,
                trainer=self.request.trainer,
                dataset_version=self.dataset.version,
                outcome=outcome,
                reason=reason,
                estimated_cost_usd=self.ranking.estimates_usd.get(profile.name),
            )
        )
        self.attempts.append(attempt)
        return attempt

    def _end(self, attempt: Attempt, profile: ComputeProfile, outcome: str, reason: str) -> None:
        hours = (datetime.now(UTC) - attempt.started_at.replace(tzinfo=UTC)).total_seconds() / 3600
        # Waiting in line or being refused costs nothing.
        ran = outcome in {"completed", "failed", "crashed", "cancelled", "paused"}
        cost = round(profile.price_per_hour * hours, 6) if ran else 0.0
        self.store.finish_attempt(attempt.id, outcome, reason, actual_cost_usd=cost)
        attempt.outcome, attempt.reason, attempt.actual_cost_usd = outcome, reason, cost
        attempt.gpus = self.store.attempt(attempt.id).gpus  # written by the training, wherever it ran
        number = self.attempts.index(attempt) + 1
        self.log.info("attempt %d on %s: %s (%s)", number, profile.name, outcome, reason)
        mlflow.set_tag(f"compute.attempt.{number}", f"{profile.name}: {outcome} ({reason})"[:5000])
        self._publish()

    def _publish(self) -> None:
        create_table_artifact(
            [
                {
                    "attempt": i,
                    "profile": a.profile,
                    "outcome": a.outcome,
                    "reason": a.reason,
                    "flow run": a.flow_run_id or "",
                    "GPUs": a.gpus or "",
                    "estimated $": a.estimated_cost_usd,
                    "actual $": a.actual_cost_usd,
                }
                for i, a in enumerate(self.attempts, start=1)
            ],
            key="compute-attempts",
            description="Every attempt of this training request and why it ended",
        )

    # --- the attempts ---
    def run(self) -> StepResult:
        here = current_work_pool()
        order, head = list(self.ranking.candidates), None
        if self.request.compute.strategy == "queue":
            # Wait in line for the first profile in preference order that fits, even when it is busy now.
            fitting = {p.name: p for p in [*self.ranking.candidates, *self.ranking.waiting]}
            preference = self.request.compute.profiles or sorted(fitting, key=lambda n: (fitting[n].priority, n))
            head = next((fitting[name] for name in preference if name in fitting), None)
            order = [head, *(p for p in order if p is not head)] if head else order
        for profile in order:
            slot = self._queued_slot(profile, here) if profile is head else profile_slot(profile)
            with slot as free:
                if not free:
                    if profile is not head:
                        self._end(self._begin(profile, "full"), profile, "full", "all its concurrency slots are held")
                    continue
                result = self._train_here(profile) if runs_here(profile, here) else self._train_there(profile)
            if result is not None:
                mlflow.set_tags({"compute.profile": profile.name, "compute.attempts": str(len(self.attempts))})
                return result
        if not self.attempts:
            raise NoComputeNow(self.ranking)
        tried = "; ".join(f"{a.profile}: {a.outcome} ({a.reason})" for a in self.attempts)
        raise NoComputeLeft(f"no compute profile could run this training. Attempts: {tried}")

    @contextlib.contextmanager
    def _queued_slot(self, profile: ComputeProfile, here: str | None) -> Iterator[bool]:
        """Wait in line (first come, first served) for a slot on `profile`, up to queue_timeout_s.

        The line is the ledger's open "queued" tickets for the profile; the position shows in the run's logs and
        in a markdown artifact. Past the timeout the request moves on to the other profiles."""
        ensure_profile_limit(profile)
        ticket = self._begin(profile, "queued", "waiting for a free slot")
        timeout = self.request.compute.queue_timeout_s
        started, shown, worst = time.monotonic(), None, 1
        while True:
            position = self._position(profile, ticket, timeout)
            worst = max(worst, position)
            ready = runs_here(profile, here) or observe([profile])[profile.name].ready
            if position == 1 and ready:
                with profile_slot(profile) as free:
                    if free:
                        waited = time.monotonic() - started
                        self._end(ticket, profile, "dequeued", f"waited {waited:.0f} s in line (position {worst})")
                        yield True
                        return
            if position != shown:
                shown = position
                self.log.info("queued for %s: position %d", profile.name, position)
                create_markdown_artifact(
                    f"Waiting for compute profile **{profile.name}**: position **{position}** in line "
                    f"({profile.max_concurrent} slot(s)); gives up after {timeout:g} s.",
                    key="queue-position",
                    description="Where this request stands in the queue",
                )
            if time.monotonic() - started > timeout:
                self._end(ticket, profile, "late", f"no slot within the queue timeout of {timeout:g} s")
                yield False
                return
            time.sleep(QUEUE_POLL_S)

    def _position(self, profile: ComputeProfile, ticket: Attempt, timeout: float) -> int:
        """1 + the open tickets ahead of ours; tickets older than our timeout are taken as abandoned."""
        cutoff = datetime.now(UTC).timestamp() - timeout
        ahead = [
            a
            for a in self.store.open_tickets(profile.name)
            if a.id < ticket.id and a.started_at.replace(tzinfo=UTC).timestamp() > cutoff
        ]
        return len(ahead) + 1

    def _train_here(self, profile: ComputeProfile) -> StepResult:
        attempt = self._begin(profile, "running", "in the train flow's own process")
        try:
            result = train_evaluate_export(self.request, self.dataset, self.output_dir, self.run_id)
        except (TrainingPaused, Pause) as paused:  # Pause: Prefect's own signal, when it noticed the pause first
            self._end(attempt, profile, "paused", str(paused))
            raise
        except BaseException as error:
            self._end(attempt, profile, "failed", f"{type(error).__name__}: {error}"[:500])
            raise
        self._end(attempt, profile, "completed", f"trained in-process on {profile.name}")
        return result

    def _train_there(self, profile: ComputeProfile) -> StepResult | None:
        # The ranking's observation is trusted for a few seconds; after that the pool is looked at again.
        fresh = len(self.attempts) == 0 and time.monotonic() - self.ranking.observed_at < FRESH_S
        state = None if fresh else observe([profile])[profile.name]
        if state is not None and not state.ready:
            why = "paused" if state.paused else "no online worker"
            self._end(self._begin(profile, "no-worker"), profile, "no-worker", f"pool {profile.work_pool}: {why}")
            return None
        mark_run_directory(self.output_dir)  # without an artifact store, a step that cannot see it stops at once
        child = run_deployment(
            profile.deployment,
            parameters={
                "request": self.request.model_dump(mode="json"),
                "dataset": json.loads(self.dataset.to_json()),
                "output_dir": str(self.output_dir),
                "mlflow_run_id": self.run_id,
                "request_run_id": self.request_id,
            },
            timeout=0,
            as_subflow=True,
            # Unique per attempt in the request's ledger, which outlives a pause: a resumed run (whose run_count
            # Prefect leaves as it was) or a retried one submits afresh instead of getting the paused step back.
            idempotency_key=f"{self.request_id}:{len(self.store.attempts(self.request_id)) + 1}",
            tags=["trainyard", f"profile:{profile.name}"],
        )
        attempt = self._begin(profile, "submitted", f"flow run {child.name}", child.id)
        outcome, reason = self._watch(child.id, attempt)
        if outcome == "crashed":  # a verdict that may be wrong: the next attempt must not train beside this one
            try:
                reason = f"{reason} Then {self._confirm_gone(child.id)}."[:500]
            except StillAlive as alive:
                self._end(attempt, profile, outcome, str(alive)[:500])
                raise
        self._end(attempt, profile, outcome, reason)
        if outcome == "completed":
            return read_step_result(self.run_id)
        if outcome == "paused":
            raise TrainingPaused(reason.removeprefix(PAUSED))
        if outcome == "failed" and not self.request.compute.fallback_on_failure:
            raise TrainingFailed(f"training failed on {profile.name} (not retried elsewhere): {reason}")
        if outcome == "cancelled":
            raise TrainingFailed(f"the training step on {profile.name} was cancelled: {reason}")
        return None

    def _confirm_gone(self, child_id) -> str:
        with get_client(sync_client=True) as client:
            return confirm_gone(client, child_id).how

    def _watch(self, child_id, attempt: Attempt) -> tuple[str, str]:
        deadline = time.monotonic() + self.request.compute.start_deadline_s
        started = False
        with get_client(sync_client=True) as client:
            while True:
                state = client.read_flow_run(child_id).state
                if state.is_running() and not started:
                    started = True
                    self.store.update_attempt(attempt.id, outcome="running")
                if state.is_final():
                    return _outcome(state), (state.message or state.name)[:500]
                if not started and time.monotonic() > deadline:
                    # Cancelled is terminal: a worker that picks the run up now cannot move it to Running.
                    client.set_flow_run_state(
                        child_id, Cancelled(message="not started by the start deadline"), force=True
                    )
                    return "late", f"not running {self.request.compute.start_deadline_s:g} s after submission"
                time.sleep(POLL_S)


def _outcome(state) -> str:
    if state.is_completed():
        return "completed"
    if state.is_crashed():
        return "crashed"
    if state.is_cancelled():
        return "paused" if (state.message or "").startswith(PAUSED) else "cancelled"
    return "failed"


@task
def train_on_compute(request, dataset: DatasetSpec, ranking: Ranking, output_dir: Path, run_id: str) -> StepResult:
    ensure_active(run_id)
    return Placement(request, dataset, output_dir, run_id, ranking).run()
