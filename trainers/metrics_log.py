"""Each epoch's metrics into the caller's active MLflow run exactly once, across kills and resumes: one logger for
every trainer.

Trainers never start, resume or end a run: they log into the run that is active in this thread when training
starts, and nothing at all when none is. Which steps the run already holds is read back from it (once per metric
name), so a resumed attempt neither repeats an epoch an earlier attempt logged nor leaves out one it did not:

- torch, yolo: the trainer's epoch metrics (step = 1-based epoch) go in with the checkpoint that holds them
  (`log_epochs` after each save, and on resume the epochs the checkpoint holds that the run lacks).
- hf-image: Transformers' MLflowCallback logs its own names at global steps; each step goes through `log_once`.

Tracking never stops training: a failed write is a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

log = logging.getLogger("trainers.metrics_log")


def mlflow_key(key: str) -> str:
    """A metric name as MLflow stores it (as Transformers' MLflowCallback sanitizes it)."""
    return re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", key)


class EpochMetricsLog:
    """The steps the active run holds, per metric name; logs a step only when the run lacks it."""

    def __init__(self, reference_key: str | None = None, *, enabled: bool = True) -> None:
        self.reference_key = reference_key  # the name that stands for a step's whole entry (None: its first name)
        self.run_id: str | None = None
        if enabled:
            import mlflow

            run = mlflow.active_run()
            self.run_id = run.info.run_id if run is not None else None
        self._logged: dict[str, set[int]] = {}

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def is_bound(self) -> bool:
        """The run this logger started with is still the active one (never log into a run someone starts later)."""
        if self.run_id is None:
            return False
        import mlflow

        active = mlflow.active_run()
        return active is not None and active.info.run_id == self.run_id

    def logged_steps(self, key: str) -> set[int]:
        """The steps the run holds for `key`: read once per name, then kept up to date here."""
        key = mlflow_key(key)
        if key not in self._logged:
            import mlflow

            history = mlflow.MlflowClient().get_metric_history(self.run_id, key) if self.run_id else []
            self._logged[key] = {metric.step for metric in history}
        return self._logged[key]

    def log_once(self, metrics: dict[str, float], step: int, write: Callable[[], None] | None = None) -> bool:
        """Log `metrics` at `step` (with `write()`, or mlflow.log_metrics) unless the run holds that step already."""
        if not self.active or not metrics:
            return False
        try:
            logged = self.logged_steps(self.reference_key or min(metrics))
            if step in logged:
                return False
            if write is None:
                import mlflow

                # Synchronous (~15 ms): MLflow's asynchronous queue costs about 1 s to flush at the end of a run.
                mlflow.log_metrics(metrics, step=step)
            else:
                write()
            logged.add(step)
            return True
        except Exception as exc:  # tracking must never stop training
            log.warning("MLflow metric logging failed at step %d: %s", step, exc)
            return False

    def log_epochs(self, history: dict[int, dict[str, float]]) -> None:
        """Every epoch of `history` (epoch -> its metrics) that the run lacks, in epoch order."""
        for epoch in sorted(history):
            self.log_once(history[epoch], epoch)
