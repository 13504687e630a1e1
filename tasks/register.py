"""Stage 6: one MLflow model version carrying the ONNX model, the PyTorch checkpoint and the label map."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import onnx
from mlflow import MlflowClient
from prefect import task

from tasks.export import ExportedModel
from tasks.tracking import ensure_active
from trainers.base import TrainResult


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    alias: str
    source: str


def _serving_requirements() -> list[str]:
    """What serving the ONNX model needs. Stated, because MLflow's inference spends seconds in a subprocess."""
    import onnxruntime

    return [f"mlflow=={mlflow.__version__}", f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]


@task
def register_model(request, result: TrainResult, exported: ExportedModel, run_id: str) -> RegisteredModel:
    ensure_active(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        mlflow.onnx.save_model(onnx.load(str(exported.onnx_path)), model_dir, pip_requirements=_serving_requirements())
        checkpoint_dir = model_dir / "checkpoint"
        checkpoint_dir.mkdir()
        best = result.best_checkpoint
        if best.is_dir():  # a Hugging Face checkpoint is a directory
            shutil.copytree(best, checkpoint_dir / best.name)
        else:
            shutil.copy2(best, checkpoint_dir / best.name)
        (model_dir / "labels.json").write_text(json.dumps(dict(enumerate(result.labels)), ensure_ascii=False))
        mlflow.log_artifacts(str(model_dir), "model")
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
        f"{exported.parity.max_abs_diff:.3g}",
    )
    return RegisteredModel(request.registered_model, str(version.version), request.alias, version.source)
