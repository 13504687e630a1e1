"""A TrainConfig as Ultralytics' arguments and data.yaml, Ultralytics' metric names as Trainyard's, and Ultralytics'
MLflow integration kept inside the caller's run (see trainers/yolo.py)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from trainers.base import TrainJob

log = logging.getLogger("trainers.yolo")

_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}
# Ultralytics' validation keys -> Trainyard's names (prefixed with the split).
_BOX_METRICS = {
    "metrics/mAP50(B)": "map50",
    "metrics/mAP50-95(B)": "map50_95",
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
}
# checkpoint.best_metric -> Ultralytics' validation key that becomes the fitness ("fitness": Ultralytics' own).
_FITNESS_KEYS = {name: key for key, name in _BOX_METRICS.items()}


def _device(device: str) -> str:
    """Trainyard's "cpu" / "cuda" / "cuda:N" as Ultralytics' device argument ("cpu" / "N")."""
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        return "0"
    if device.startswith("cuda:") and device[5:].isdigit():
        return device[5:]
    raise ValueError(f"device {device!r} is not 'cpu' or 'cuda:N'")


def _has_onnxslim() -> bool:
    from importlib.util import find_spec

    return find_spec("onnxslim") is not None


def _split_images(job: TrainJob, split: str) -> list[Path]:
    from trainers.data.images import is_image_name, walk_files

    return [p for p in walk_files(job.dataset.splits[split]) if is_image_name(p.name)]


def _split_metrics(results: dict[str, Any], split: str) -> dict[str, float]:
    return {f"{split}_{name}": float(results[key]) for key, name in _BOX_METRICS.items() if key in results}


def _epoch_metrics(values: dict[str, Any]) -> dict[str, float]:
    """Ultralytics' names for one epoch (metrics/..., val/..., train/..., lr/pg0) -> Trainyard's."""
    out = _split_metrics(values, "val")
    for key, value in values.items():
        if key.startswith(("val/", "train/")):
            out[key.replace("/", "_")] = float(value)
    if "lr/pg0" in values:
        out["learning_rate"] = float(values["lr/pg0"])
    return out


def _write_data_yaml(job: TrainJob, output_dir: Path) -> Path:
    """The data.yaml Ultralytics reads, from the validated spec: absolute split paths, the spec's label map.

    A user's data.yaml may hold a relative `path` that Ultralytics would resolve against the working directory
    or its own datasets_dir; this one means exactly what validation checked.
    """
    if job.dataset.format != "yolo":
        raise ValueError(f"the yolo trainer needs a YOLO dataset (data.yaml), not {job.dataset.format}")
    data: dict[str, Any] = {"path": str(Path(job.dataset.root).resolve())}
    for split in ("train", "val", "test"):
        if split in job.dataset.splits:
            data[split] = str(Path(job.dataset.splits[split]).resolve())
    data["names"] = dict(enumerate(job.dataset.labels))
    path = output_dir / "dataset.yaml"
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def _train_args(job: TrainJob, data_yaml: Path, output_dir: Path) -> dict[str, Any]:
    config, aug = job.config, job.config.augmentations
    on_cuda = job.device.startswith("cuda")
    args: dict[str, Any] = {
        "data": str(data_yaml),
        "epochs": config.epochs,
        "batch": config.batch_size,
        "imgsz": config.image_size,
        "lr0": config.learning_rate,
        "optimizer": _OPTIMIZERS[config.optimizer],
        "cos_lr": config.scheduler == "cosine",
        "seed": config.seed,
        "deterministic": config.deterministic,
        "workers": config.workers,
        "fliplr": aug.horizontal_flip,
        "flipud": aug.vertical_flip,
        # color_jitter is brightness/contrast/saturation strength: Ultralytics' saturation and value gains
        # (both random in [1 - g, 1 + g], like torchvision's ColorJitter); no hue shift, 0 turns it all off.
        "hsv_h": 0.0,
        "hsv_s": aug.color_jitter,
        "hsv_v": aug.color_jitter,
        "mosaic": aug.mosaic,
        "device": _device(job.device),
        "amp": on_cuda,
        "plots": False,
        "val": True,
        "save": True,
        "save_period": -1,  # Trainyard's every-N copies are made by _Progress (Ultralytics' count is 0-based)
        "project": str(output_dir.parent),
        "name": output_dir.name,
        "exist_ok": True,
        "verbose": True,
    }
    if config.scheduler == "constant":
        args["lrf"] = 1.0  # final lr = lr0 * lrf: no decay (warmup still applies, as in any Ultralytics run)
    if config.optimizer in ("adam", "adamw"):
        # Ultralytics warms bias lr down from 0.1 (an SGD value, 100x a typical Adam lr0: the loss blows up);
        # its own optimizer=auto sets 0 when it picks AdamW. Do the same for an explicit Adam/AdamW.
        args["warmup_bias_lr"] = 0.0
    loss = config.loss
    for key, value in (("box", loss.box_gain), ("cls", loss.cls_gain), ("dfl", loss.dfl_gain)):
        if value is not None:
            args[key] = value
    return args


def _resume_overrides(args: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run may change: Ultralytics keeps every other argument from the checkpoint."""
    keep = ("data", "device", "batch", "imgsz", "workers", "save_period", "plots", "val")
    overrides = {key: args[key] for key in keep}
    overrides["save_dir"] = str(Path(args["project"]) / args["name"])  # the checkpoint's may be a moved dir
    return overrides


@contextmanager
def _mlflow_inside_active_run() -> Iterator[None]:
    """Ultralytics' MLflow callback on only when the caller has an active run in this thread, kept inside it.

    Its metric callbacks log into that run; its setup (set_experiment, autolog, log_params of its args,
    starting a run) and its end-of-training artifact upload are replaced by _adopt_mlflow_callbacks.
    """
    from ultralytics import settings

    mlflow = sys.modules.get("mlflow")  # not imported: nobody can have started a run
    run = mlflow.active_run() if mlflow is not None else None
    if settings.get("mlflow") != (run is not None):
        settings.update(mlflow=run is not None)
    if run is None:
        yield
        return
    saved = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    try:
        # Belt and braces: were Ultralytics' own setup to run, it would set_experiment() this existing name.
        experiment = mlflow.get_experiment(run.info.experiment_id)
        if experiment is not None:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment.name
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = saved
        active = mlflow.active_run()
        if active is None or active.info.run_id != run.info.run_id:
            log.error("the caller's MLflow run %s is no longer active after training", run.info.run_id)
