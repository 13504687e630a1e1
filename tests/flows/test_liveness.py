"""Runs are never declared dead while they live, and a verdict of death is never acted on while the process may
still run: real trainings on real process workers, started by Trainyard's launcher, against the real zombie
automation; the train flow runs in the test process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import FlowRunFilter, LogFilter
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.states import Crashed, Running
from waiting import checkpointed_attempt, gone_at, wait_for, wait_ready

from flows.cleanup import cleanup
from flows.train import train
from infra.compute.allocation import HOLDER_PREFIX, _set_variable
from infra.compute.store import ComputeProfile, Store
from infra.runs.fencing import launcher_events
from infra.runs.liveness import HEARTBEAT, VOUCHER
from infra.stack import services as local_stack
from infra.stack.apply import apply_profiles
from infra.stack.automations import ZOMBIE_AFTER
from tasks.stall import PROGRESSING, STALLED
from tests.flows.models import GIL_HOLD_S

FAST = {"epochs": 2, "batch_size": 8, "image_size": 32}
POOLS = {"hog": "hog-pool", "victim": "victim-pool", "backup": "backup-pool"}
HANG_MARK = Path(tempfile.gettempdir()) / f"trainyard-hang-{uuid.uuid4().hex}"  # tests/flows/models.py:hang_once


@pytest.fixture(scope="module")
def pools(stack, tmp_path_factory):
    home = tmp_path_factory.mktemp("liveness")
    url = f"sqlite:///{home / 'store.db'}"
    store = Store(url)
    for priority, (name, pool) in enumerate(POOLS.items()):
        store.save_profile(
            ComputeProfile(
                name=name, work_pool=pool, deployment=f"train-step/{name}", priority=priority, cpu_cores=2, ram_gb=8
            )
        )
    asyncio.run(apply_profiles(store.profiles()))
    env = {"TRAINYARD_STORE_URL": url, "TRAINYARD_TEST_HANG_MARK": str(HANG_MARK)}
    workers = [local_stack.worker_service(stack, pool, "process", env) for pool in POOLS.values()]
    for worker in workers:
        local_stack.start(stack, worker)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRAINYARD_STORE_URL", url)
        try:
            for pool in POOLS.values():
                wait_ready(pool)
            yield store
        finally:
            for worker in workers:
                local_stack.stop(stack, worker)


def _heartbeats(client, run_id, since: datetime) -> list:
    page = client.read_events(
        filter=EventFilter(
            occurred=EventOccurredFilter(since=since),
            event=EventNameFilter(name=[HEARTBEAT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
        ),
        limit=50,
    )
    events = list(page.events)
    while page.next_page:
        page = client.read_events_page(page.next_page)
        events += page.events
    return events


def _largest_gap(times: list[datetime]) -> float:
    times = sorted(times)
    return max((b - a).total_seconds() for a, b in zip(times, times[1:], strict=False))


def test_a_training_that_holds_the_gil_past_the_zombie_window_is_not_declared_dead(pools, shapes_cls):
    """Reproduces the false Crashed: the model's first forward pass holds the interpreter lock for 80 s, so
    Prefect's own heartbeat thread in the training process cannot run for longer than the 60 s window. The run's
    launcher vouches for it from outside; the run is never Crashed and completes on its first attempt."""
    started = datetime.now(UTC)
    state = train(
        dataset=str(shapes_cls),
        model="tests.flows.models:gil_hog",
        compute={"profiles": ["hog"]},
        **FAST,
        return_state=True,
    )
    assert state.is_completed(), state.message
    [attempt] = pools.attempts(str(state.state_details.flow_run_id))
    assert (attempt.profile, attempt.outcome) == ("hog", "completed")
    with get_client(sync_client=True) as client:
        history = client.read_flow_run_states(attempt.flow_run_id)
        assert not any(s.is_crashed() for s in history), [(s.name, s.message) for s in history]
        beats = _heartbeats(client, attempt.flow_run_id, started)
        ended = client.read_flow_run(attempt.flow_run_id).end_time
    engine = [e.occurred for e in beats if e.payload.get("vouched_by") != VOUCHER]
    launcher = [e.occurred for e in beats if e.payload.get("vouched_by") == VOUCHER]
    # Prefect's heartbeats alone left a gap longer than the zombie window (up to the next one, or to the run's
    # end): without the launcher's, the automation would have marked the run Crashed while it trained.
    assert engine and _largest_gap([*engine, ended]) > ZOMBIE_AFTER.total_seconds(), (engine, ended)
    assert _largest_gap(launcher) < 30, launcher  # the launcher kept vouching through the hold
    assert max(launcher) - min(launcher) > timedelta(seconds=GIL_HOLD_S)


def test_a_wrongly_reported_death_starts_no_second_attempt_beside_the_live_one(pools, shapes_cls):
    """The step's run is set Crashed while its training runs (what a wrong zombie verdict does). The fallback
    attempt starts only after that training's process is gone, and resumes from its checkpoint."""
    request = {"dataset": str(shapes_cls), "compute": {"profiles": ["victim", "backup"]}, **FAST, "epochs": 60}
    request["checkpoint"] = {"min_interval_seconds": 0}
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(train, **request, return_state=True)
        step = checkpointed_attempt(pools, "victim").flow_run_id
        with get_client(sync_client=True) as client:
            since = datetime.now(UTC) - timedelta(minutes=5)
            vouched = wait_for(lambda: launcher_events(client, step, since), "the launcher's heartbeat")
            training = psutil.Process(vouched[0].payload["pid"])
            gone: list[datetime] = []
            watcher = threading.Thread(target=lambda: gone.append(gone_at(training)), daemon=True)
            watcher.start()
            client.set_flow_run_state(step, Crashed(message="No heartbeat for 60 s: its host or worker was lost."))
        state = future.result(timeout=400)
        watcher.join(timeout=30)
    assert state.is_completed(), state.message
    victim, backup = pools.attempts(str(state.state_details.flow_run_id))
    assert (victim.profile, victim.outcome, backup.profile, backup.outcome) == (
        "victim",
        "crashed",
        "backup",
        "completed",
    )
    assert "killed" in victim.reason, victim.reason
    assert gone and gone[0] <= backup.started_at.replace(tzinfo=UTC), (gone, backup.started_at)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [backup.flow_run_id]}))
    assert any("resuming" in log.message for log in logs)


@flow(name="held-gpu")
def held_gpu() -> None: ...


def test_cleanup_frees_no_gpu_held_by_a_crashed_run_whose_process_lives(stack):
    """A lease record of a run declared Crashed, whose process still runs here: its slots stay taken until the
    process is gone, then cleanup frees them."""
    import socket

    name = f"trainyard-gpu-{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with get_client(sync_client=True) as client:
            run = client.create_flow_run(held_gpu, state=Running()).id
            client.set_flow_run_state(run, Crashed(message="No heartbeat for 60 s"), force=True)
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=8))
            client.increment_concurrency_slots([name], 3, mode="concurrency")
            since = datetime.fromtimestamp(psutil.Process(holder.pid).create_time() + 0.5, UTC)
            record = f"{HOLDER_PREFIX}{uuid.uuid4().hex}"
            value = {
                "host": socket.gethostname(),
                "limits": [name],
                "slots": [3],
                "flow_run_id": str(run),
                "flow_run_name": "held",
                "mlflow_run_id": None,
                "pid": holder.pid,
                "since": since.isoformat(),
            }
            assert _set_variable(record, value, ["trainyard-lease"])

            report = cleanup()
            assert name not in report.released and record not in report.records_removed
            assert client.read_global_concurrency_limit_by_name(name).active_slots == 3

            holder.kill()
            holder.wait()
            report = cleanup()
            assert report.released[name] == 3 and record in report.records_removed
            assert client.read_global_concurrency_limit_by_name(name).active_slots == 0
    finally:
        holder.kill()
        holder.wait()


def _step_events(run_id, names: list[str]) -> list:
    with get_client(sync_client=True) as client:
        return client.read_events(
            filter=EventFilter(
                occurred=EventOccurredFilter(since=datetime.now(UTC) - timedelta(hours=1)),
                event=EventNameFilter(name=names),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
            ),
            limit=50,
        ).events


def test_a_stalled_training_is_reported_and_goes_on_when_it_progresses_again(pools, shapes_cls):
    HANG_MARK.write_text("25")  # hangs 25 s, the stall timeout is 8 s
    state = train(
        dataset=str(shapes_cls),
        model="tests.flows.models:hang_once",
        compute={"profiles": ["hog"], "stall_timeout_s": 8},
        **FAST,
        return_state=True,
    )
    assert state.is_completed(), state.message
    [attempt] = pools.attempts(str(state.state_details.flow_run_id))
    assert attempt.outcome == "completed"
    events = wait_for(lambda: _step_events(attempt.flow_run_id, [STALLED, PROGRESSING]), "the stall events")
    by_name = {e.event: e for e in events}
    assert by_name[STALLED].payload["seconds_without_progress"] >= 8 and by_name[STALLED].payload["action"] == "alert"
    assert PROGRESSING in by_name  # it went on training, and said so
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [attempt.flow_run_id]}))
    assert any(a.key == "stalled" and "Training stalled" in a.data for a in artifacts)


def test_a_stalled_training_that_asks_for_fallback_is_ended_and_resumed_elsewhere(pools, shapes_cls):
    HANG_MARK.write_text("600")  # would hang for ten minutes
    started = time.monotonic()
    state = train(
        dataset=str(shapes_cls),
        model="tests.flows.models:hang_once",
        compute={"profiles": ["victim", "backup"], "stall_timeout_s": 8, "on_stall": "fallback"},
        **FAST,
        return_state=True,
    )
    assert state.is_completed(), state.message
    victim, backup = pools.attempts(str(state.state_details.flow_run_id))
    assert (victim.outcome, backup.profile, backup.outcome) == ("crashed", "backup", "completed")
    assert victim.reason.startswith("Stalled: no progress for"), victim.reason
    assert time.monotonic() - started < 240  # not the ten minutes of the hang
    assert [e.payload["action"] for e in _step_events(victim.flow_run_id, [STALLED])] == ["fallback"]
