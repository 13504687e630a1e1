"""The trainer contract: a resolved job in, a result out, progress through callbacks.

Trainers import no Prefect: they run the same from a flow, a script or a notebook.
"""

from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainers.config import TrainConfig
from trainers.data.spec import DatasetSpec
from trainers.registry import trainer_spec


class Callback:
    """Progress hooks. Every hook is a no-op; override the ones you need."""

    def on_train_start(self, total_epochs: int, start_epoch: int) -> None: ...

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, epoch: int, path: Path) -> None: ...


class TrainingPaused(Exception):
    """Training stopped on request after writing a checkpoint; training the same job again resumes from it."""


class TrainControl:
    """Requests from outside the training loop, read by the trainer at its step (or epoch) boundaries.

    Thread-safe: a watcher thread sets them while the training loop runs.
    """

    def __init__(self) -> None:
        self._pause = threading.Event()
        self._checkpoint = threading.Event()
        self._progress_at = time.monotonic()

    def mark_progress(self) -> None:
        """Called by the trainer after each optimizer step: what a stall watch measures silence from."""
        self._progress_at = time.monotonic()

    @property
    def seconds_without_progress(self) -> float:
        return time.monotonic() - self._progress_at

    def request_pause(self) -> None:
        """Checkpoint at the next boundary, then stop with TrainingPaused."""
        self._pause.set()

    def request_checkpoint(self) -> None:
        """Checkpoint at the next boundary and go on training."""
        self._checkpoint.set()

    @property
    def pause_requested(self) -> bool:
        return self._pause.is_set()

    def take_checkpoint_request(self) -> bool:
        """True once per request (several requests before the next boundary make one checkpoint)."""
        if self._checkpoint.is_set():
            self._checkpoint.clear()
            return True
        return False


@dataclass
class TrainJob:
    config: TrainConfig
    dataset: DatasetSpec
    output_dir: Path  # checkpoints and trainer files go here; derived from the request so retries find it
    device: str = "cpu"  # "cpu" or "cuda:N"
    callbacks: list[Callback] = field(default_factory=list)
    control: TrainControl = field(default_factory=TrainControl)

    def emit_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(epoch, metrics)

    def emit_checkpoint(self, epoch: int, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(epoch, path)

    def emit_start(self, total_epochs: int, start_epoch: int = 0) -> None:
        for callback in self.callbacks:
            callback.on_train_start(total_epochs, start_epoch)


@dataclass
class TrainResult:
    best_checkpoint: Path
    last_checkpoint: Path
    labels: list[str]
    metrics: dict[str, float]  # validation metrics of the best checkpoint
    epochs_completed: int
    primary_metric: str  # the metric "best" is chosen by, e.g. "val_accuracy" or "val_map50_95"


class Trainer(abc.ABC):
    """One training library behind one small interface."""

    @abc.abstractmethod
    def train(self, job: TrainJob) -> TrainResult:
        """Train, writing checkpoints as `config.checkpoint` says (every_n_epochs, no sooner than
        min_interval_seconds apart except the last epoch and requested ones); resume if a checkpoint exists."""

    @abc.abstractmethod
    def evaluate(self, job: TrainJob, checkpoint: Path, split: str) -> dict[str, float]:
        """Metrics of `checkpoint` on a dataset split ("val" or "test"), keys prefixed with the split."""

    @abc.abstractmethod
    def export_onnx(self, job: TrainJob, checkpoint: Path, path: Path, opset: int) -> Path:
        """Write an ONNX model of `checkpoint` to `path` (dynamic batch axis)."""

    @abc.abstractmethod
    def parity_inputs(self, job: TrainJob, count: int) -> np.ndarray:
        """A batch of real validation images, preprocessed exactly as the exported model expects (NCHW float32)."""

    @abc.abstractmethod
    def torch_outputs(self, job: TrainJob, checkpoint: Path, batch: np.ndarray) -> np.ndarray:
        """What the PyTorch model of `checkpoint` outputs for `batch`: the reference the ONNX model must match."""


def get_trainer(name: str) -> Trainer:
    """A new instance of the trainer named in a request (its library is imported now, not before)."""
    return trainer_spec(name).load()()
