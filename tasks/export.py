"""Stage 5: ONNX export of the best checkpoint, gated by a parity check against PyTorch on real images; and the
model's files logged to the MLflow run, for the flow host to register."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import onnx
from prefect import get_run_logger, task

from tasks.tracking import ensure_active
from tasks.training import make_job
from trainers.base import TrainResult, get_trainer
from trainers.data.spec import DatasetSpec
from trainers.onnx_export import ParityReport, check_onnx_parity, write_label_map


@dataclass(frozen=True)
class ExportedModel:
    onnx_path: Path
    parity: ParityReport


@task
def export_model(request, dataset: DatasetSpec, output_dir: Path, result: TrainResult, run_id: str) -> ExportedModel:
    ensure_active(run_id)
    job = make_job(request, dataset, "cpu", output_dir)  # export and the reference both run on the CPU
    trainer = get_trainer(request.trainer)
    onnx_path = trainer.export_onnx(
        job, result.best_checkpoint, output_dir / "export" / "model.onnx", request.export.opset
    )
    write_label_map(onnx_path, result.labels, {"trainyard.dataset_version": dataset.version})

    batch = trainer.parity_inputs(job, request.export.parity_images)
    reference = trainer.torch_outputs(job, result.best_checkpoint, batch)
    parity = check_onnx_parity(
        onnx_path, batch, reference, atol=request.export.parity_atol, rtol=request.export.parity_rtol
    )
    get_run_logger().info(
        "ONNX parity on %d validation images: max |diff| %.2e (atol %g, rtol %g)",
        parity.images,
        parity.max_abs_diff,
        parity.atol,
        parity.rtol,
    )
    mlflow.log_metric("onnx_parity_max_abs_diff", parity.max_abs_diff)
    mlflow.set_tag("onnx.path", str(onnx_path))
    return ExportedModel(onnx_path, parity)


def _serving_requirements() -> list[str]:
    """What serving the ONNX model needs. Stated, because MLflow's inference spends seconds in a subprocess."""
    import onnxruntime

    return [f"mlflow=={mlflow.__version__}", f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]


@task
def log_model(result: TrainResult, exported: ExportedModel, run_id: str, checkpoint_uri: str | None = None) -> None:
    """The MLflow model (`runs:/<run>/model`): the ONNX model, the label map and the best PyTorch checkpoint, which
    is stored once: here, or, with an artifact store, only there (`checkpoint_uri`, named in checkpoint.json)."""
    ensure_active(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        mlflow.onnx.save_model(onnx.load(str(exported.onnx_path)), model_dir, pip_requirements=_serving_requirements())
        best = result.best_checkpoint
        if checkpoint_uri:
            (model_dir / "checkpoint.json").write_text(json.dumps({"uri": checkpoint_uri, "name": best.name}))
        else:
            checkpoint_dir = model_dir / "checkpoint"
            checkpoint_dir.mkdir()
            if best.is_dir():  # a Hugging Face checkpoint is a directory
                shutil.copytree(best, checkpoint_dir / best.name)
            else:
                shutil.copy2(best, checkpoint_dir / best.name)
        (model_dir / "labels.json").write_text(json.dumps(dict(enumerate(result.labels)), ensure_ascii=False))
        mlflow.log_artifacts(str(model_dir), "model")
