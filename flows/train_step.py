"""The training step as a flow of its own, deployed on every compute profile's work pool ("train-step/<profile>").

The train flow submits it to the chosen profile and falls back to the next one when it cannot start or crashes.
It trains into the request's checkpoint directory, which every attempt shares, so a later attempt resumes; with an
artifact store (TRAINYARD_ARTIFACT_STORE) the checkpoints also come from there when this host lacks them. An s3://
dataset is synced into this host's cache first.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Cancelled

from flows.request import TrainRequest
from tasks.control import PAUSED
from tasks.storage import checkpoint_mirror, is_remote, localize_dataset, restore_checkpoints
from tasks.tracking import attached_run
from tasks.training import train_model
from trainers.base import TrainingPaused, TrainResult
from trainers.data.spec import DatasetSpec

RESULT_FILE = "train-result.json"


@flow(name="train-step")
def train_step(
    request: dict, dataset: dict, output_dir: str, mlflow_run_id: str, request_run_id: str | None = None
) -> dict:
    """Train one model for a train flow run (`request_run_id`): the stage that may run on another machine.

    When that run is paused, training checkpoints and this run ends Cancelled with a "paused" message (a subflow
    cannot be suspended itself); the train flow's next attempt resumes from the checkpoint."""
    train_request = TrainRequest(**request)
    spec = DatasetSpec.from_json(json.dumps(dataset))
    if is_remote(train_request.dataset):  # this host's own synced copy (the spec names the submitting host's cache)
        spec = localize_dataset(train_request.dataset, spec)
    try:
        with attached_run(mlflow_run_id):
            result = train_model(train_request, spec, Path(output_dir), mlflow_run_id, request_run_id)
    except TrainingPaused as paused:
        return Cancelled(message=f"{PAUSED}{paused}")
    payload = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    (Path(output_dir) / RESULT_FILE).write_text(json.dumps(payload))
    mirror = checkpoint_mirror(train_request.experiment, str(request_run_id or flow_run.id), Path(output_dir))
    if mirror is not None:  # the train flow's host reads the result and the best checkpoint from there
        mirror.push()
    return payload


def read_result(output_dir: Path, experiment: str, request_id: str) -> TrainResult:
    """What a training step on another pool produced: from the shared run directory, or, on a host that lacks it,
    fetched from the artifact store first."""
    if not (output_dir / RESULT_FILE).exists() and (mirror := checkpoint_mirror(experiment, request_id, output_dir)):
        restore_checkpoints(mirror)
    data = json.loads((output_dir / RESULT_FILE).read_text())
    data.update(best_checkpoint=Path(data["best_checkpoint"]), last_checkpoint=Path(data["last_checkpoint"]))
    return TrainResult(**data)
