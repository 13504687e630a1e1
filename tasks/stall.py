"""A stalled training is a different case from a dead one: its process lives (its launcher vouches for it) but
makes no progress: a deadlock, a hung data loader, a collective that never returns.

StallWatch measures the silence since the trainer's last optimizer step, epoch or checkpoint
(`TrainControl.mark_progress`). Past the request's `compute.stall_timeout_s` it reports once: a STALLED event on the
flow run (automations can notify on it, docs/monitoring.md), a markdown artifact and a log line. With
`compute.on_stall: fallback` it then ends the attempt as an infrastructure crash: the run is set Crashed and the
process group killed, so the train flow's fallback resumes the training elsewhere from its last checkpoint.
When progress comes back after a report, it says so (PROGRESSING) and watches again.
"""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
from uuid import UUID

from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.states import Crashed

from trainers.base import Callback, TrainControl

STALLED = "trainyard.run.stalled"
PROGRESSING = "trainyard.run.progressing"  # progress again after a STALLED report
POLL_S = 2.0

log = logging.getLogger("trainyard.stall")


class StallWatch(Callback):
    """Watches one training for silence; a context manager around training and one of the job's callbacks."""

    def __init__(
        self, flow_run_id: UUID | str, control: TrainControl, timeout_s: float | None, action: str = "alert"
    ) -> None:
        self.flow_run_id = str(flow_run_id)
        self.control, self.timeout_s, self.action = control, timeout_s, action
        self.reported = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StallWatch:
        self.control.mark_progress()  # the watch starts now, not when the control was made
        if self.timeout_s:
            # In this task's context: the artifact belongs to this flow and task run, as if made by the task.
            context = contextvars.copy_context()
            self._thread = threading.Thread(target=context.run, args=(self._watch,), name="stall", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._check()  # a training that went on and ended between two looks still clears its alert

    def _watch(self) -> None:
        poll = min(POLL_S, self.timeout_s / 4)
        while not self._stop.wait(poll):
            self._check()

    def _check(self) -> None:
        silent = self.control.seconds_without_progress
        try:
            if silent > self.timeout_s and not self.reported:
                self._report(silent)
                self.reported = True
            elif silent <= self.timeout_s and self.reported:
                self.reported = False
                log.warning("training progresses again")
                emit_event(PROGRESSING, resource=self._resource())
            if silent > self.timeout_s and self.action == "fallback" and not self._stop.is_set():
                self._end_as_crashed(silent)  # does not return
        except Exception as error:  # the server busy: the next look tries again
            log.warning("stall watch: %s", error)

    # epochs and checkpoints are progress too (a trainer whose validation or save is long makes no steps then)
    def on_train_start(self, total_epochs: int, start_epoch: int) -> None:
        self.control.mark_progress()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.control.mark_progress()

    def on_checkpoint(self, epoch: int, path) -> None:
        self.control.mark_progress()

    def _resource(self) -> dict[str, str]:
        return {"prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}"}

    def _report(self, silent: float) -> None:
        then = "ending this attempt as crashed, for fallback" if self.action == "fallback" else "alert only"
        log.warning("training stalled: no progress for %.0f s (stall_timeout_s %g); %s", silent, self.timeout_s, then)
        emit_event(
            STALLED,
            resource=self._resource(),
            payload={
                "seconds_without_progress": round(silent),
                "stall_timeout_s": self.timeout_s,
                "action": self.action,
            },
        )
        create_markdown_artifact(
            f"**Training stalled**: its process lives but made no progress (no optimizer step, epoch or checkpoint) "
            f"for {silent:.0f} s, over `compute.stall_timeout_s` = {self.timeout_s:g} s. Action: {then}. Look at "
            "the run's logs; a hung data loader or a deadlock shows in `py-spy dump --pid <pid>` on its host.",
            key="stalled",
            description="A live training that stopped making progress",
        )

    def _end_as_crashed(self, silent: float) -> None:
        message = f"Stalled: no progress for {silent:.0f} s (compute.stall_timeout_s {self.timeout_s:g}); killed"
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(self.flow_run_id, Crashed(message=message), force=True)
        # The run's own process group when its launcher made one (infra/runs/warm_start.py), else this process alone.
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
