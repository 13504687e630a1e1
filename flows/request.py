"""A training request: the train flow's one parameter, shown by the Prefect UI as a typed form."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from trainers.config import StrictModel, TrainConfig


class ExportOptions(StrictModel):
    """ONNX export and the parity check that gates registration."""

    opset: int = Field(17, ge=11, le=21, description="ONNX opset version.")
    parity_images: int = Field(8, ge=1, le=256, description="Validation images ONNX Runtime must reproduce.")
    parity_atol: float = Field(1e-3, gt=0, description="Absolute tolerance of |onnx - torch|.")
    parity_rtol: float = Field(1e-3, ge=0, description="Relative tolerance (times |torch|).")


class ComputeOptions(StrictModel):
    """Where training may run: compute profiles (`python -m infra.compute.profiles list`), how to choose, needs."""

    profiles: list[str] = Field(
        default_factory=list, description="Profile names in order of preference (empty: every enabled profile)."
    )
    strategy: Literal["preferred", "cheapest", "fastest", "queue"] = Field(
        "preferred", description="preferred: the list order; cheapest/fastest: by estimate; queue: wait for the first."
    )
    gpus: int = Field(0, ge=0, le=64, description="GPUs the training needs.")
    gpu_memory_gb: float = Field(0, ge=0, description="Memory per GPU it needs (alone: one GPU with this much).")
    cpu_cores: int = Field(1, ge=1, description="CPU cores it needs.")
    ram_gb: float = Field(0, ge=0, description="RAM it needs.")
    disk_gb: float = Field(0, ge=0, description="Free disk it needs where runs are written; refused below that.")
    budget_usd: float | None = Field(None, gt=0, description="Refuse to start when the cheapest estimate exceeds it.")
    default_hours: float = Field(
        0.25, gt=0, description="Expected duration at speed 1.0 when no earlier attempt of this job is known."
    )
    start_deadline_s: float = Field(
        60, gt=0, description="An attempt not running after this many seconds is cancelled and the next profile tried."
    )
    queue_timeout_s: float = Field(600, gt=0, description="How long the queue strategy waits for its profile.")
    fallback_on_failure: bool = Field(
        False, description="Also fall back when the training code fails (default: only when the infrastructure does)."
    )
    stall_timeout_s: float | None = Field(
        900,
        gt=0,
        description="A live training with no progress (no optimizer step, epoch or checkpoint) for this long is "
        "reported stalled: an alert event and an artifact. Empty: never.",
    )
    on_stall: Literal["alert", "fallback"] = Field(
        "alert",
        description="alert: report only. fallback: also end the attempt as crashed; the next profile resumes it "
        "from its last checkpoint (a training step on another pool; in the train flow's own process, the run ends).",
    )


class TrainRequest(TrainConfig):
    """Train, evaluate, export and register one model."""

    experiment: str = Field("trainyard", min_length=1, description="MLflow experiment the run is recorded in.")
    registered_model: str | None = Field(
        None, description="MLflow registered model name (default: '<dataset folder>-<trainer>')."
    )
    alias: str = Field("candidate", description="MLflow alias set on the new model version.")
    compute: ComputeOptions = Field(default_factory=ComputeOptions)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'cuda' refuses to run without a GPU.")
    export: ExportOptions = Field(default_factory=ExportOptions)
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on the MLflow run.")

    @field_validator("alias")
    @classmethod
    def _alias_shape(cls, value: str) -> str:
        # MLflow rejects aliases like "v3" (reserved for versions) and anything not identifier-like.
        if not re.fullmatch(r"[A-Za-z_][\w-]*", value) or re.fullmatch(r"[vV]\d+", value):
            raise ValueError(f"alias {value!r} must be a name like 'candidate' (letters, digits, _ or -; not v<N>)")
        return value

    @model_validator(mode="after")
    def _default_model_name(self) -> TrainRequest:
        if not self.registered_model:
            self.registered_model = f"{_dataset_name(self.dataset)}-{self.trainer}"
        return self

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))


def _dataset_name(dataset: str) -> str:
    path = Path(dataset)
    return path.parent.name if path.suffix in {".yaml", ".yml"} else path.name


def request_parameters(model: type[StrictModel]):
    """Expose each field of `model` as a flow parameter, with its type, constraints, default and description.

    Prefect merges a deployment's parameters with a run's shallowly: with the whole request as one parameter,
    `--param epochs=10` would replace it all. As separate parameters each one can be overridden alone, and the UI
    form still shows the model's types, bounds and descriptions.
    """

    def decorate(fn):
        parameters, docs = [], []
        for name, field in model.model_fields.items():
            default = inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True)
            annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
            parameters.append(
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            )
            description = field.description or (field.annotation.__doc__ or "").strip().split("\n")[0]
            docs.append(f"    {name}: {description}")
        fn.__signature__ = inspect.Signature(parameters, return_annotation=inspect.signature(fn).return_annotation)
        fn.__doc__ = f"{fn.__doc__ or ''}\n\nArgs:\n" + "\n".join(docs) + "\n"
        return fn

    return decorate
