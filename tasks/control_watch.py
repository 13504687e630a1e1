"""Pause and "checkpoint now" for a running training: from the Prefect UI or CLI to the trainer, and back.

- Pause: the train flow run is Suspended (the Prefect UI's Pause or Suspend, or `python -m flows.control pause`).
  The training process sees that state, the trainer checkpoints at its next boundary and raises TrainingPaused, and
  the flow leaves through Prefect's own Pause signal: the process exits, its worker slot and GPU are free, and the
  run stays Suspended. Resume (the UI or `python -m flows.control resume`) reschedules the flow run; it runs again
  from the top and training resumes from the checkpoint, on whichever compute profile is chosen then.
- Checkpoint now: a flow run input keyed CHECKPOINT_KEY-<id> (`python -m flows.control checkpoint`). It is deleted
  once a checkpoint has been written after it, which is how the CLI knows the checkpoint exists.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.exceptions import Pause
from prefect.runtime import flow_run

from trainers.base import Callback, TrainControl, TrainingPaused

CHECKPOINT_KEY = "trainyard-checkpoint"
PAUSED_EVENT = "trainyard.flow-run.paused"  # this run's process is leaving because the run is paused
PAUSED = "paused: "  # how a training step that stopped for a pause starts its Cancelled message
POLL_S = 2.0  # a pause reaches the trainer within this plus one training step

log = logging.getLogger("trainyard.control")


class ControlWatch(Callback):
    """Polls the train flow run for a pause and checkpoint requests, hands them to the trainer, acknowledges them.

    Used as a context manager around training, and as one of the job's callbacks (to acknowledge checkpoints)."""

    def __init__(self, flow_run_id: UUID | str, control: TrainControl, poll_s: float = POLL_S) -> None:
        self.flow_run_id = UUID(str(flow_run_id))
        self.control = control
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._pending: set[str] = set()  # requests not answered by a checkpoint yet
        self._thread = threading.Thread(target=self._watch, name="trainyard-control", daemon=True)

    def __enter__(self) -> ControlWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        with get_client(sync_client=True) as client:
            while not self._stop.wait(self.poll_s):
                try:
                    self._poll(client)
                except Exception as error:  # the server busy or restarting: ask again next time
                    log.debug("control poll failed: %s", error)

    def _poll(self, client) -> None:
        state = client.read_flow_run(self.flow_run_id).state
        if state is not None and state.is_paused() and not self.control.pause_requested:
            log.warning("flow run %s is %s: checkpointing and stopping training", self.flow_run_id, state.name)
            self.control.request_pause()
        found = client.filter_flow_run_input(self.flow_run_id, CHECKPOINT_KEY, limit=100, exclude_keys=self._seen)
        if found:
            with self._lock:
                self._seen.update(item.key for item in found)
                self._pending.update(item.key for item in found)
            log.warning("checkpoint requested: writing one at the next step")
            self.control.request_checkpoint()

    def on_checkpoint(self, epoch: int, path: Path) -> None:
        with self._lock:
            answered, self._pending = self._pending, set()
        if answered:
            with get_client(sync_client=True) as client:
                for key in answered:
                    with contextlib.suppress(Exception):  # already gone: nothing to acknowledge
                        client.delete_flow_run_input(self.flow_run_id, key)


@contextlib.contextmanager
def paused_training_suspends_the_run() -> Iterator[None]:
    """A TrainingPaused out of the training stage ends this flow run's process the way Prefect's suspend does.

    Prefect's Pause signal leaves the run Suspended (the user's request) and the process exits cleanly, so the worker
    reports no crash; Resume runs the flow again. On the way out it emits PAUSED_EVENT: a heartbeat this process sent
    after the Suspended event would otherwise make the zombie automation crash the paused run a minute later."""
    try:
        yield
    except (TrainingPaused, Pause) as stopped:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.id).state
        if state is None or not state.is_paused():
            raise  # paused and resumed before training stopped: report it instead of exiting silently
        emit_event(PAUSED_EVENT, resource={"prefect.resource.id": f"prefect.flow-run.{flow_run.id}"})
        if isinstance(stopped, Pause):
            raise
        raise Pause(f"training paused: {stopped}", state=state) from stopped
