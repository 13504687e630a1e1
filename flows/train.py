"""The train flow: prepare_dataset -> select_compute -> train (with fallback) -> evaluate -> export -> register.

One MLflow run records the whole pipeline, across every attempt; the Prefect run shows each stage, live progress,
every compute attempt and a summary.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow
from prefect.runtime import flow_run

from flows.request import TrainRequest, request_parameters
from infra.settings import Settings
from tasks.compute import select_compute
from tasks.control import paused_training_suspends_the_run
from tasks.dataset import prepare_dataset, publish_dataset_stats
from tasks.evaluation import evaluate_model
from tasks.export import export_model
from tasks.placement import train_on_compute
from tasks.registry import register_model
from tasks.report import publish_summary
from tasks.tracking import end_runs_left_running, pipeline_run
from trainers.registry import trainer_spec


@dataclass(frozen=True)
class TrainSummary:
    mlflow_run_id: str
    mlflow_run_url: str
    model_name: str
    model_version: str
    onnx_path: str
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
    dataset = prepare_dataset(request.dataset, trainer_spec(request.trainer).dataset_format)
    publish_dataset_stats(dataset)
    ranking = select_compute(request, dataset.version)
    output_dir = Settings.from_env().runs_dir / str(flow_run.id or "local")  # shared by every attempt

    # A pause (Prefect UI or CLI) checkpoints and suspends the run; Resume runs this flow again, which resumes.
    with paused_training_suspends_the_run(), pipeline_run(request, dataset, ranking) as run_id:
        result = train_on_compute(request, dataset, ranking, output_dir, run_id)
        metrics = evaluate_model(request, dataset, output_dir, result, run_id)
        exported = export_model(request, dataset, output_dir, result, run_id)
        model = register_model(request, result, exported, run_id)
        run_url = publish_summary(request, run_id, metrics, exported, model)

    return TrainSummary(run_id, run_url, model.name, model.version, str(exported.onnx_path), metrics, ranking.reasons)
