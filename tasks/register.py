"""Stage 6, on the flow host: one MLflow model version from the model files the training step logged to the run
(tasks/export.py log_model), with the request's alias and the ONNX parity as a tag."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from prefect import task

from tasks.model_work import StepResult
from tasks.tracking import ensure_active


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    alias: str
    source: str


@task
def register_model(request, step: StepResult, run_id: str) -> RegisteredModel:
    ensure_active(run_id)
    version = mlflow.register_model(
        f"runs:/{run_id}/model",
        request.registered_model,
        tags={"trainer": request.trainer},
        await_registration_for=0,  # the version is READY at once here; the default wait sleeps seconds
    )
    client = MlflowClient()
    client.set_registered_model_alias(request.registered_model, request.alias, version.version)
    client.set_model_version_tag(
        request.registered_model,
        version.version,
        "onnx_parity_max_abs_diff",
        f"{step.exported.parity.max_abs_diff:.3g}",
    )
    return RegisteredModel(request.registered_model, str(version.version), request.alias, version.source)
