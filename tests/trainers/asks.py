"""A trainer callback that acts as a user: asks for a pause or a "checkpoint now" as the given epoch ends, and
records the checkpoints written. Used in-process by the tests and by tests/trainers/torch_driver.py."""

from __future__ import annotations

from pathlib import Path

from trainers.base import Callback, TrainJob


class AskAfterEpoch(Callback):
    def __init__(self, job: TrainJob, pause_after: int = 0, checkpoint_after: int = 0) -> None:
        self.job, self.pause_after, self.checkpoint_after = job, pause_after, checkpoint_after
        self.saved: list[tuple[int, str]] = []  # (epoch, file name) of each checkpoint written

    @property
    def names(self) -> list[str]:
        return [name for _, name in self.saved]

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == self.pause_after:
            self.job.control.request_pause()
        if epoch == self.checkpoint_after:
            self.job.control.request_checkpoint()

    def on_checkpoint(self, epoch: int, path: Path) -> None:
        self.saved.append((epoch, path.name))
