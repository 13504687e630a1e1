"""Stage 4: final metrics of the best checkpoint on val, and on test when the dataset has one."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import task
from prefect.artifacts import create_table_artifact

from tasks.tracking import ensure_active
from tasks.training import make_job
from trainers.base import TrainResult, get_trainer
from trainers.data.spec import DatasetSpec


@task
def evaluate_model(
    request, dataset: DatasetSpec, output_dir: Path, result: TrainResult, run_id: str, device: str
) -> dict[str, float]:
    """On the training's host and device, under its GPU lease (tasks/model_work.py)."""
    ensure_active(run_id)
    trainer = get_trainer(request.trainer)
    metrics: dict[str, float] = {}
    job = make_job(request, dataset, device, output_dir)
    for split in ("val", "test"):
        if split in dataset.splits:
            metrics.update(trainer.evaluate(job, result.best_checkpoint, split))
    mlflow.log_metrics({f"final_{name}": value for name, value in metrics.items()})
    mlflow.log_dict({"best_checkpoint": result.metrics, "final": metrics}, "results/metrics.json")
    # Logged after training so they cost the start of training nothing; the run's tags hold the same facts.
    mlflow.log_dict(dataset.label_map, "labels.json")
    mlflow.log_dict(json.loads(dataset.to_json()), "dataset.json")
    create_table_artifact(
        [{"metric": name, "value": round(value, 6)} for name, value in metrics.items()],
        key="final-metrics",
        description="Best checkpoint, evaluated after training",
    )
    return metrics
