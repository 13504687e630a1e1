"""Stages 3-5 of one attempt, on the compute host: train, evaluate the best checkpoint, export it to ONNX with a
parity check, and store the model once (the artifact store when there is one, else the MLflow run).

One GPU lease covers training and evaluation; the export runs on the CPU after it is released. The training step
flow (flows/train_step.py) runs this on another pool's host; placement runs it in the train flow's own process when
the chosen pool is the flow's own. Either way the flow host gets the result from the MLflow run, never a file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from prefect.runtime import flow_run

from tasks.evaluation import evaluate_model
from tasks.export import ExportedModel, export_model, log_model
from tasks.remote_storage import (
    CheckpointUploads,
    StoredModel,
    artifact_store,
    checkpoint_mirror,
    restore_checkpoints,
    upload_model,
)
from tasks.resources import held_resources
from tasks.training import train_model
from trainers.base import TrainResult
from trainers.data.spec import DatasetSpec
from trainers.onnx_export import ParityReport

STEP_RESULT = "results/train-step.json"  # in the MLflow run: what the flow host registers and reports from


@dataclass(frozen=True)
class StepResult:
    """What an attempt produced: the training, the final metrics, the ONNX model and where the model is stored."""

    train: TrainResult
    metrics: dict[str, float]
    exported: ExportedModel
    stored: StoredModel | None = None

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: dict) -> StepResult:
        train = dict(data["train"])
        train.update(best_checkpoint=Path(train["best_checkpoint"]), last_checkpoint=Path(train["last_checkpoint"]))
        exported = data["exported"]
        stored = data.get("stored")
        if stored is not None:
            expires = stored["expires_at"]
            stored = StoredModel(**{**stored, "expires_at": datetime.fromisoformat(expires) if expires else None})
        return cls(
            TrainResult(**train),
            data["metrics"],
            ExportedModel(Path(exported["onnx_path"]), ParityReport(**exported["parity"])),
            stored,
        )


class StepResultMissing(RuntimeError):
    """The training step ended Completed, but its result is not in the MLflow run."""


def train_evaluate_export(
    request, dataset: DatasetSpec, output_dir: Path, run_id: str, request_run_id: str | None = None
) -> StepResult:
    """The model work of one attempt on this host, for the train flow run `request_run_id` (or this flow run)."""
    request_id = str(request_run_id or flow_run.id)
    # With an artifact store, checkpoints another host left there come down first, and each new one goes up.
    mirror = checkpoint_mirror(request.experiment, request_id, output_dir)
    if mirror is not None:
        mlflow.set_tag("checkpoints.uri", mirror.uri)
        restore_checkpoints(mirror)
    with (
        CheckpointUploads(mirror) as uploads,  # outermost: the last upload finishes after the GPUs are released
        held_resources(request, output_dir, run_id, request_id) as device,  # one lease: training and evaluation
    ):
        result = train_model(request, dataset, output_dir, run_id, device, uploads, request_run_id)
        metrics = evaluate_model(request, dataset, output_dir, result, run_id, device)
    exported = export_model(request, dataset, output_dir, result, run_id)  # on the CPU
    stored = upload_model(request, result, exported, request_id, run_id) if artifact_store() else None
    log_model(result, exported, run_id, checkpoint_uri=stored.checkpoint_uri if stored else None)
    step = StepResult(result, metrics, exported, stored)
    mlflow.log_dict(step.to_dict(), STEP_RESULT)  # last: its presence means the whole step completed
    return step


def read_step_result(run_id: str) -> StepResult:
    """On the flow host: what a completed training step on another pool left in the MLflow run."""
    try:
        data = mlflow.artifacts.load_dict(f"runs:/{run_id}/{STEP_RESULT}")
    except (MlflowException, OSError) as error:
        raise StepResultMissing(
            f"The training step ended Completed, but its result {STEP_RESULT} is not in MLflow run {run_id} "
            f"({type(error).__name__}: {error}). See the training step's log; run the request again to resume "
            "from its checkpoints."
        ) from error
    return StepResult.from_dict(data)
