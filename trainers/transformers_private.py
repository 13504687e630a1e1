"""Every private Transformers API the hf-image trainer uses, each with the reason; nothing else.

tests/trainers/test_transformers_private.py fails when an installed Transformers changes one of them (a name, a
signature, an attribute the code relies on): review this module for that version before anything else.

- `Trainer._load_from_checkpoint(resume_from_checkpoint, model=None)` and `Trainer._load_best_model()`, overridden:
  Transformers 5 renames some models' weights in memory (ViT: vit.encoder.layer.N.attention.attention.query ->
  vit.layers.N.attention.q_proj) and save_pretrained writes the original names back, but the Trainer's resume and
  load_best_model_at_end call model.load_state_dict(strict=False) on the file as written: every renamed weight is
  silently skipped and keeps its current value (huggingface/transformers#43701, #48805). Both go through
  from_pretrained here, which applies the renaming, and a strict load_state_dict, so a mismatch raises instead.
- `Trainer._save_checkpoint(model, trial)` and `trainer.callback_handler.on_save(args, state, control)`: a cancel
  (SIGTERM) saves the steps trained so far exactly as Transformers' loop does at a save step, and announces it to
  the callbacks (manifest, MLflow, the job's callbacks). There is no public "save a resumable checkpoint now".
- `MLflowCallback.setup(args, state, model)` replaced, and its `_initialized`, `_auto_end_run`, `_log_artifacts`,
  `_async_log` attributes set: the base setup may start a run (MLFLOW_RUN_ID, MLFLOW_NESTED_RUN, no active run),
  call set_experiment (MLFLOW_EXPERIMENT_NAME) and log every TrainingArguments field as a param (a conflict with the
  caller's params). The attributes are what the rest of the callback reads instead.
- `TrainerState.best_metric` / `best_global_step`, put back by the hf-image Progress callback after an evaluation
  that was not saved: `Trainer._determine_best_metric` updates them at every evaluation, saved or not, and an
  unsaved step must not be the best checkpoint.
- `transformers.conversion_mapping.get_checkpoint_conversion_mapping(model_type)`: builds, once per process, the
  table of weight conversions the first save_pretrained needs (warm_up, for the warm-start server).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainers.metrics_log import EpochMetricsLog

MLFLOW_CALLBACK_ATTRIBUTES = ("_initialized", "_auto_end_run", "_log_artifacts", "_async_log")


def checkpoint_safe_trainer_class(load: Callable[[Path], Any]) -> type:
    """Transformers' Trainer, loading checkpoints with `load` (from_pretrained) and a strict load_state_dict."""
    from transformers import Trainer

    for name in ("_load_from_checkpoint", "_load_best_model"):
        if not callable(getattr(Trainer, name, None)):  # pragma: no cover - a Transformers upgrade
            raise RuntimeError(f"transformers.Trainer has no {name}: review {__name__} for this version")

    class CheckpointSafeTrainer(Trainer):
        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            _copy_weights(load(Path(resume_from_checkpoint)), model if model is not None else self.model)

        def _load_best_model(self) -> None:
            _copy_weights(load(Path(self.state.best_model_checkpoint)), self.model)

    return CheckpointSafeTrainer


def _copy_weights(source: Any, target: Any) -> None:
    import torch

    with torch.no_grad():
        target.load_state_dict(source.state_dict(), strict=True)


def save_checkpoint_now(trainer: Any) -> None:
    """A full checkpoint of the current step, as Transformers' loop writes at a save step, announced to callbacks."""
    trainer._save_checkpoint(trainer.model, trial=None)
    trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)


def run_bound_mlflow_callback(metrics_log: EpochMetricsLog, artifact: str) -> Any:
    """Transformers' MLflowCallback bound to the run `metrics_log` started with (the caller's, which it will end):
    each step logged once (`metrics_log.log_once`), the TrainingArguments and model config as the artifact
    `artifact` instead of params, checkpoints not uploaded."""
    import mlflow
    from transformers.integrations import MLflowCallback

    class ActiveRunMLflowCallback(MLflowCallback):
        def setup(self, args, state, model):
            self._initialized = True
            self._auto_end_run = False
            self._log_artifacts = False
            self._async_log = False  # a step counts as logged once it is in MLflow (see on_log)
            if state.is_world_process_zero and metrics_log.is_bound():
                record = {"training_args": json.loads(args.to_json_string())}
                if model is not None and getattr(model, "config", None) is not None:
                    record["model_config"] = json.loads(model.config.to_json_string())
                mlflow.log_dict(record, artifact)

        def on_log(self, args, state, control, logs, model=None, **kwargs):
            # A step an earlier attempt logged before it was killed (after this step's evaluation, before its
            # checkpoint) is trained and logged again by the resumed attempt: MLflow keeps the first, once.
            numeric = {k: v for k, v in logs.items() if k != "epoch" and isinstance(v, int | float)}
            if not numeric or not metrics_log.is_bound():  # never into a run started later, nor once it has ended
                return

            def write() -> None:
                super(ActiveRunMLflowCallback, self).on_log(args, state, control, logs, model=model, **kwargs)

            metrics_log.log_once(numeric, state.global_step, write)

        def on_save(self, args, state, control, **kwargs):
            pass  # checkpoints are the caller's to log

    return ActiveRunMLflowCallback()


def warm_up() -> None:
    """Transformers builds its table of checkpoint weight conversions (about 1,000 compiled patterns, some 50 ms
    on a 2-core machine) in the first `save_pretrained` of a process, the first checkpoint of a model built from a
    config. The warm-start server (infra/runs/warm_start.py) builds it once, for every training it forks."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    get_checkpoint_conversion_mapping("vit")
