"""Runs the hf-image trainer in its own process, for tests that kill it: `python tests/trainers/hf_driver.py`.

Environment: DATASET, OUT, EPOCHS, MLFLOW_TRACKING_URI + MLFLOW_RUN_ID (train inside that run, as the flow does),
KILL_AFTER_EVAL_OF_EPOCH (kill -9 once that epoch is evaluated, before it is saved), KILL_AFTER_SAVE_OF_EPOCH
(kill -9 once that epoch's checkpoint is written, before anything else happens).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import mlflow

from trainers.base import Callback, TrainJob
from trainers.config import TrainConfig
from trainers.data.validate import load_dataset
from trainers.hf_image import HFImageTrainer

KILL_AFTER_EVAL = int(os.environ.get("KILL_AFTER_EVAL_OF_EPOCH", "0"))
KILL_AFTER_SAVE = int(os.environ.get("KILL_AFTER_SAVE_OF_EPOCH", "0"))


class Killer(Callback):
    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == KILL_AFTER_EVAL:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_checkpoint(self, epoch: int, path: Path) -> None:
        if epoch == KILL_AFTER_SAVE:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    config = TrainConfig(
        dataset=os.environ["DATASET"],
        trainer="hf-image",
        model="vit-tiny",
        epochs=int(os.environ["EPOCHS"]),
        batch_size=8,
        image_size=32,
        learning_rate=1e-3,
        checkpoint={"min_interval_seconds": 0},  # every epoch saved (sub-second epochs): the kills land between them
    )
    job = TrainJob(config, load_dataset(config.dataset), Path(os.environ["OUT"]), callbacks=[Killer()])
    with mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"]):
        result = HFImageTrainer().train(job)
    print(json.dumps({"epochs_completed": result.epochs_completed}))


if __name__ == "__main__":
    sys.exit(main())
