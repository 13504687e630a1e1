"""The training step as a flow of its own, deployed on every compute profile's work pool ("train-step/<profile>").

The train flow submits it to the chosen profile and falls back to the next one when it cannot start or crashes.
On this pool's host it trains into the request's run directory, which every attempt shares so that a later attempt
resumes; evaluates the best checkpoint; exports it to ONNX; and stores the model (tasks/model_work.py). The train
flow then registers it from the MLflow run. With an artifact store (TRAINYARD_ARTIFACT_STORE) the checkpoints also
come from there when this host's copy is behind; without one, the step stops before it trains when it cannot see
the train flow's run directory (tasks/run_directory.py). An s3:// dataset is synced into this host's cache first.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from prefect.states import Cancelled

from flows.request import TrainRequest
from tasks.control_watch import PAUSED
from tasks.model_work import train_evaluate_export
from tasks.remote_storage import artifact_store, is_remote, localize_dataset
from tasks.run_directory import require_shared
from tasks.tracking import attached_run
from trainers.base import TrainingPaused
from trainers.data.spec import DatasetSpec


@flow(name="train-step")
def train_step(
    request: dict, dataset: dict, output_dir: str, mlflow_run_id: str, request_run_id: str | None = None
) -> dict:
    """Train, evaluate and export one model for a train flow run (`request_run_id`): the stages that run on the
    compute host. When that run is paused, training checkpoints and this run ends Cancelled with a "paused" message
    (a subflow cannot be suspended itself); the train flow's next attempt resumes from the checkpoint."""
    train_request = TrainRequest(**request)
    if request_run_id and not artifact_store():  # before any download or GPU: a next attempt could not resume
        require_shared(Path(output_dir))
    spec = DatasetSpec.from_json(json.dumps(dataset))
    if is_remote(train_request.dataset):  # this host's own synced copy (the spec names the submitting host's cache)
        spec = localize_dataset(train_request.dataset, spec)
    try:
        with attached_run(mlflow_run_id):
            step = train_evaluate_export(train_request, spec, Path(output_dir), mlflow_run_id, request_run_id)
    except TrainingPaused as paused:
        return Cancelled(message=f"{PAUSED}{paused}")
    return step.to_dict()
