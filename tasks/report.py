"""The run summary in the Prefect UI: where the model is and how it did."""

from __future__ import annotations

import mlflow
from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.model_work import StepResult
from tasks.register import RegisteredModel


def mlflow_run_url(run_id: str) -> str:
    run = mlflow.get_run(run_id)
    return f"{mlflow.get_tracking_uri().rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


@task
def publish_summary(request, run_id: str, step: StepResult, model: RegisteredModel) -> str:
    url = mlflow_run_url(run_id)
    metrics, exported, stored = step.metrics, step.exported, step.stored
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in metrics.items())
    download = ""
    if stored is not None:
        until = f"until {stored.expires_at:%Y-%m-%d %H:%M} UTC" if stored.expires_at else "no expiry"
        download = (
            f"- Stored: `{stored.onnx_uri}` (sha256 `{stored.onnx_sha256}`), checkpoint `{stored.checkpoint_uri}`\n"
            f"- Download ONNX: [presigned URL]({stored.download_url}) ({until})\n"
        )
    create_markdown_artifact(
        f"## {model.name} v{model.version} (@{model.alias})\n\n"
        f"- MLflow run: [{run_id}]({url})\n"
        f"- Registered model: `models:/{model.name}@{model.alias}` (version {model.version})\n"
        f"- ONNX: `{exported.onnx_path}` (parity on {exported.parity.images} validation images: "
        f"max |diff| {exported.parity.max_abs_diff:.2e})\n"
        f"{download}"
        f"- Trainer: {request.trainer} / {request.model}, {request.epochs} epochs\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n",
        key="training-summary",
        description="Where the trained model is and how it did",
    )
    return url
