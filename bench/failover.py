"""Failover time: from a failure to the fallback attempt, for the three ways a place to train fails.

- no_worker:    the preferred pool has no online worker. Failure = the moment select_compute ranked it out
                (its task run's end); fallback = the next profile's attempt submitted.
- crash:        a Docker pool served by a real prefect-docker worker on a machine without a Docker engine.
                Failure = the attempt's Crashed state; fallback = the next attempt submitted.
- worker_death: the worker and its training process are killed (kill -9) mid-training. Failure = the kill;
                fallback = the next attempt submitted (after the zombie automation marks the run Crashed).
The figure is the time until the fallback's training step is Running (the issue's "fallback attempt running");
each line also gives the time until that attempt was submitted.

It uses the running stack (`make up`; without it the bench says so in one line) with its own temporary store,
pools and workers. SIGTERM stops it and the workers it started (and the trainings they run).

    python bench/failover.py
Last line: failover_s no_worker=<s> crash=<s> worker_death=<s>   (failure -> fallback's training step Running)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
from _common import exit_on_sigterm, running_stack
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter

from infra.compute.store import ComputeProfile, Store
from infra.settings import Settings
from infra.stack import services as local_stack
from infra.stack.apply import apply_profiles
from infra.stack.automations import ensure_zombie_automation
from trainers.data.synthetic import make_shapes_classification

PROFILES = [("ghost", "process"), ("docker", "docker"), ("victim", "process"), ("backup", "process")]


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _running_at(flow_run_id: str) -> datetime:
    with get_client(sync_client=True) as client:
        return _utc(client.read_flow_run(flow_run_id).start_time)


def _train(dataset: str, profiles: list[str], epochs: int = 2):
    from flows.train import train

    state = train(
        dataset=dataset,
        compute={"profiles": profiles},
        epochs=epochs,
        image_size=32,
        batch_size=8,
        checkpoint={"min_interval_seconds": 0},  # short epochs, each checkpointed: worker_death kills mid-training
        experiment="bench-failover",
        return_state=True,
    )
    assert state.is_completed(), state.message
    return state


def no_worker(store: Store, dataset: str) -> tuple[float, float]:
    state = _train(dataset, ["ghost", "backup"])
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]}))
    ranked_out = _utc(next(r for r in runs if r.name.startswith("select_compute")).end_time)
    backup = store.attempts(str(state.state_details.flow_run_id))[-1]
    submitted = _utc(backup.started_at)
    return (submitted - ranked_out).total_seconds(), (_running_at(backup.flow_run_id) - ranked_out).total_seconds()


def crash(store: Store, dataset: str) -> tuple[float, float]:
    state = _train(dataset, ["docker", "backup"])
    crashed, backup = store.attempts(str(state.state_details.flow_run_id))
    with get_client(sync_client=True) as client:
        crashed_at = _utc(client.read_flow_run(crashed.flow_run_id).state.timestamp)
    submitted = _utc(backup.started_at)
    return (submitted - crashed_at).total_seconds(), (_running_at(backup.flow_run_id) - crashed_at).total_seconds()


def worker_death(store: Store, dataset: str, settings: Settings, victim) -> tuple[float, float]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(state=_train(dataset, ["victim", "backup"], epochs=80)))
    thread.start()
    while not any(a.profile == "victim" and a.outcome == "running" for a in store.attempts()):
        time.sleep(0.5)
    request_id = next(a.request_id for a in store.attempts() if a.profile == "victim")
    while not (settings.runs_dir / request_id / "last.pt").exists():
        time.sleep(0.5)
    killed_at = datetime.now(UTC)
    worker = local_stack.running(settings, victim)
    for process in [*worker.children(recursive=True), worker]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    thread.join()
    backup = store.attempts(request_id)[-1]
    submitted = _utc(backup.started_at)
    return (submitted - killed_at).total_seconds(), (_running_at(backup.flow_run_id) - killed_at).total_seconds()


def stop_workers(settings: Settings, workers: list) -> None:
    """Stop the bench's workers (and the trainings they run), all at once."""
    threads = [threading.Thread(target=local_stack.stop, args=(settings, worker)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> None:
    settings = running_stack("bench/failover.py")
    tmp = Path(tempfile.mkdtemp(prefix="trainyard-failover-"))
    url = f"sqlite:///{tmp / 'store.db'}"
    os.environ["TRAINYARD_STORE_URL"] = url
    store = Store(url)
    for priority, (name, kind) in enumerate(PROFILES):
        store.save_profile(  # pools and deployments of their own, so the bench never touches real ones
            ComputeProfile(
                name=name,
                kind=kind,
                work_pool=f"bench-{name}",
                deployment=f"train-step/bench-{name}",
                priority=priority,
                cpu_cores=2,
                ram_gb=8,
            )
        )
    asyncio.run(apply_profiles(store.profiles()))
    ensure_zombie_automation()
    workers = {
        name: local_stack.worker_service(settings, f"bench-{name}", kind, {"TRAINYARD_STORE_URL": url})
        for name, kind in PROFILES
        if name != "ghost"
    }
    exit_on_sigterm(lambda: stop_workers(settings, list(workers.values())))
    dataset = str(make_shapes_classification(tmp / "shapes", train_per_class=8, val_per_class=4, image_size=32))
    try:
        for worker in workers.values():
            local_stack.start(settings, worker)
        time.sleep(15)  # workers come online
        _train(dataset, ["backup"])  # warm-up: dataset cache, imports
        figures = {
            "no_worker": no_worker(store, dataset),
            "crash": crash(store, dataset),
            "worker_death": worker_death(store, dataset, settings, workers["victim"]),
        }
    finally:
        stop_workers(settings, list(workers.values()))
    for name, (submitted, running) in figures.items():
        print(
            f"{name}: failure -> fallback attempt submitted {submitted:.2f} s, "
            f"-> its training step Running {running:.2f} s"
        )
    print("failover_s " + " ".join(f"{name}={running:.2f}" for name, (_, running) in figures.items()))


if __name__ == "__main__":
    main()
