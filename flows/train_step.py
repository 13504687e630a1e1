"""The training step as a flow of its own, deployed on every compute profile's work pool ("train-step/<profile>").

The train flow submits it to the chosen profile and falls back to the next one when it cannot start or crashes.
It trains into the request's checkpoint directory, which every attempt shares, so a later attempt resumes.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from prefect import flow
from prefect.states import Cancelled

from flows.request import TrainRequest
from tasks.control import PAUSED
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
    try:
        with attached_run(mlflow_run_id):
            result = train_model(train_request, spec, Path(output_dir), mlflow_run_id, request_run_id)
    except TrainingPaused as paused:
        return Cancelled(message=f"{PAUSED}{paused}")
    payload = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    (Path(output_dir) / RESULT_FILE).write_text(json.dumps(payload))
    return payload


def read_result(output_dir: Path) -> TrainResult:
    """What a training step on another pool produced, read from the shared checkpoint directory."""
    data = json.loads((output_dir / RESULT_FILE).read_text())
    data.update(best_checkpoint=Path(data["best_checkpoint"]), last_checkpoint=Path(data["last_checkpoint"]))
    return TrainResult(**data)
