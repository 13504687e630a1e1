"""Runs the torch trainer in its own process, for tests that kill it: `python tests/trainers/torch_driver.py`.

Environment: DATASET, OUT, EPOCHS, EVERY_SECONDS (optional), KILL_AT_STEP (kill -9 before that training step of
this process), KILL_IN_SAVE (kill -9 half-way through that checkpoint write), EXPORT (export model.onnx after
training), KILL_IN_EXPORT (kill -9 half-way through writing it), MLFLOW_RUN_ID (log into that run),
PAUSE_AFTER_EPOCH / CHECKPOINT_AFTER_EPOCH (ask for a pause / a checkpoint through the job's control when that
epoch ends; a paused run prints {"paused": ...} and exits 3), MIN_INTERVAL_SECONDS (checkpoint.min_interval_seconds,
0 unless given: every epoch is checkpointed).
The model is the trainer's tiny CNN, built through the user-model hook (`model: "torch_driver:model"`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from trainers.base import Callback, TrainingPaused, TrainJob
from trainers.config import TrainConfig
from trainers.data.validate import load_dataset
from trainers.torch_classifier import TorchClassifierTrainer, tiny_cnn

KILL_AT_STEP = int(os.environ.get("KILL_AT_STEP", "0"))
KILL_IN_SAVE = int(os.environ.get("KILL_IN_SAVE", "0"))
KILL_IN_EXPORT = os.environ.get("KILL_IN_EXPORT") == "1"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def model(num_classes: int) -> torch.nn.Module:
    net = tiny_cnn(num_classes)
    steps = 0

    def before_forward(module, args):
        nonlocal steps
        if module.training:
            steps += 1
            if steps == KILL_AT_STEP:
                _die()

    net.register_forward_pre_hook(before_forward)
    return net


_real_save, _saves = torch.save, 0


def _save(obj, handle, *args, **kwargs):
    global _saves
    _saves += 1
    if _saves == KILL_IN_SAVE:  # half a file on disk, then the process is gone
        handle.write(b"PK\x03\x04" + b"\0" * 4096)
        handle.flush()
        os.fsync(handle.fileno())
        _die()
    return _real_save(obj, handle, *args, **kwargs)


torch.save = _save
_real_export = torch.onnx.export


def _export(model, args, f, *rest, **kwargs):
    if KILL_IN_EXPORT:  # half an ONNX file where the exporter writes, then the process is gone
        with open(f, "wb") as handle:
            handle.write(b"\x08\x07" + b"\0" * 4096)
        _die()
    return _real_export(model, args, f, *rest, **kwargs)


torch.onnx.export = _export


class AskAfterEpoch(Callback):
    """What a user's pause or "checkpoint now" does, arriving while the given epoch ends."""

    def __init__(self, job: TrainJob) -> None:
        self.job = job
        self.pause = int(os.environ.get("PAUSE_AFTER_EPOCH", "0"))
        self.checkpoint = int(os.environ.get("CHECKPOINT_AFTER_EPOCH", "0"))
        self.saved: list[tuple[int, str]] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == self.pause:
            self.job.control.request_pause()
        if epoch == self.checkpoint:
            self.job.control.request_checkpoint()

    def on_checkpoint(self, epoch: int, path: Path) -> None:
        self.saved.append((epoch, path.name))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    every = os.environ.get("EVERY_SECONDS")
    config = TrainConfig(
        dataset=os.environ["DATASET"],
        trainer="torch",
        model="torch_driver:model",
        epochs=int(os.environ["EPOCHS"]),
        batch_size=4,
        image_size=32,
        learning_rate=0.01,
        deterministic=True,
        # A checkpoint at every epoch end (the epochs are sub-second): the tests kill and resume between them.
        checkpoint={"min_interval_seconds": float(os.environ.get("MIN_INTERVAL_SECONDS", "0"))}
        | ({"every_seconds": float(every)} if every else {}),
    )
    job = TrainJob(config, load_dataset(config.dataset), Path(os.environ["OUT"]))
    if run_id := os.environ.get("MLFLOW_RUN_ID"):
        import mlflow

        mlflow.start_run(run_id=run_id)
    asks = AskAfterEpoch(job)
    job.callbacks.append(asks)
    trainer = TorchClassifierTrainer()
    try:
        result = trainer.train(job)
    except TrainingPaused as paused:
        print(json.dumps({"paused": str(paused), "checkpoints": asks.saved}))
        sys.exit(3)
    if os.environ.get("EXPORT") or KILL_IN_EXPORT:
        trainer.export_onnx(job, result.best_checkpoint, job.output_dir / "model.onnx", 17)
    print(json.dumps({"epochs_completed": result.epochs_completed, "checkpoints": asks.saved}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
