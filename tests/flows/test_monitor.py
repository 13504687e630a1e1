"""The monitor and cleanup flows against the session's real Prefect and MLflow servers.

This machine has no GPU: the tests supply GPU inventories (the hardware only). Leases, flow runs, work pools,
deployments, events and artifacts are the real ones; the flows run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import mlflow
import pytest
from prefect import flow
from prefect.automations import Automation
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter
from prefect.events.actions import SendNotification
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.states import Completed, Running

from flows.cleanup import cleanup
from flows.monitor import monitor
from infra.compute.allocation import Need, gpu_lease, limit_name
from infra.compute.gpus import GPU, HostInventory
from infra.compute.store import Store
from infra.runs.monitoring import plan_pruning, prune
from infra.settings import ROOT, Settings
from infra.stack.automations import ZOMBIE_AUTOMATION
from trainers.checkpoints import CheckpointStore

_RELEASE: dict[str, threading.Event] = {}  # the holder flow's key -> set when it should release its GPU
_MLFLOW_RUN: dict[str, str] = {}  # the holder flow's key -> its MLflow run


def inventory(temperatures: tuple[int, ...]) -> HostInventory:
    """A host with one 8 GiB GPU per temperature, named afresh so no other test's limits or leases apply."""
    tag = uuid.uuid4().hex[:8]
    gpus = tuple(
        GPU(i, f"GPU-{tag}-{i}", f"Test GPU {tag}", 8192, 1024 * (i + 1), 40 + i, temp, 120.0, ())
        for i, temp in enumerate(temperatures)
    )
    return HostInventory(f"testhost-{tag}", 8, 4, 32.0, 30.0, 100.0, gpus, "test", "")


@flow(name="hold-gpu")
def hold_gpu(inventory_json: str, key: str) -> None:
    """A training stand-in: logs a metric, holds a whole GPU, then shows no progress until released."""
    with mlflow.start_run(run_name="hold-gpu") as run:
        _MLFLOW_RUN[key] = run.info.run_id
        mlflow.log_metric("train_loss", 1.0, step=1)
        with gpu_lease(Need(gpus=1), HostInventory.from_json(inventory_json), set_visible=False):
            _RELEASE[key].wait(120)


@flow(name="placeholder")
def placeholder() -> None:
    """Only its flow runs are used: created through the API in whatever state a test needs."""


def events(name: str, resource_id: str, timeout: float = 20) -> list:
    """The events of that name about that resource, once the server has them."""
    wanted = EventFilter(event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            found = client.read_events(filter=wanted, limit=50).events
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)


def active_slots(client, limit: str) -> int:
    try:
        return client.read_global_concurrency_limit_by_name(limit).active_slots
    except ObjectNotFound:
        return 0


def artifact_rows(state, key: str) -> list[dict]:
    """The rows of the table artifact `key` of the flow run that ended in `state`."""
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    [artifact] = [a for a in artifacts if a.key == key]
    return json.loads(artifact.data)


class TestMonitor:
    """One monitor run over a host with a held GPU (stuck: it shows no progress) and a hot one, and a pool that
    has a deployment but no worker."""

    @pytest.fixture(scope="class")
    def webhook(self, stack):
        """A local HTTP endpoint, and what docs/monitoring.md shows: a notification block that posts to it and an
        automation that sends it every trainyard.gpu.hot. Yields the bodies it receives."""
        received: list[dict] = []

        class Sink(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        server = HTTPServer(("127.0.0.1", 0), Sink)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        name = f"ty-test-{uuid.uuid4().hex[:8]}"
        url = f"http://127.0.0.1:{server.server_port}/hook"
        block_id = CustomWebhookNotificationBlock(name=name, url=url, json_data={"text": "{{body}}"}).save(name)
        automation = Automation(
            name=name,
            trigger=EventTrigger(expect={"trainyard.gpu.hot"}, posture=Posture.Reactive, threshold=1),
            actions=[
                SendNotification(
                    block_document_id=block_id,
                    subject="Hot GPU",
                    body="{{ event.resource.name }} at {{ event.payload.temperature_c }} °C",
                )
            ],
        ).create()
        yield received
        automation.delete()
        server.shutdown()

    @pytest.fixture(scope="class")
    def scene(self, stack, webhook):
        host = inventory(temperatures=(50, 95))
        key = uuid.uuid4().hex
        _RELEASE[key] = threading.Event()
        holder = threading.Thread(target=hold_gpu, args=(host.to_json(), key), daemon=True)
        holder.start()
        pool = f"ty-test-{uuid.uuid4().hex[:8]}"
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            flow_id = client.create_flow_from_name("placeholder")
            client.create_deployment(flow_id, "no-worker", work_pool_name=pool)
            held = limit_name(host.hostname, host.gpus[0])
            deadline = time.monotonic() + 60
            while not active_slots(client, held):
                assert time.monotonic() < deadline and holder.is_alive(), "the holder flow never leased its GPU"
                time.sleep(0.2)
        time.sleep(4)  # longer than stuck_after_minutes below: the holder shows no progress meanwhile
        line = Store()
        waiters = [line.join_gpu_line(host.hostname, "1 whole GPU", f"training {n}") for n in ("A", "B")]
        state = monitor(hot_celsius=85, stuck_after_minutes=0.05, remind_after_minutes=60, return_state=True)
        yield host, pool, state, _MLFLOW_RUN[key]
        for waiter in waiters:
            line.leave_gpu_line(waiter.id)
        _RELEASE[key].set()
        holder.join(timeout=60)

    @pytest.fixture(scope="class")
    def holder_run(self, scene):
        host, *_ = scene
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state={"type": {"any_": ["RUNNING"]}}))
        [run] = [r for r in runs if r.parameters.get("inventory_json") == host.to_json()]
        return run

    def test_the_gpu_table_names_who_holds_each_gpu(self, scene, holder_run):
        host, _, state, mlflow_run = scene
        assert state.is_completed(), state.message
        rows = [r for r in artifact_rows(state, "trainyard-monitor") if r["host"] == host.hostname]
        assert [r["gpu"] for r in rows] == [0, 1]
        held, free = rows
        assert held["holders"] == f"{holder_run.name} (flow run {holder_run.id}, MLflow run {mlflow_run}, 8 GiB)"
        assert held["leased GiB"] == "8 / 8" and held["memory used / total MiB"] == "1024 / 8192"
        assert free["holders"] == "free" and free["temperature °C"] == 95 and free["utilization %"] == 41

    def test_the_queue_table_shows_trainings_waiting_for_gpus_in_line_order(self, scene):
        host, _, state, _ = scene
        rows = [r for r in artifact_rows(state, "trainyard-monitor-queue") if r["where"] == f"GPUs of {host.hostname}"]
        assert [(r["kind"], r["request"], r["state"]) for r in rows] == [
            ("GPU wait", "training A: 1 whole GPU", "position 1"),
            ("GPU wait", "training B: 1 whole GPU", "position 2"),
        ]

    def test_a_hot_gpu_emits_trainyard_gpu_hot(self, scene):
        host, *_ = scene
        hot = host.gpus[1]
        [event] = events("trainyard.gpu.hot", f"trainyard.gpu.{host.hostname}.{hot.uuid}")
        assert event.payload["temperature_c"] == 95 and event.payload["threshold_c"] == 85
        assert event.payload["name"] == hot.name
        assert not events("trainyard.gpu.hot", f"trainyard.gpu.{host.hostname}.{host.gpus[0].uuid}", timeout=0)

    def test_an_automation_turns_the_hot_gpu_event_into_a_notification(self, scene, webhook):
        host, *_ = scene
        deadline = time.monotonic() + 60
        while not any(host.hostname in body["text"] for body in webhook) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert {"text": f"{host.hostname} GPU 1 ({host.gpus[1].name}) at 95 °C"} in webhook

    def test_a_pool_with_a_deployment_and_no_worker_emits_trainyard_pool_no_worker(self, scene):
        _, pool, state, _ = scene
        with get_client(sync_client=True) as client:
            pool_id = client.read_work_pool(pool).id
        [event] = events("trainyard.pool.no-worker", f"prefect.work-pool.{pool_id}")
        assert event.payload["pool"] == pool and event.payload["online_workers"] == 0
        assert event.payload["deployments"] == ["no-worker"]
        [row] = [r for r in artifact_rows(state, "trainyard-monitor-pools") if r["pool"] == pool]
        assert row["online workers"] == "0 / 0" and row["deployments"] == 1

    def test_a_run_holding_a_gpu_without_progress_emits_trainyard_run_stuck(self, scene, holder_run):
        host, _, _, mlflow_run = scene
        [event] = events("trainyard.run.stuck", f"prefect.flow-run.{holder_run.id}")
        assert event.payload["host"] == host.hostname and event.payload["mlflow_run_id"] == mlflow_run
        assert event.payload["gpus"] == [limit_name(host.hostname, host.gpus[0])]
        assert event.payload["minutes_without_progress"] >= 0.05 and event.payload["threshold_minutes"] == 0.05

    def test_an_alert_that_lasts_is_not_repeated_within_the_reminder_window(self, scene, holder_run):
        host, pool, *_ = scene
        events("trainyard.run.stuck", f"prefect.flow-run.{holder_run.id}")  # the first run's events have landed
        again = monitor(hot_celsius=85, stuck_after_minutes=0.05, remind_after_minutes=60)
        assert not [line for line in again.emitted if host.hostname in line or str(holder_run.id) in line]
        assert any(r.name == pool for r in again.pools)


class TestDeployments:
    """`make deploy` (prefect deploy --all) as it applies the monitor and cleanup entries of prefect.yaml."""

    @pytest.fixture(scope="class")
    def deployed(self, stack):
        from infra.stack.services import ensure_work_pool

        ensure_work_pool(stack)
        prefect = str(Path(sys.executable).parent / "prefect")
        command = [prefect, "--no-prompt", "deploy", "-n", "monitor", "-n", "cleanup"]
        subprocess.run(command, cwd=ROOT, env={**os.environ, **stack.client_env()}, check=True, capture_output=True)
        with get_client(sync_client=True) as client:
            deployments = [client.read_deployment_by_name(f"{name}/{name}") for name in ("monitor", "cleanup")]
        yield deployments
        with get_client(sync_client=True) as client:  # no schedule left running on the session's server
            for deployment in deployments:
                client.delete_deployment(deployment.id)

    def test_both_go_on_the_local_pool_every_minute_and_daily(self, deployed):
        monitor_deployment, cleanup_deployment = deployed
        assert monitor_deployment.work_pool_name == cleanup_deployment.work_pool_name == "trainyard-local"
        assert monitor_deployment.schedules[0].schedule.interval == timedelta(seconds=60)
        assert cleanup_deployment.schedules[0].schedule.cron == "0 4 * * *"
        assert all(d.schedules[0].active for d in deployed)
        assert monitor_deployment.parameter_openapi_schema["properties"]["hot_celsius"]["type"] == "integer"

    def test_the_server_schedules_monitor_runs(self, deployed):
        # Fails with SQLAlchemy 2.1, where Prefect 3.8.8's scheduler errors on every pass (hence the pin < 2.1).
        monitor_deployment, _ = deployed
        scheduled = FlowRunFilter(deployment_id={"any_": [monitor_deployment.id]})
        deadline = time.monotonic() + 20  # the server schedules a new deployment within about 5 s
        with get_client(sync_client=True) as client:
            while not client.read_flow_runs(flow_run_filter=scheduled, limit=1):
                assert time.monotonic() < deadline, "no monitor run was scheduled in 20 s"
                time.sleep(1)


# --- cleanup -----------------------------------------------------------------------------------------------------


def flow_run_in(state) -> str:
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(placeholder, state=Running())
        if not state.is_running():
            client.set_flow_run_state(run.id, state, force=True)
    return str(run.id)


def torch_checkpoints(run_id: str, count: int = 5) -> CheckpointStore:
    """`count` checkpoints in the run's directory, as the torch trainer writes them; the best is epoch 2."""
    store = CheckpointStore(Settings.from_env().runs_dir / run_id, keep_last=count)
    for epoch in range(1, count + 1):
        store.save(lambda handle, epoch=epoch: handle.write(bytes([epoch]) * 1000), epoch, epoch * 10, best=epoch == 2)
    return store


def files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_cleanup_prunes_finished_runs_to_retention_and_leaves_running_ones_alone(stack):
    finished = torch_checkpoints(flow_run_in(Completed()))
    running = torch_checkpoints(flow_run_in(Running()))
    before_finished, before_running = files(finished.directory), files(running.directory)

    report = cleanup(keep_last=2, dry_run=True)
    assert report.pruned[finished.directory.name] == ["ckpt-e0001-s00000010.pt", "ckpt-e0003-s00000030.pt"]
    assert files(finished.directory) == before_finished and len(finished.entries()) == 5  # dry run: nothing changed

    report = cleanup(keep_last=2)
    assert [e.epoch for e in finished.entries()] == [2, 4, 5]  # the newest two and the best
    assert files(finished.directory) == before_finished - {"ckpt-e0001-s00000010.pt", "ckpt-e0003-s00000030.pt"}
    assert all(finished.verified(entry) for entry in finished.entries())
    assert running.directory.name in report.kept_running and running.directory.name not in report.pruned
    assert files(running.directory) == before_running and len(running.entries()) == 5


def test_cleanup_crashes_a_running_flow_run_that_has_no_heartbeat(stack):
    zombie = flow_run_in(Running())
    time.sleep(2)
    report = cleanup(silent_after_minutes=1 / 60)
    assert any(zombie in line for line in report.crashed)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(zombie).state
        assert state.is_crashed(), state
        assert "no heartbeat" in state.message
    assert Automation.read(name=ZOMBIE_AUTOMATION).enabled  # ensured by cleanup, in case setup's is gone


def test_cleanup_releases_gpu_slots_that_no_lease_holds(stack):
    host = inventory(temperatures=(40,))
    name = limit_name(host.hostname, host.gpus[0])
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=8))
        client.increment_concurrency_slots([name], 3, mode="concurrency")  # slots taken with no lease: lost ones
        report = cleanup()
        assert report.released[name] == 3
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


# --- retention for each trainer's checkpoints (no server) --------------------------------------------------------


def test_retention_keeps_the_newest_and_the_best_hf_checkpoints_and_the_newest_yolo_epochs(tmp_path):
    for step in (10, 20, 30, 40, 50):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"w" * 100)
    best = str(tmp_path / "checkpoint-20")
    (tmp_path / "checkpoint-50" / "trainer_state.json").write_text(json.dumps({"best_model_checkpoint": best}))
    (tmp_path / "weights").mkdir()
    for name in ("last.pt", "best.pt", *(f"epoch{n}.pt" for n in range(1, 6))):
        (tmp_path / "weights" / name).write_bytes(b"y")

    plan = plan_pruning(tmp_path, keep_last=2)
    removed = {str(p.relative_to(tmp_path)) for p in plan.remove}
    assert removed == {"checkpoint-10", "checkpoint-30", "weights/epoch1.pt", "weights/epoch2.pt", "weights/epoch3.pt"}
    assert plan.freed_bytes == 2 * 100 + 3
    prune(plan)
    assert files(tmp_path) == {"checkpoint-20", "checkpoint-40", "checkpoint-50", "weights"}
    assert files(tmp_path / "weights") == {"last.pt", "best.pt", "epoch4.pt", "epoch5.pt"}


def test_retention_of_a_directory_without_checkpoints_removes_nothing(tmp_path):
    (tmp_path / "export").mkdir()
    assert plan_pruning(tmp_path, keep_last=1).remove == ()
