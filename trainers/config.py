"""The resolved training configuration: one typed model, validated before any compute is spent.

Prefect renders it as the run's parameter form; trainers read it; MLflow records it as params.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainers.data.uris import s3_uri_problem
from trainers.registry import TRAINERS, trainer_spec


class StrictModel(BaseModel):
    # An unknown key is a typo or an option Trainyard does not have: refuse it rather than ignore it.
    model_config = ConfigDict(extra="forbid")


class Augmentations(StrictModel):
    """Training-time augmentations. Probabilities are per image."""

    horizontal_flip: float = Field(0.5, ge=0, le=1, description="Probability of a left-right flip.")
    vertical_flip: float = Field(0.0, ge=0, le=1, description="Probability of an up-down flip.")
    color_jitter: float = Field(
        0.0, ge=0, le=1, description="Strength of brightness/contrast/saturation jitter (0 = off)."
    )
    mosaic: float = Field(0.0, ge=0, le=1, description="Mosaic probability (yolo only).")


class LossOptions(StrictModel):
    """Loss settings. Each trainer takes only the ones that apply to it."""

    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Classification trainers (torch, hf-image).")
    box_gain: float | None = Field(None, gt=0, description="Box loss gain (yolo).")
    cls_gain: float | None = Field(None, gt=0, description="Class loss gain (yolo).")
    dfl_gain: float | None = Field(None, gt=0, description="Distribution focal loss gain (yolo).")


class CheckpointPolicy(StrictModel):
    """When training writes a resumable checkpoint."""

    every_n_epochs: int = Field(1, ge=1, description="Write a checkpoint every N epochs (the last epoch always).")
    every_seconds: float | None = Field(
        None,
        gt=0,
        description="Also write one when this many seconds have passed since the last, mid-epoch where the trainer "
        "allows it (torch); at most one interval of work is lost to a crash.",
    )
    min_interval_seconds: float = Field(
        10.0,
        ge=0,
        description="Skip an epoch checkpoint that is due while the previous checkpoint is younger than this many "
        "seconds (0 = every due epoch), so that short epochs do not spend their time writing checkpoints. The last "
        "epoch, a pause, 'checkpoint now', a cancel and every_seconds still write one. A crash loses less than this "
        "plus every_n_epochs epochs of work; the best checkpoint is the best of those written.",
    )
    keep_last: int = Field(2, ge=1, le=100, description="Checkpoints kept besides the best one (the newest K).")
    best_metric: str | None = Field(
        None,
        description="The validation metric the best checkpoint is chosen by; unset = the trainer's default. "
        "torch, hf-image: 'val_accuracy' (the default, higher is better) or 'val_loss' (lower is better). "
        "yolo: 'fitness' (the default, Ultralytics' own), 'map50_95', 'map50', 'precision' or 'recall' (all higher "
        "is better). Only epochs that have a checkpoint compete.",
    )


class TrainConfig(StrictModel):
    """What a trainer needs to train one model on one dataset."""

    dataset: str = Field(
        ...,
        description="Dataset root: an ImageFolder directory (train/, val/, optional test/) "
        "or a YOLO data.yaml (or the directory holding it); a local path or s3://bucket/prefix "
        "(synced to a local cache before training).",
    )
    trainer: Literal["torch", "hf-image", "yolo"] = Field("torch", description="Which trainer runs the job.")
    model: str = Field(
        "tiny-cnn",
        description="Model name from the trainer's catalog, or a local path (yolo: .yaml/.pt; "
        "hf-image: a pretrained directory; torch: 'package.module:factory').",
    )
    epochs: int = Field(5, ge=1, le=10_000, description="Training epochs.")
    batch_size: int = Field(16, ge=1, le=4096, description="Images per batch.")
    image_size: int = Field(64, ge=16, le=4096, description="Square input size in pixels.")
    learning_rate: float = Field(1e-3, gt=0, le=10, description="Initial learning rate.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimizer.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    augmentations: Augmentations = Field(default_factory=Augmentations)
    loss: LossOptions = Field(default_factory=LossOptions)
    seed: int = Field(0, ge=0, description="Random seed for data order, initialisation and augmentation.")
    deterministic: bool = Field(False, description="Deterministic algorithms (slower; exact reruns).")
    workers: int = Field(0, ge=0, le=64, description="Data-loader worker processes (0 = in the training process).")
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)

    @field_validator("dataset")
    @classmethod
    def _dataset_exists(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                "dataset is empty; give an ImageFolder directory, a YOLO data.yaml or s3://bucket/prefix "
                "(run `make datasets` for the generated demo datasets)"
            )
        if "://" in value or value[:3].lower() == "s3:":  # remote: its shape now, its existence when it is synced
            if problem := s3_uri_problem(value):
                raise ValueError(
                    f"dataset {value!r} is not a dataset URI Trainyard can sync: {problem}. Write s3://bucket/prefix "
                    "(yolo: s3://bucket/prefix/data.yaml or the prefix holding it), or give a local path"
                )
            return value.rstrip("/")
        path = Path(value).expanduser()
        if not path.exists():
            raise ValueError(
                f"dataset path {value!r} does not exist; give an ImageFolder directory or a YOLO data.yaml "
                "(run `make datasets` for the generated demo datasets)"
            )
        return str(path.resolve())

    @model_validator(mode="after")
    def _trainer_takes_these_options(self) -> TrainConfig:
        spec = trainer_spec(self.trainer)
        spec.check_model(self.model)
        spec.check_options(self.loss.model_dump(), self.augmentations.mosaic, self.checkpoint.best_metric)
        return self


__all__ = ["TRAINERS", "StrictModel", "Augmentations", "CheckpointPolicy", "LossOptions", "TrainConfig"]
