"""The train flow: [sync_dataset] -> prepare_dataset -> select_compute -> train (with fallback) -> evaluate -> export
-> [upload_model] -> register.

One MLflow run records the whole pipeline, across every attempt; the Prefect run shows each stage, live progress,
every compute attempt and a summary. An s3:// dataset is synced into the local cache first; with an artifact store
(TRAINYARD_ARTIFACT_STORE) checkpoints and the exported model are uploaded to it (tasks/remote_storage.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow
from prefect.runtime import flow_run

from flows.request import TrainRequest, request_parameters
from infra.settings import get_settings
from tasks.choose_compute import select_compute
from tasks.control_watch import paused_training_suspends_the_run
from tasks.dataset import prepare_dataset, publish_dataset_stats
from tasks.placement import train_on_compute
from tasks.register import register_model
from tasks.remote_storage import artifact_store, check_artifact_store, is_remote, sync_dataset
from tasks.report import publish_summary
from tasks.tracking import end_runs_left_running, pipeline_run
from trainers.registry import trainer_spec


@dataclass(frozen=True)
class TrainSummary:
    mlflow_run_id: str
    mlflow_run_url: str
    model_name: str
    model_version: str
    onnx_path: str  # on the host that trained it
    onnx_uri: str | None  # in the artifact store, when there is one
    metrics: dict[str, float]
    compute_reasons: dict[str, str]  # every profile and why it was (not) chosen


def _close_mlflow_run(flow, flow_run, state) -> None:
    # Prefect calls hooks with these keyword names (a worker runs them for a cancelled or crashed process).
    end_runs_left_running(str(flow_run.id), "KILLED" if state.is_cancelled() or state.is_cancelling() else "FAILED")


@flow(name="train", on_crashed=[_close_mlflow_run], on_cancellation=[_close_mlflow_run])
@request_parameters(TrainRequest)
def train(**parameters) -> TrainSummary:
    """Train, evaluate, export to ONNX and register a vision model."""
    request = TrainRequest(**parameters)
    if artifact_store():
        check_artifact_store(request.experiment)
    local_dataset = sync_dataset(request.dataset) if is_remote(request.dataset) else request.dataset
    dataset = prepare_dataset(local_dataset, trainer_spec(request.trainer).dataset_format)
    publish_dataset_stats(dataset)
    ranking = select_compute(request, dataset.version)
    run = str(flow_run.id or "local")
    output_dir = get_settings().runs_dir / run  # shared by every attempt

    # A pause (Prefect UI or CLI) checkpoints and suspends the run; Resume runs this flow again, which resumes.
    with paused_training_suspends_the_run(), pipeline_run(request, dataset, ranking) as run_id:
        step = train_on_compute(request, dataset, ranking, output_dir, run_id)  # train, evaluate, export
        model = register_model(request, step, run_id)
        run_url = publish_summary(request, run_id, step, model)

    onnx_uri = step.stored.onnx_uri if step.stored else None
    onnx_path = str(step.exported.onnx_path)
    return TrainSummary(run_id, run_url, model.name, model.version, onnx_path, onnx_uri, step.metrics, ranking.reasons)
