"""ONNX export checks shared by every trainer: parity with PyTorch, and the label map in the metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class ParityError(AssertionError):
    pass


@dataclass(frozen=True)
class ParityReport:
    images: int
    max_abs_diff: float
    atol: float
    rtol: float


def export_image_classifier(module, image_size: int, path: Path, opset: int, input_name: str = "images") -> Path:
    """ONNX of a module mapping NCHW float images to logits, with a dynamic batch axis."""
    import warnings

    import torch

    module.eval()  # the exporter restores the module's mode afterwards; BatchNorm must trace in eval mode
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Shape checks on constant sizes in model code are harmless for a fixed image size; the parity check
        # then runs the graph on real images with another batch size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (torch.zeros(2, 3, image_size, image_size),),
            str(tmp := path.with_name(f".{path.name}.tmp")),  # a crash mid-export never leaves a partial model
            dynamo=False,  # the dynamo exporter needs onnxscript; the TorchScript one covers these models
            opset_version=opset,
            input_names=[input_name],
            output_names=["logits"],
            dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}},
        )
    os.replace(tmp, path)
    return path


def onnx_outputs(onnx_path: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: batch.astype(np.float32)}
    return session.run(None, feed)[0]


def check_onnx_parity(
    onnx_path: Path, batch: np.ndarray, reference: np.ndarray, *, atol: float, rtol: float
) -> ParityReport:
    """ONNX Runtime must reproduce PyTorch on real images: |onnx - torch| <= atol + rtol * |torch|, elementwise."""
    actual = onnx_outputs(onnx_path, batch)
    if actual.shape != reference.shape:
        raise ParityError(f"ONNX output shape {actual.shape} differs from PyTorch's {reference.shape} ({onnx_path})")
    diff = np.abs(actual - reference)
    max_abs = float(diff.max()) if diff.size else 0.0
    if not np.all(diff <= atol + rtol * np.abs(reference)):
        worst = float((diff - rtol * np.abs(reference)).max())
        raise ParityError(
            f"ONNX model {onnx_path.name} does not match PyTorch on {len(batch)} validation images: "
            f"max |diff| {max_abs:.3g}, over the tolerance atol={atol} + rtol={rtol}*|ref| by {worst:.3g}. "
            "The export is wrong (an unsupported op or a preprocessing mismatch); the model was not registered."
        )
    return ParityReport(images=len(batch), max_abs_diff=max_abs, atol=atol, rtol=rtol)


def write_label_map(onnx_path: Path, labels: list[str], extra: dict[str, str] | None = None) -> None:
    """Store the label map (index -> name, as JSON) in the ONNX metadata so the model explains its outputs."""
    import onnx

    model = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in model.metadata_props}
    props["trainyard.labels"] = json.dumps(dict(enumerate(labels)), ensure_ascii=False)
    props.update(extra or {})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(onnx_path))


def read_label_map(onnx_path: Path) -> dict[int, str]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    return {int(k): v for k, v in json.loads(props["trainyard.labels"]).items()}
