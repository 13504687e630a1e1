"""The tests' one helper module for the servers' runs: waiting for what the servers do in their own time (a worker
online, an event stored, a flow run's state reached), looking up a flow run's MLflow runs, and free ports to start
servers on. Starting the servers themselves: tests/conftest.py (the session's stack), tests/pg_cluster.py,
tests/s3_server.py; a flow run's log: tests/prefect_logs.py.

Nothing here imports Prefect or MLflow at import time: tests/conftest.py takes its ports from here before anything
imports them (both read their settings at import).
"""

from __future__ import annotations

import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` now (another process may still take it before a server binds it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for(read, what: str, timeout: float = 30.0, poll: float = 0.2):
    """`read()`'s first truthy value; AssertionError naming `what` when none comes within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := read():
            return value
        time.sleep(poll)
    raise AssertionError(f"{what} did not come within {timeout:g} s")


def wait_ready(pool: str, timeout: float = 60.0) -> None:
    """Until the work pool is READY (one of its workers is online)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        wait_for(lambda: client.read_work_pool(pool).status.value == "READY", f"a worker online for {pool}", timeout)


def checkpointed_attempt(store, profile: str, timeout: float = 120.0):
    """The attempt running on `profile` once its training has written a checkpoint (torch's last.pt)."""
    from infra.settings import Settings

    def ready():
        running = [a for a in store.attempts() if a.profile == profile and a.outcome == "running"]
        if running and (Settings.from_env().runs_dir / running[0].request_id / "last.pt").exists():
            return running[0]
        return None

    return wait_for(ready, f"a training on {profile} with a checkpoint written", timeout, poll=0.5)


def gone_at(process):
    """When `process` (a psutil.Process) ended, watched from now on: run it in a thread beside what it waits for."""
    from datetime import UTC, datetime

    import psutil

    while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
    return datetime.now(UTC)


def wait_state(client, flow_run_id, done=None, timeout: float = 300, poll: float = 0.5, after=None):
    """The flow run's state once `done(state)` holds (default: the state is final), and, with `after` (a datetime),
    once it was entered after then: a retried or resumed run's next final state, not the one it had. `client`: a
    sync Prefect client on the run's server. TimeoutError naming the state it is still in after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        state = client.read_flow_run(flow_run_id).state
        if (done(state) if done else state.is_final()) and (after is None or state.timestamp > after):
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow run {flow_run_id} is still {state.name} after {timeout:g} s: {state.message}")
        time.sleep(poll)


def final_flow_runs(client, flow_run_ids, timeout: float, poll: float = 1.0) -> dict:
    """{flow run id (str): flow run} once every one is in a final state, or as they are after `timeout` seconds:
    the caller's assertions say which are not."""
    deadline = time.monotonic() + timeout
    while True:
        runs = {str(i): client.read_flow_run(i) for i in flow_run_ids}
        if all(run.state.is_final() for run in runs.values()) or time.monotonic() > deadline:
            return runs
        time.sleep(poll)


def mlflow_runs(flow_run_id, tracking_uri: str | None = None) -> list:
    """The MLflow runs a flow run recorded (tagged with its id), in every active experiment of the tracking server
    at `tracking_uri` (default: the session's, MLFLOW_TRACKING_URI). On the session's server this is what
    tasks.tracking.runs_of_flow_run finds; here also for the servers of a test of its own."""
    from mlflow import MlflowClient

    from tasks.tracking import TAG_FLOW_RUN

    mlflow = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    return mlflow.search_runs(experiments, filter_string=f"tags.`{TAG_FLOW_RUN}` = '{flow_run_id}'")
