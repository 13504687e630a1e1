"""When a trainer writes a checkpoint, and which checkpoint is the best: one policy for every trainer.

A trainer asks it at its boundaries (a step, an epoch) and tells it when a checkpoint is written; it adapts its
library's hooks to these calls and nothing more. The rules (`config.checkpoint`, see trainers/config.py):

- An epoch is due when its number is a multiple of `every_n_epochs` (or the trainer says so, e.g. a better metric).
- A due epoch is skipped while the previous checkpoint, or the start of this attempt, is younger than
  `min_interval_seconds` (short epochs would spend their time writing checkpoints).
- The last epoch, a pause, a "checkpoint now" and `every_seconds` always save.
- Only epochs that have a checkpoint compete for best: after an epoch that was not saved, the best goes back to its
  value at the last save (`best_at_save`).
- A cancel (SIGTERM, Ctrl-C) saves the work done so far unless it landed in the middle of an update
  (`save_on_the_way_out`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from trainers.base import TrainControl
from trainers.checkpoints import signals_held
from trainers.config import CheckpointPolicy as CheckpointSettings

log = logging.getLogger("trainers.checkpoint_policy")

# The classifiers' checkpoint.best_metric choices: higher is better?
HIGHER_IS_BETTER = {"val_accuracy": True, "val_loss": False}


class CheckpointSchedule:
    """Decides "save now?" from epochs, time and the control's requests; remembers the best as of the last save."""

    def __init__(self, settings: CheckpointSettings, control: TrainControl) -> None:
        self.settings = settings
        self.control = control
        self.last_saved = time.monotonic()
        self.best_at_save: Any = None  # the library's best-so-far as of the last save (None: nothing saved yet)

    # ------------------------------------------------------------------ clock

    def start(self, best_at_save: Any = None) -> None:
        """Training (re)starts: the start of this attempt counts as the last save for min_interval_seconds."""
        self.last_saved = time.monotonic()
        self.best_at_save = best_at_save

    def saved(self, best_at_save: Any = None) -> None:
        """A checkpoint was written, holding `best_at_save` as the best so far."""
        self.last_saved = time.monotonic()
        self.best_at_save = best_at_save

    @property
    def age(self) -> float:
        return time.monotonic() - self.last_saved

    def time_is_up(self) -> bool:
        """`every_seconds` have passed since the last checkpoint."""
        every = self.settings.every_seconds
        return bool(every) and self.age >= every

    def too_soon(self) -> bool:
        """The last checkpoint is younger than `min_interval_seconds`."""
        return self.age < self.settings.min_interval_seconds

    # --------------------------------------------------------------- requests

    @property
    def pause_requested(self) -> bool:
        return self.control.pause_requested

    def asked(self) -> bool:
        """A pause or a "checkpoint now" waits for this boundary (a "checkpoint now" is taken: once per request)."""
        return self.control.pause_requested or self.control.take_checkpoint_request()

    # -------------------------------------------------------------- decisions

    def epoch_due(self, epoch: int) -> bool:
        """`epoch` (1-based, epochs completed) is a multiple of every_n_epochs."""
        return epoch % self.settings.every_n_epochs == 0

    def save_now(self, *, due: bool, final: bool = False, asked: bool = False) -> bool:
        """Whether to write a checkpoint at this boundary: `due` (by every_n_epochs, or whatever the library counts
        as due) unless too soon; always when `final` (training stops after it), `asked`, or every_seconds is up."""
        return final or asked or self.time_is_up() or (due and not self.too_soon())

    def veto(self, *, due: bool, final: bool) -> bool:
        """For a library that decides its own saves: whether to cancel its due, non-final save (too soon)."""
        return due and not final and self.too_soon()


def improves(metrics: dict[str, float], best: dict[str, float], name: str) -> bool:
    """Whether `metrics` beat the best checkpoint's by the metric `name` (HIGHER_IS_BETTER says which way). A best
    without it (none written yet) is beaten by any value."""
    if HIGHER_IS_BETTER[name]:
        return metrics[name] > best.get(name, -math.inf)
    return metrics[name] < best.get(name, math.inf)


def save_on_the_way_out(interruption: BaseException, consistent: bool, save: Callable[[], str | None]) -> None:
    """On a signal (Prefect's cancellation, Ctrl-C), not an error: keep the work done so far with `save()` (which
    returns where it saved, for the log, or None when there was nothing to save), unless the interruption landed in
    the middle of an update. A repeated signal cannot abort the save. The caller re-raises the interruption."""
    if isinstance(interruption, Exception):
        return
    why = type(interruption).__name__
    if not consistent:  # the model and the optimizer are half-updated: saving them would save a state that never was
        log.warning(
            "interrupted (%s) in the middle of a training step: the last checkpoint stands, and the steps since "
            "it are trained again on resume",
            why,
        )
        return
    with signals_held():
        where = save()
    if where is not None:
        log.warning("interrupted (%s): checkpoint at %s", why, where)
