"""Stage 5: ONNX export of the best checkpoint, gated by a parity check against PyTorch on real images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
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
