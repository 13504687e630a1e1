"""Trainers by name.

A spec is light (no torch, Ultralytics or Transformers import) so that a request can be validated in
milliseconds; the trainer class is imported only when a job runs.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Task = Literal["classification", "detection"]
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class TrainerSpec:
    name: str
    target: str  # "module:Class"
    task: Task
    dataset_format: Literal["imagefolder", "yolo"]
    models: tuple[str, ...]
    model_paths: str  # what else `model` may be, in words, for error messages
    loss_options: frozenset[str] = field(default_factory=frozenset)
    takes_mosaic: bool = False
    best_metrics: tuple[str, ...] = ("val_accuracy", "val_loss")  # checkpoint.best_metric's choices, default first

    def load(self) -> type:
        """The trainer class (a trainers.base.Trainer), imported now."""
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)

    def check_model(self, model: str) -> None:
        if model in self.models or self._is_model_path(model):
            return
        raise ValueError(
            f"model {model!r} is not known to the {self.name} trainer; use one of {', '.join(self.models)} "
            f"or {self.model_paths}"
        )

    def _is_model_path(self, model: str) -> bool:
        if self.name == "torch":
            return bool(_FACTORY.match(model))
        path = Path(model).expanduser()
        if self.name == "yolo":
            return (path.suffix in {".pt", ".yaml", ".yml"} and path.is_file()) or _ultralytics_cfg(model)
        return path.is_dir() and (path / "config.json").is_file()

    def check_options(self, loss: dict[str, object], mosaic: float, best: str | None) -> None:
        """A request's loss options, mosaic and checkpoint.best_metric, refused by name where not taken."""
        given = {name for name, value in loss.items() if value not in (None, 0.0)}
        foreign = sorted(given - self.loss_options)
        if foreign:
            takes = ", ".join(sorted(self.loss_options)) or "none"
            raise ValueError(
                f"loss option(s) {', '.join(foreign)} are not taken by the {self.name} trainer "
                f"(it takes: {takes}); remove them from `loss`"
            )
        if mosaic and not self.takes_mosaic:
            raise ValueError(f"augmentations.mosaic applies to detection (yolo) only, not to {self.name}; set it to 0")
        if best is not None and best not in self.best_metrics:
            raise ValueError(
                f"checkpoint.best_metric {best!r} is not a metric the {self.name} trainer chooses the best checkpoint "
                f"by; use one of {', '.join(self.best_metrics)}, or leave it unset for {self.best_metrics[0]}"
            )


def _ultralytics_cfg(model: str) -> bool:
    """A model yaml that ships inside Ultralytics (e.g. yolov8n.yaml, yolo11s.yaml): no download needed."""
    if not re.fullmatch(r"yolo[\w.-]*\.yaml", model):
        return False
    from importlib.util import find_spec

    spec = find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        return False
    cfg_root = Path(next(iter(spec.submodule_search_locations))) / "cfg" / "models"
    # Ultralytics derives scaled variants (yolov8n.yaml) from the base file (yolov8.yaml).
    base = re.sub(r"(\d+)[nslmx](?=[.-])", r"\1", model)
    return any(cfg_root.rglob(model)) or any(cfg_root.rglob(base))


TRAINERS: dict[str, TrainerSpec] = {
    spec.name: spec
    for spec in (
        TrainerSpec(
            name="torch",
            target="trainers.torch_classifier:TorchClassifierTrainer",
            task="classification",
            dataset_format="imagefolder",
            models=("tiny-cnn", "resnet18", "mobilenet_v3_small"),
            model_paths="'package.module:factory' returning an nn.Module(num_classes=...)",
            loss_options=frozenset({"label_smoothing"}),
        ),
        TrainerSpec(
            name="hf-image",
            target="trainers.hf_image:HFImageTrainer",
            task="classification",
            dataset_format="imagefolder",
            models=("vit-tiny", "resnet-tiny"),
            model_paths="a local pretrained directory holding config.json",
            loss_options=frozenset({"label_smoothing"}),
        ),
        TrainerSpec(
            name="yolo",
            target="trainers.yolo:YoloTrainer",
            task="detection",
            dataset_format="yolo",
            models=("yolov8n.yaml", "yolo11n.yaml"),
            model_paths="another Ultralytics model yaml, or a local .pt/.yaml file",
            loss_options=frozenset({"box_gain", "cls_gain", "dfl_gain"}),
            takes_mosaic=True,
            best_metrics=("fitness", "map50_95", "map50", "precision", "recall"),
        ),
    )
}


def trainer_spec(name: str) -> TrainerSpec:
    try:
        return TRAINERS[name]
    except KeyError:
        raise ValueError(f"unknown trainer {name!r}; choose one of {', '.join(TRAINERS)}") from None
