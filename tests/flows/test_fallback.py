"""Compute fallback with real work pools and real workers: no worker, a crashing Docker pool, a late start,
a failing user model, budget and capacity. The train flow runs in the test process; its training steps run
wherever the chosen profile's worker runs them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, LogFilter
from waiting import checkpointed_attempt, wait_for, wait_ready, wait_state

from flows.train import train
from infra.compute.store import ComputeProfile, Store
from infra.stack import services as local_stack
from infra.stack.apply import apply_profiles
from tasks.tracking import runs_of_flow_run

FAST = {"epochs": 2, "batch_size": 8, "image_size": 32}
PROFILES = [
    # name, kind, pool, price $/h, max concurrent, priority
    ("ghost", "process", "ghost-pool", 0.0, 1, 1),  # a pool nobody serves
    ("docker", "docker", "docker-pool", 0.5, 1, 2),  # served by a real Docker worker; no Docker engine here
    ("stalled", "process", "stalled-pool", 0.0, 1, 3),  # looks online (heartbeats), never picks anything up
    ("backup", "process", "backup-pool", 0.0, 1, 4),  # a real process worker
    ("pricey", "process", "backup-pool", 500.0, 1, 5),
    ("victim", "process", "victim-pool", 0.0, 1, 6),  # its worker is killed mid-training
]


@pytest.fixture(scope="module")
def pools(stack, tmp_path_factory):
    """The profiles above in a fresh store, their pools and train-step deployments, and their workers."""
    home = tmp_path_factory.mktemp("fallback")
    url = f"sqlite:///{home / 'store.db'}"
    store = Store(url)
    for name, kind, pool, price, slots, priority in PROFILES:
        store.save_profile(
            ComputeProfile(
                name=name,
                kind=kind,
                work_pool=pool,
                deployment=f"train-step/{name}",
                price_per_hour=price,
                max_concurrent=slots,
                priority=priority,
                cpu_cores=2,
                ram_gb=8,
            )
        )
    asyncio.run(apply_profiles(store.profiles()))  # pools and train-step deployments, as `python -m infra.stack.apply`
    workers = [
        local_stack.worker_service(stack, "backup-pool", "process", {"TRAINYARD_STORE_URL": url}),
        local_stack.worker_service(stack, "docker-pool", "docker", {"TRAINYARD_STORE_URL": url}),
    ]
    for worker in workers:
        local_stack.start(stack, worker)
    previous = os.environ.get("TRAINYARD_STORE_URL")
    os.environ["TRAINYARD_STORE_URL"] = url
    try:
        wait_ready("backup-pool")
        wait_ready("docker-pool")
        yield store
    finally:
        for worker in workers:
            local_stack.stop(stack, worker)
        if previous is None:
            os.environ.pop("TRAINYARD_STORE_URL", None)
        else:
            os.environ["TRAINYARD_STORE_URL"] = previous


def _request_id(state) -> str:
    return str(state.state_details.flow_run_id)


def _mlflow_runs(state) -> list:
    return runs_of_flow_run(_request_id(state))


def test_a_pool_without_worker_is_passed_over_and_the_next_profile_trains(pools, shapes_cls):
    state = train(dataset=str(shapes_cls), compute={"profiles": ["ghost", "backup"]}, return_state=True, **FAST)
    assert state.is_completed(), state.message
    attempts = pools.attempts(_request_id(state))
    assert [(a.profile, a.outcome) for a in attempts] == [("backup", "completed")]
    ranking_reasons = state.result().compute_reasons
    assert "no online worker" in ranking_reasons["ghost"]
    [run] = _mlflow_runs(state)
    assert run.info.status == "FINISHED" and run.data.tags["compute.profile"] == "backup"


def test_a_crashing_docker_pool_falls_back_to_the_process_pool(pools, shapes_cls):
    state = train(dataset=str(shapes_cls), compute={"profiles": ["docker", "backup"]}, return_state=True, **FAST)
    assert state.is_completed(), state.message
    attempts = pools.attempts(_request_id(state))
    assert [(a.profile, a.outcome) for a in attempts] == [("docker", "crashed"), ("backup", "completed")]
    assert "docker" in attempts[0].reason.lower()
    # the fallback attempt follows the crash at once, not after some poll or timeout (bench/failover.py times it)
    assert (attempts[1].started_at - attempts[0].ended_at).total_seconds() < 10
    [run] = _mlflow_runs(state)  # one MLflow run across both attempts
    assert run.data.tags["compute.attempt.1"].startswith("docker: crashed")
    assert run.data.tags["compute.attempt.2"].startswith("backup: completed")


def test_a_run_not_started_by_the_deadline_is_cancelled_and_the_next_profile_trains(pools, shapes_cls):
    with get_client(sync_client=True) as client:
        client.send_worker_heartbeat("stalled-pool", "asleep")  # online for 90 s, but never polls
    state = train(
        dataset=str(shapes_cls),
        compute={"profiles": ["stalled", "backup"], "start_deadline_s": 25},  # backup needs ~10 s to start
        return_state=True,
        **FAST,
    )
    assert state.is_completed(), state.message
    attempts = pools.attempts(_request_id(state))
    assert [(a.profile, a.outcome) for a in attempts] == [("stalled", "late"), ("backup", "completed")]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(attempts[0].flow_run_id).state.is_cancelled()


def test_a_failure_in_the_users_code_does_not_fall_back(pools, shapes_cls):
    state = train(
        dataset=str(shapes_cls),
        model="tests.flows.models:exploding",
        compute={"profiles": ["backup", "ghost"]},
        return_state=True,
        **FAST,
    )
    assert state.is_failed()
    assert "not retried elsewhere" in state.message and "exploded on purpose" in state.message
    assert [(a.profile, a.outcome) for a in pools.attempts(_request_id(state))] == [("backup", "failed")]
    assert [r.info.status for r in _mlflow_runs(state)] == ["FAILED"]


def test_over_budget_is_refused_before_anything_is_submitted(pools, shapes_cls):
    state = train(
        dataset=str(shapes_cls), compute={"profiles": ["pricey"], "budget_usd": 1.0}, return_state=True, **FAST
    )
    assert state.is_failed()
    assert "budget" in state.message and "pricey" in state.message
    assert pools.attempts(_request_id(state)) == [] and _mlflow_runs(state) == []


def test_a_request_no_profile_can_satisfy_is_refused_at_once(pools, shapes_cls):
    started = time.monotonic()
    state = train(dataset=str(shapes_cls), compute={"gpus": 64}, return_state=True, **FAST)
    assert state.is_failed() and "64" in state.message
    assert time.monotonic() - started < 30
    assert pools.attempts(_request_id(state)) == [] and _mlflow_runs(state) == []


def test_two_requests_never_oversubscribe_a_profile_with_one_slot(pools, shapes_cls):
    request = {"dataset": str(shapes_cls), "compute": {"profiles": ["backup", "local"]}, **FAST}
    pools.save_profile(
        ComputeProfile(
            name="local",
            work_pool="trainyard-local",
            deployment="train-step/local",
            priority=50,
            cpu_cores=2,
            ram_gb=8,
            max_concurrent=2,
        )
    )
    with ThreadPoolExecutor(2) as pool:
        states = list(pool.map(lambda _: train(**request, return_state=True), range(2)))
    assert all(s.is_completed() for s in states), [s.message for s in states]
    on_backup = [a for s in states for a in pools.attempts(_request_id(s)) if a.profile == "backup"]
    completed = [a for a in on_backup if a.outcome == "completed"]
    assert len(completed) <= 1
    # attempts that held the one slot ("full" ones were refused without it) never overlap in time
    spans = sorted((a.started_at, a.ended_at) for a in on_backup if a.outcome in {"completed", "failed", "crashed"})
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False))


def test_the_queue_strategy_waits_in_line_for_its_profile_and_shows_the_position(pools, shapes_cls):
    request = {
        "dataset": str(shapes_cls),
        "compute": {"profiles": ["backup"], "strategy": "queue", "queue_timeout_s": 300},
        **FAST,
    }
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(train, **request, return_state=True)
        deadline = time.monotonic() + 120
        while not any(a.outcome == "dequeued" for a in pools.attempts() if a.profile == "backup"):
            assert time.monotonic() < deadline, "the first request never got backup's slot"
            time.sleep(0.2)
        time.sleep(3)  # the second request arrives while the first holds backup's only slot
        second = pool.submit(train, **request, return_state=True)
        states = [first.result(), second.result()]
    assert all(s.is_completed() for s in states), [s.message for s in states]
    ledgers = [pools.attempts(_request_id(s)) for s in states]
    assert all([a.outcome for a in ledger][-1] == "completed" for ledger in ledgers)
    assert all({a.profile for a in ledger} == {"backup"} for ledger in ledgers)
    second_ticket = next(a for a in ledgers[1] if a.outcome == "dequeued")
    waited = int(second_ticket.reason.split("waited ")[1].split(" s")[0])
    assert waited >= 3 and "position 1" in second_ticket.reason  # next in line while the first one trained
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id={"any_": [states[1].state_details.flow_run_id]})
        )
    assert any(a.key == "queue-position" and "position **1**" in a.data for a in artifacts)
    runs = sorted((a.started_at, a.ended_at) for ledger in ledgers for a in ledger if a.outcome == "completed")
    assert runs[0][1] <= runs[1][0]  # one at a time on the one-slot profile


def _kill_tree(pid: int) -> None:
    """kill -9 a worker and everything it started, as a host failure would."""
    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def test_a_worker_killed_mid_training_is_detected_and_the_next_profile_resumes(pools, stack, shapes_cls):
    victim = local_stack.worker_service(stack, "victim-pool", "process", {"TRAINYARD_STORE_URL": pools.url})
    local_stack.start(stack, victim)
    wait_ready("victim-pool")
    request = {"dataset": str(shapes_cls), "compute": {"profiles": ["victim", "backup"]}, **FAST, "epochs": 60}
    request["checkpoint"] = {"min_interval_seconds": 0}  # the sub-second epochs checkpointed: killed mid-training
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(train, **request, return_state=True)
        checkpointed_attempt(pools, "victim")  # killed mid-training, after its first checkpoint
        time.sleep(1)
        killed_at = datetime.now(UTC)
        _kill_tree(local_stack.running(stack, victim).pid)
        state = future.result(timeout=400)
    assert state.is_completed(), state.message
    attempts = pools.attempts(_request_id(state))
    assert [(a.profile, a.outcome) for a in attempts] == [("victim", "crashed"), ("backup", "completed")]
    assert "heartbeat" in attempts[0].reason
    detected = (attempts[1].started_at.replace(tzinfo=UTC) - killed_at).total_seconds()
    assert detected < 100, f"fallback started {detected:.0f} s after the kill"  # launcher heartbeats 10 s apart + 60 s
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [attempts[1].flow_run_id]}))
    assert any("resuming" in log.message for log in logs)  # from the victim's last checkpoint, not from scratch


def test_when_no_profile_can_run_now_the_error_gives_each_profiles_reason(pools, shapes_cls):
    state = train(dataset=str(shapes_cls), compute={"profiles": ["ghost"]}, return_state=True, **FAST)
    assert state.is_failed()
    assert "no compute profile can run this training now" in state.message
    assert "ghost:" in state.message and "no online worker" in state.message
    assert "strategy 'queue'" in state.message  # and how to wait for capacity instead
    assert _mlflow_runs(state) == [] and pools.attempts(_request_id(state)) == []  # refused before anything


@pytest.fixture(scope="module")
def train_deployment(pools, stack):
    """`make deploy` for the torch demo and a process worker on the local pool: the train flow runs as a deployment
    (a run without one cannot be paused), its training steps on the profiles' pools."""
    import subprocess
    import sys
    from pathlib import Path

    from infra.settings import ROOT

    local_stack.ensure_work_pool(stack)
    prefect = str(Path(sys.executable).parent / "prefect")
    env = {**os.environ, **stack.client_env()}
    subprocess.run([prefect, "--no-prompt", "deploy", "-n", "torch-shapes"], cwd=ROOT, env=env, check=True, timeout=180)
    worker = local_stack.worker_service(stack, stack.work_pool, "process", {"TRAINYARD_STORE_URL": pools.url})
    local_stack.start(stack, worker)
    wait_ready(stack.work_pool)
    yield "train/torch-shapes"
    local_stack.stop(stack, worker)


def test_a_pause_reaches_a_training_on_another_pool_and_resume_finishes_it_there(pools, train_deployment, shapes_cls):
    """Pause (what the Prefect UI's Pause does) on a train flow run whose training step runs on the backup pool: the
    step checkpoints and ends, the train flow run is Suspended and holds no slot; Resume submits a new step, which
    resumes from that checkpoint and finishes, all in one MLflow run with every epoch once."""
    import subprocess
    import sys

    from mlflow import MlflowClient
    from prefect.deployments import run_deployment

    from infra.settings import ROOT, Settings
    from tasks.placement import profile_limit
    from trainers.checkpoints import CheckpointStore

    def control(*args) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "flows.control", *map(str, args)]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    epochs = 60
    parameters = {
        "dataset": str(shapes_cls),
        **FAST,
        "epochs": epochs,
        "batch_size": 4,
        "compute": {"profiles": ["backup"]},
        "checkpoint": {"min_interval_seconds": 0},  # a first checkpoint within an epoch, long before the last
    }
    run = run_deployment(train_deployment, parameters=parameters, timeout=0)
    store = CheckpointStore(Settings.from_env().runs_dir / str(run.id))
    wait_for(store.entries, "the training step's first checkpoint", timeout=180)
    [first] = pools.attempts(str(run.id))
    assert first.profile == "backup" and first.flow_run_id  # trained by the backup pool's worker

    with get_client(sync_client=True) as client:
        asked = time.time()
        paused = control("pause", run.id)
        assert paused.returncode == 0, paused.stderr
        step = wait_state(client, first.flow_run_id, timeout=120)
        assert step.is_cancelled() and step.message.startswith("paused: "), step
        parent = wait_state(client, run.id, lambda s: s.name == "Suspended" and _attempts_ended(pools, run.id), 120)
        newest = store.entries()[-1]
        assert newest.written_at >= asked and newest.written_at - asked < 30  # checkpointed on the way out
        assert newest.epoch < epochs
        assert [(a.profile, a.outcome) for a in pools.attempts(str(run.id))] == [("backup", "paused")]
        backup = next(p for p in pools.profiles() if p.name == "backup")
        slot = _wait_value(lambda: client.read_global_concurrency_limit_by_name(profile_limit(backup)).active_slots, 0)
        assert slot == 0, "the paused run still holds the backup profile's slot"
        [mlflow_run] = runs_of_flow_run(str(run.id))
        assert mlflow_run.info.status == "SCHEDULED", parent

        resumed = control("resume", run.id)
        assert resumed.returncode == 0, resumed.stderr
        state = wait_state(client, run.id, timeout=300)
        attempts = pools.attempts(str(run.id))
        assert state.is_completed(), (state.message, [(a.profile, a.outcome, a.flow_run_id) for a in attempts])
        assert [(a.profile, a.outcome) for a in attempts] == [("backup", "paused"), ("backup", "completed")]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [attempts[1].flow_run_id]}))
    assert any(f"resuming from {store.directory}" in log.message for log in logs)
    [mlflow_run] = runs_of_flow_run(str(run.id))
    assert mlflow_run.info.status == "FINISHED"
    history = MlflowClient().get_metric_history(mlflow_run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))


def _attempts_ended(store: Store, request_id) -> bool:
    return all(a.ended_at is not None for a in store.attempts(str(request_id)))


def _wait_value(read, wanted, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while (value := read()) != wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    return value
