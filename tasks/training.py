"""Stage 3: run the chosen trainer on this host, with live progress in the Prefect UI."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks.control_watch import ControlWatch
from tasks.stall import StallWatch
from tasks.tracking import ensure_active
from trainers.base import Callback, TrainControl, TrainJob, TrainResult, get_trainer
from trainers.data.spec import DatasetSpec


class PrefectProgress(Callback):
    """Epoch progress as a Prefect progress artifact, and a log line per epoch and checkpoint."""

    def __init__(self) -> None:
        self.artifact_id = None
        self.total = 1
        self.logger = get_run_logger()

    def on_train_start(self, total_epochs: int, start_epoch: int) -> None:
        self.total = total_epochs
        self.artifact_id = create_progress_artifact(
            100.0 * start_epoch / total_epochs, key="training-progress", description="Epochs completed (%)"
        )
        if start_epoch:
            self.logger.info("resuming at epoch %d of %d", start_epoch + 1, total_epochs)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.artifact_id is not None:
            update_progress_artifact(self.artifact_id, 100.0 * epoch / self.total)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        self.logger.info("epoch %d/%d: %s", epoch, self.total, shown)

    def on_checkpoint(self, epoch: int, path: Path) -> None:
        self.logger.info("checkpoint after epoch %d: %s", epoch, path)
        mlflow.set_tag("checkpoint.last", str(path))  # what a cancelled or crashed run leaves to resume from


def make_job(request, dataset: DatasetSpec, device: str, output_dir: Path, callbacks=(), control=None) -> TrainJob:
    return TrainJob(request.train_config(), dataset, output_dir, device, list(callbacks), control or TrainControl())


@task(cache_policy=NO_CACHE)  # a training is never a cached result; `uploads` cannot be hashed either
def train_model(
    request,
    dataset: DatasetSpec,
    output_dir: Path,
    run_id: str,
    device: str,
    uploads: Callback | None = None,
    request_run_id: str | None = None,
) -> TrainResult:
    """Train on this host's `device` (its GPU lease is held by the caller). A pause or "checkpoint now" asked of
    the train flow run (`request_run_id`, or this flow run) reaches the trainer through a ControlWatch; a training
    without progress for compute.stall_timeout_s is reported (or ended for fallback) by a StallWatch; `uploads`
    pushes each checkpoint to the artifact store."""
    ensure_active(run_id)
    # Prefect forwards the trainers' logger (PREFECT_LOGGING_EXTRA_LOGGERS) but leaves its level at the root's
    # WARNING, which would drop the per-epoch INFO lines.
    logging.getLogger("trainers").setLevel(logging.INFO)
    control = TrainControl()
    with (
        ControlWatch(request_run_id or flow_run.id, control) as watch,
        StallWatch(flow_run.id, control, request.compute.stall_timeout_s, request.compute.on_stall) as stall,
    ):
        callbacks = [PrefectProgress(), watch, stall, *([uploads] if uploads else [])]
        job = make_job(request, dataset, device, output_dir, callbacks, control)
        return get_trainer(request.trainer).train(job)
