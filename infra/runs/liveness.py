"""Liveness of the flow runs a process worker starts: their launcher, not the run itself, vouches that they live.

Prefect's flow-run heartbeat comes from a thread inside the run's own process. That thread needs the interpreter
lock and CPU time like the training does: every one of its 30 one-second sleeps must take the lock back, so a
training that holds the lock in C calls, or a machine that starves the process, delays the heartbeat past the
zombie window and the run is marked Crashed while it trains (docs/monitoring.md, "Why runs were marked Crashed").

The launcher (`python -m infra.runs.warm_start`, the job command of Trainyard's process pools) is the process the
worker starts and watches. It does nothing but wait for the run's process, so it is never short of the lock and
needs microseconds of CPU. A `Voucher` thread in it posts the same `prefect.flow-run.heartbeat` event every
HEARTBEAT_S on the run's behalf, with its host and the pids, and reads the run's state:
- while the run is not final, it vouches (and the zombie automation never fires for a live process);
- when the run is Crashed while its process still lives (a verdict that was wrong), it makes the verdict true:
  it kills the run's process group and says so (FENCED), so a fallback never trains beside it;
- when the server is on another host and has accepted no heartbeat for SELF_FENCE_S (this host is cut off), it
  fences too, for the same reason: the control host then takes the run as gone once its launcher has been silent
  longer than that (infra/runs/fencing.py). A server on this host cannot be cut off from it: a slow one (SQLite's lock
  under load) is waited for, never taken for a partition;
- when the process ends, it says so (EXITED), and sends nothing more.
tasks/placement.py reads these events before it starts a second attempt (`infra.liveness_check`).

Standard library only: the launcher starts in ~30 ms and must not import Prefect.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime

HEARTBEAT = "prefect.flow-run.heartbeat"  # the event Prefect's engine sends and the zombie automation watches
FENCED = "trainyard.flow-run.fenced"  # the launcher killed its run's process after a Crashed verdict
EXITED = "trainyard.flow-run.exited"  # the run's process has ended (any way); nothing more comes from this launcher
VOUCHER = "trainyard-launcher"  # payload["vouched_by"] of the launcher's heartbeats
HEARTBEAT_S = 10.0
SELF_FENCE_S = 60.0  # a host cut off from a remote server this long stops its run (fencing.SILENT_GONE_S is longer)
REQUEST_TIMEOUT_S = 20.0  # a busy server answers late, not never: a heartbeat accepted late still counts
LOOPBACK = {"localhost", "127.0.0.1", "::1"}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


class PrefectAPI:
    """The two calls the launcher needs, over plain HTTP with the worker's client settings."""

    def __init__(self, url: str, env: dict[str, str]) -> None:
        self.url = url.rstrip("/")
        host = urllib.parse.urlsplit(self.url).hostname or ""
        self.remote = host not in LOOPBACK and not host.startswith("127.")
        self.headers = {"Content-Type": "application/json"}
        if env.get("PREFECT_API_KEY"):
            self.headers["Authorization"] = f"Bearer {env['PREFECT_API_KEY']}"
        elif env.get("PREFECT_API_AUTH_STRING"):
            token = base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> PrefectAPI | None:
        env = dict(os.environ if env is None else env)
        url = env.get("PREFECT_API_URL")
        return cls(url, env) if url else None

    def post_event(self, event: str, flow_run_id: str, payload: dict, occurred: datetime | None = None) -> bool:
        """True when the server accepted it."""
        body = {
            "id": str(uuid.uuid4()),
            "occurred": (occurred or datetime.now(UTC)).isoformat(),
            "event": event,
            "resource": {"prefect.resource.id": f"prefect.flow-run.{flow_run_id}"},
            "payload": payload,
            "related": [],
        }
        return self._request("POST", "/events", [body]) is not None

    def flow_run_state(self, flow_run_id: str) -> str | None:
        """The run's state type (RUNNING, CRASHED, ...), or None when the server cannot be asked."""
        run = self._request("GET", f"/flow_runs/{flow_run_id}")
        return ((run or {}).get("state") or {}).get("type")

    def _request(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=self.headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                text = response.read()
        except (OSError, urllib.error.URLError, ValueError):
            return None
        return json.loads(text) if text else {}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours has ended: only its exit status is left to collect
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def kill_group(pid: int) -> None:
    """SIGKILL the run's process and everything it started (the run leads its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Voucher:
    """Vouches for one flow run's process while it lives; fences it when the server has declared it dead."""

    def __init__(
        self,
        api: PrefectAPI,
        flow_run_id: str,
        child: int,
        *,
        period: float = HEARTBEAT_S,
        self_fence_after: float = SELF_FENCE_S,
    ) -> None:
        self.api, self.flow_run_id, self.child = api, flow_run_id, child
        self.period, self.self_fence_after = period, self_fence_after
        self.payload = {
            "vouched_by": VOUCHER,
            "host": socket.gethostname(),
            "launcher_pid": os.getpid(),
            "pid": child,
            "started": time.time(),  # with the pid, tells this process from a later one that reuses the pid
        }
        self.fenced: str | None = None  # why, once fenced
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one event at a time: EXITED is always the last
        self._thread = threading.Thread(target=self._loop, name="trainyard-voucher", daemon=True)

    def start(self) -> Voucher:
        self._thread.start()
        return self

    def close(self, exit_code: int) -> None:
        """The run's process has ended: say so, and send nothing more."""
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT_S * 2 + 1)
        with self._lock:
            self.api.post_event(EXITED, self.flow_run_id, {**self.payload, "exit_code": exit_code})

    def _loop(self) -> None:
        accepted = time.monotonic()  # the launcher has just been started by a worker that reached the server
        while not self._stop.is_set():
            state = self.api.flow_run_state(self.flow_run_id)
            with self._lock:
                if self._stop.is_set():
                    return
                if state == "CRASHED" and alive(self.child):
                    self._fence("the server marked the run Crashed while its process was alive")
                    return
                if state in FINAL_STATES:
                    return  # ended: a heartbeat now would only open a zombie window for nothing
                sent = time.monotonic()
                if self.api.post_event(HEARTBEAT, self.flow_run_id, self.payload):
                    accepted = sent  # when it was made: the server goes by that time, not by its arrival
                elif self.api.remote and time.monotonic() - accepted > self.self_fence_after:
                    silent = time.monotonic() - accepted
                    self._fence(f"the server at {self.api.url} accepted no heartbeat for {silent:.0f} s: cut off")
                    return
            self._stop.wait(self.period)

    def _fence(self, why: str) -> None:
        kill_group(self.child)
        self.fenced = why
        print(f"trainyard launcher: killed flow run {self.flow_run_id} (pid {self.child}): {why}", flush=True)
        self.api.post_event(FENCED, self.flow_run_id, {**self.payload, "reason": why})
