"""The launcher's voucher (infra/runs/liveness.py) and the check before acting on a Crashed verdict (fencing.py),
against the session's real Prefect server, with a real process standing in for a training."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import psutil
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Crashed, Running
from waiting import wait_for

from infra.runs.fencing import StillAlive, confirm_gone, launcher_events
from infra.runs.liveness import FENCED, HEARTBEAT, VOUCHER, PrefectAPI, Voucher


@flow(name="liveness-placeholder")
def placeholder() -> None: ...


@pytest.fixture
def running_run(stack) -> str:
    with get_client(sync_client=True) as client:
        return str(client.create_flow_run(placeholder, state=Running()).id)


@pytest.fixture
def training():
    """A process in a process group of its own, as the launcher starts a run."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def _events(run_id: str, name: str) -> list:
    with get_client(sync_client=True) as client:
        since = datetime.now(UTC) - timedelta(minutes=10)
        return [e for e in launcher_events(client, run_id, since) if e.event == name]


def test_the_launcher_vouches_while_the_process_lives_and_fences_it_on_a_crashed_verdict(running_run, training):
    voucher = Voucher(PrefectAPI.from_env(), running_run, training.pid, period=0.5).start()
    try:
        [beat, *_] = wait_for(lambda: _events(running_run, HEARTBEAT), "a stored heartbeat from the launcher")
        assert beat.payload["pid"] == training.pid and beat.payload["vouched_by"] == VOUCHER
        with get_client(sync_client=True) as client:  # what the zombie automation does when it is wrong
            client.set_flow_run_state(running_run, Crashed(message="No heartbeat for 60 s"))
        assert training.wait(timeout=10) == -9  # killed: the verdict is made true before anyone acts on it
        [fenced] = wait_for(lambda: _events(running_run, FENCED), "the fence event")
        assert "marked the run Crashed" in fenced.payload["reason"]
        with get_client(sync_client=True) as client:
            gone = confirm_gone(client, running_run, timeout=30)
        assert "killed by its launcher" in gone.how
    finally:
        voucher.close(-9)


def test_a_launcher_cut_off_from_the_server_stops_its_run_before_a_verdict_can_come(training):
    unreachable = PrefectAPI("http://127.0.0.1:9/api", {})  # nothing listens on the discard port
    unreachable.remote = True  # as a server on the control host is, seen from a training host
    voucher = Voucher(unreachable, "00000000-0000-0000-0000-000000000000", training.pid, period=0.2)
    voucher.self_fence_after = 1.0
    voucher.start()
    assert training.wait(timeout=10) == -9
    assert "cut off" in voucher.fenced
    voucher.close(-9)


def test_a_crashed_run_on_this_host_whose_process_lives_is_killed_before_anyone_acts(running_run, training):
    api = PrefectAPI.from_env()
    voucher = Voucher(api, running_run, training.pid, period=60).start()  # vouched once, then not looking
    try:
        wait_for(lambda: _events(running_run, HEARTBEAT), "a stored heartbeat")
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(running_run, Crashed(message="No heartbeat for 60 s"))
            gone = confirm_gone(client, running_run, timeout=30)
        assert "still ran on this host and was killed" in gone.how
        assert not psutil.pid_exists(training.pid)  # killed, and reaped by the check that waited for it
    finally:
        voucher.close(-9)


def _remote_payload(pid: int = 4242) -> dict:
    return {"vouched_by": VOUCHER, "host": "gpu-host-elsewhere", "launcher_pid": 1, "pid": pid, "started": 0.0}


def test_a_launcher_on_another_host_that_keeps_vouching_stops_a_second_attempt(running_run):
    api = PrefectAPI.from_env()
    api.post_event(HEARTBEAT, running_run, _remote_payload())
    wait_for(lambda: _events(running_run, HEARTBEAT), "the remote heartbeat")
    with get_client(sync_client=True) as client, pytest.raises(StillAlive, match="still vouches for it"):
        confirm_gone(client, running_run, timeout=3)


def test_a_launcher_on_another_host_that_went_silent_is_taken_as_gone(running_run):
    api = PrefectAPI.from_env()
    long_ago = datetime.now(UTC) - timedelta(minutes=3)
    api.post_event(HEARTBEAT, running_run, _remote_payload(), occurred=long_ago)
    wait_for(lambda: _events(running_run, HEARTBEAT), "the remote heartbeat")
    with get_client(sync_client=True) as client:
        gone = confirm_gone(client, running_run, timeout=10)
    assert "gpu-host-elsewhere has been silent" in gone.how


def test_a_run_no_launcher_vouched_for_has_nothing_to_wait_for(running_run):
    started = time.monotonic()
    with get_client(sync_client=True) as client:
        gone = confirm_gone(client, running_run, timeout=10)
    assert "no launcher vouched" in gone.how and time.monotonic() - started < 5


def test_the_voucher_sends_nothing_after_its_run_ended(running_run, training):
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(running_run, Crashed(message="ended"), force=True)
    training.kill()
    training.wait()
    voucher = Voucher(PrefectAPI.from_env(), running_run, training.pid, period=0.2).start()
    time.sleep(1.5)
    voucher.close(-9)
    time.sleep(6)  # the server stores events in batches, at most 5 s apart
    assert _events(running_run, HEARTBEAT) == []
    assert not psutil.pid_exists(training.pid) or psutil.Process(training.pid).status() == psutil.STATUS_ZOMBIE


def test_a_server_on_this_host_that_does_not_answer_is_waited_for_not_taken_for_a_partition(training):
    """A server on loopback cannot be cut off from this host: when it is slow or down (SQLite's lock under load,
    a restart), the run goes on; only its verdict, once given, is acted on."""
    silent = PrefectAPI("http://127.0.0.1:9/api", {})
    voucher = Voucher(silent, "00000000-0000-0000-0000-000000000000", training.pid, period=0.2)
    voucher.self_fence_after = 1.0
    voucher.start()
    time.sleep(3)
    assert training.poll() is None and voucher.fenced is None
    voucher.close(0)
