"""Image classification with Hugging Face Transformers: `Trainer` + `TrainingArguments` do the training loop.

Models: "vit-tiny" and "resnet-tiny" are built from a small config (no download), or `model` is a local
pretrained directory (config.json + weights) whose head is resized to the dataset's classes. The label map
(id2label/label2id from the dataset) is in the config.json of every checkpoint.

Choices worth knowing:
- Evaluation, logging and saving are step-based with steps = one epoch (eval every epoch, save every
  `checkpoint.every_n_epochs` epochs and always at the last step). `load_best_model_at_end` requires the save
  and eval strategies to match, so "epoch" evaluation with "steps" saving is refused by Transformers.
- `checkpoint.min_interval_seconds`: an epoch save that is due is skipped (the Progress callback vetoes
  Transformers' should_save) while the previous checkpoint, or the start of this attempt, is younger than that.
  The last step, a pause, "checkpoint now" and every_seconds always save.
- "Best" is Transformers' choice among the epochs that have a checkpoint (an epoch that was evaluated but not
  saved, by every_n_epochs or min_interval_seconds, cannot be the best checkpoint): after an unsaved evaluation
  the trainer state's best_metric / best_global_step go back to their values at the last save, so the next saved
  epoch is compared with the best saved one. The result's metrics are always those of the checkpoint it returns.
  `checkpoint.best_metric` sets Transformers' metric_for_best_model / greater_is_better: val_accuracy ("accuracy",
  higher is better, the default) or val_loss ("loss", lower is better); Transformers reads both as "eval_<name>".
- Optimizers: adamw -> "adamw_torch" with weight_decay 0.01 (torch.optim.AdamW's default); adam ->
  "adamw_torch" with weight_decay 0 (decoupled decay of 0 makes AdamW exactly Adam); sgd -> "sgd" with
  momentum 0.9.
- Only the two most recent checkpoints and the best one are kept (save_total_limit=2 with
  load_best_model_at_end keeps the best as well); each is announced through on_checkpoint when written.
- Each checkpoint-N gets a trainyard-manifest.json (size and SHA-256 of each file). Resume takes the newest
  checkpoint that verifies; a damaged one is set aside as damaged-checkpoint-N with a warning.
- A run directory copied from another host (restored from the artifact store) resumes as it would in place:
  best_model_checkpoint, an absolute path in trainer_state.json, is taken in this directory, and the checkpoint
  folders get mtimes in step order (Transformers' rotation deletes by mtime; a copy has the copy's order).
- `checkpoint.every_seconds` saves mid-epoch at the next step past the interval. A cancel (SIGTERM, Ctrl-C)
  saves the steps trained so far before the interruption goes on, unless it lands inside an optimizer update.
- The checkpoint policy (trainers/checkpoint_policy.py) is applied through a TrainerCallback (Progress below);
  the private Transformers APIs this trainer needs are in trainers/transformers_private.py, with the reasons.
- MLflow: Transformers' own MLflowCallback (a subclass of it) logs per-step metrics into the run that is
  active in this thread when train() starts, and only into that run. It never starts, resumes or ends a run,
  never reads MLFLOW_RUN_ID / MLFLOW_NESTED_RUN / MLFLOW_EXPERIMENT_NAME, and logs no params: the caller logs
  the TrainConfig as params, and TrainingArguments share keys with it (learning_rate, seed, ...), which MLflow
  refuses to change ("Changing param values is not allowed"), also when a resumed attempt changes epochs.
  The TrainingArguments and model config go to the artifact hf-image/training_args.json instead.
  A step the run already holds (an attempt killed after the step's evaluation, before its checkpoint) is not
  logged again by the resumed attempt: each epoch appears once.
  With no active run nothing is logged to MLflow at all (report_to stays "none").
- deterministic=True turns on Transformers' full_determinism, which calls
  torch.use_deterministic_algorithms(True) for the whole process.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trainers.offline  # noqa: F401  (before Transformers: offline, no telemetry)
from trainers.base import Trainer as BaseTrainer
from trainers.base import TrainingPaused, TrainJob, TrainResult
from trainers.checkpoint_policy import CheckpointSchedule, save_on_the_way_out
from trainers.checkpoints import check_or_record_run, write_dir_manifest
from trainers.hf_checkpoints import (  # noqa: F401  (_stamp_in_step_order: tests/flows)
    _eval_at,
    _last_complete_checkpoint,
    _link_model_files,
    _moved_best,
    _stamp_in_step_order,
)
from trainers.hf_models import _best_model_args, _logits_module, _optimizer, _Split, _use_cpu, build_model
from trainers.hf_models import _load as load_model
from trainers.metrics_log import EpochMetricsLog
from trainers.onnx_export import export_image_classifier
from trainers.transformers_private import (
    checkpoint_safe_trainer_class,
    run_bound_mlflow_callback,
    save_checkpoint_now,
    warm_up,
)

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

PRIMARY_METRIC = "val_accuracy"
KEEP_CHECKPOINTS = 2  # plus the best one, which Transformers never rotates away
_MLFLOW_ARTIFACT = "hf-image/training_args.json"


def _trainer_class() -> type:
    """Transformers' Trainer, loading checkpoints the way from_pretrained does (see transformers_private)."""
    return checkpoint_safe_trainer_class(load_model)


def _compute_metrics(eval_pred: Any) -> dict[str, float]:
    import numpy as np

    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_pred.label_ids).mean())}


def _progress_callback(job: TrainJob, steps_per_epoch: int, moved_best: Path | None = None) -> Any:
    """Transformers' events -> the job's callbacks, and the checkpoint policy applied to Transformers' saves."""
    from transformers import TrainerCallback

    policy = CheckpointSchedule(job.config.checkpoint, job.control)

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.training = False
            self.train_loss: float | None = None
            # False while the optimizer updates the weights and until the next step begins (logging, evaluation,
            # saving): a checkpoint written on an interruption then would hold a state that never was.
            self.consistent = False
            self.save_skipped = False  # an evaluated step since the last save was not saved (see on_step_begin)

        def on_train_begin(self, args, state, control, **kwargs):
            self.training = True  # the trainer state is already restored from the checkpoint when resuming
            if moved_best is not None:  # this directory's copy, not the path another host recorded
                state.best_model_checkpoint = str(moved_best)
            policy.start((state.best_metric, state.best_global_step))
            job.emit_start(job.config.epochs, state.global_step // steps_per_epoch)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training and logs and "loss" in logs:
                self.train_loss = float(logs["loss"])  # logged just before the evaluation of the same step

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if not self.training or not metrics:
                return
            out = {"val_accuracy": float(metrics["eval_accuracy"]), "val_loss": float(metrics["eval_loss"])}
            if self.train_loss is not None:
                out["train_loss"] = self.train_loss
                self.train_loss = None
            job.emit_epoch(math.ceil(state.global_step / steps_per_epoch), out)

        def on_step_begin(self, args, state, control, **kwargs):
            self.consistent = True
            if self.save_skipped:
                # Transformers' _determine_best_metric took the previous step's evaluation as the best so far,
                # but that step has no checkpoint: compare the next saved step with the best saved one instead.
                # Direction-free: a value is compared with greater_is_better, and None (nothing saved yet) starts
                # again from -inf or +inf, so a minimised best_metric (val_loss) is restored the same way.
                state.best_metric, state.best_global_step = policy.best_at_save
                self.save_skipped = False

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.consistent = False

        def on_step_end(self, args, state, control, **kwargs):
            # Runs after DefaultFlowCallback, which asks for a save every save_steps and at the last step.
            job.control.mark_progress()
            if policy.asked() or policy.time_is_up():
                # A pause, a "checkpoint now" or every_seconds: Transformers saves a full checkpoint at this
                # step. Mid-epoch is fine: its resume skips the batches of the epoch that were already trained.
                control.should_save = True
            elif policy.veto(due=control.should_save, final=state.global_step >= state.max_steps):
                control.should_save = False  # too soon after the last checkpoint (min_interval_seconds)
                self.save_skipped = True
            if policy.pause_requested:
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            policy.saved((state.best_metric, state.best_global_step))
            self.save_skipped = False
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_dir_manifest(path)
            job.emit_checkpoint(state.global_step // steps_per_epoch, path)  # epochs completed

        def on_train_end(self, args, state, control, **kwargs):
            self.training = False

    return Progress()


def _save_now(trainer: Any, output_dir: Path) -> str | None:
    """A checkpoint of the steps trained so far (on a cancel), unless nothing was trained or this step is saved."""
    step = trainer.state.global_step
    path = output_dir / f"checkpoint-{step}"
    if step == 0 or (path / "trainer_state.json").is_file():
        return None
    save_checkpoint_now(trainer)
    return f"step {step} ({path})"


class HFImageTrainer(BaseTrainer):
    """Transformers' Trainer on an ImageFolder dataset."""

    def train(self, job: TrainJob) -> TrainResult:
        from transformers import TrainingArguments, enable_full_determinism, set_seed

        config = job.config
        # Absolute: the Trainer records best_model_checkpoint as output_dir/checkpoint-N (trainer_state.json)
        output_dir = Path(os.path.abspath(job.output_dir))
        output_dir.mkdir(parents=True, exist_ok=True)
        train_data = _Split(job, "train", train=True)
        val_data = _Split(job, "val", train=False)
        if not len(train_data) or not len(val_data):
            raise ValueError(f"dataset {job.dataset.root}: the train and val splits need at least one image each")
        steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
        use_cpu = _use_cpu(job.device)

        # Seed before building the model so that its initialisation is reproducible too.
        (enable_full_determinism if config.deterministic else set_seed)(config.seed)
        model = build_model(config.model, job.dataset.labels, config.image_size)

        metrics_log = EpochMetricsLog()  # the run active now, if any: per-step metrics, each step once
        best_metric = config.checkpoint.best_metric or PRIMARY_METRIC
        args = TrainingArguments(
            output_dir=str(output_dir),
            num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            lr_scheduler_type=config.scheduler,
            label_smoothing_factor=config.loss.label_smoothing,
            seed=config.seed,
            data_seed=config.seed,
            full_determinism=config.deterministic,
            eval_strategy="steps",
            eval_steps=steps_per_epoch,
            logging_strategy="steps",
            logging_steps=steps_per_epoch,
            save_strategy="steps",
            save_steps=steps_per_epoch * config.checkpoint.every_n_epochs,
            save_total_limit=KEEP_CHECKPOINTS,
            load_best_model_at_end=True,
            **_best_model_args(best_metric),
            dataloader_num_workers=config.workers,
            dataloader_pin_memory=not use_cpu,
            use_cpu=use_cpu,
            remove_unused_columns=False,  # the model takes exactly what the dataset yields
            report_to="none",  # MLflow: the run-bound callback below, only when a run is active
            disable_tqdm=True,
            **_optimizer(config.optimizer),
        )
        resume = _last_complete_checkpoint(output_dir)
        check_or_record_run(output_dir, job, best_metric, resuming=resume is not None)
        _stamp_in_step_order(output_dir)
        moved_best = _moved_best(resume, output_dir) if resume is not None else None
        progress = _progress_callback(job, steps_per_epoch, moved_best)
        callbacks = [progress] + (
            [run_bound_mlflow_callback(metrics_log, _MLFLOW_ARTIFACT)] if metrics_log.active else []
        )
        trainer = _trainer_class()(
            model=model,
            args=args,
            train_dataset=train_data,
            eval_dataset=val_data,
            compute_metrics=_compute_metrics,
            callbacks=callbacks,
        )
        if resume is not None:
            log.info("resuming from %s", resume)
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        except BaseException as interruption:
            save_on_the_way_out(interruption, progress.consistent, lambda: _save_now(trainer, output_dir))
            raise
        if job.control.pause_requested and trainer.state.global_step < trainer.state.max_steps:
            step = trainer.state.global_step
            raise TrainingPaused(f"paused in epoch {step // steps_per_epoch + 1}, at step {step} (checkpoint-{step})")

        state = trainer.state
        last = _last_complete_checkpoint(output_dir)
        if last is None:  # pragma: no cover - Transformers always saves at the last step with "steps" saving
            raise RuntimeError(f"training wrote no checkpoint under {output_dir}")
        chosen = Path(state.best_model_checkpoint) if state.best_model_checkpoint else last
        metrics = _eval_at(state.log_history, int(chosen.name.split("-")[1]))
        if metrics is None:  # pragma: no cover - every saved step was evaluated
            metrics = self.evaluate(job, chosen, "val")
        best = output_dir / "best"
        _link_model_files(chosen, best)
        return TrainResult(
            best_checkpoint=best,
            last_checkpoint=last,
            labels=list(job.dataset.labels),
            metrics=metrics,
            epochs_completed=state.global_step // steps_per_epoch,
            primary_metric=best_metric,
        )

    def evaluate(self, job: TrainJob, checkpoint: Path, split: str) -> dict[str, float]:
        """Accuracy and mean loss (with the job's label smoothing, like training's val_loss). No MLflow."""
        import torch
        from torch.nn import functional as F
        from torch.utils.data import DataLoader

        data = _Split(job, split, train=False)
        if not len(data):
            raise ValueError(f"dataset {job.dataset.root}: split {split!r} has no images")
        device = torch.device(job.device if job.device.startswith("cuda") else "cpu")
        model = load_model(Path(checkpoint)).to(device).eval()
        loader = DataLoader(data, batch_size=job.config.batch_size, num_workers=job.config.workers)
        correct, loss_sum = 0, 0.0
        with torch.inference_mode():
            for batch in loader:
                pixels, labels = batch["pixel_values"].to(device), batch["labels"].to(device)
                logits = model(pixel_values=pixels).logits.float()
                loss = F.cross_entropy(logits, labels, reduction="sum", label_smoothing=job.config.loss.label_smoothing)
                loss_sum += float(loss)
                correct += int((logits.argmax(-1) == labels).sum())
        return {f"{split}_accuracy": correct / len(data), f"{split}_loss": loss_sum / len(data)}

    def export_onnx(self, job: TrainJob, checkpoint: Path, path: Path, opset: int) -> Path:
        module = _logits_module(Path(checkpoint))
        return export_image_classifier(module, job.config.image_size, Path(path), opset, input_name="pixel_values")

    def parity_inputs(self, job: TrainJob, count: int) -> np.ndarray:
        """`count` val images spread over the split (so over the classes), preprocessed as in evaluation."""
        import numpy as np
        import torch

        data = _Split(job, "val", train=False)
        if not len(data):
            raise ValueError(f"dataset {job.dataset.root}: the val split has no images")
        count = min(count, len(data))
        picks = np.linspace(0, len(data) - 1, count).round().astype(int)
        return torch.stack([data[int(i)]["pixel_values"] for i in picks]).numpy().astype(np.float32)

    def torch_outputs(self, job: TrainJob, checkpoint: Path, batch: np.ndarray) -> np.ndarray:
        """Logits of the PyTorch model on the CPU in float32: the reference ONNX Runtime (CPU) must match."""
        import torch

        module = _logits_module(Path(checkpoint))
        with torch.inference_mode():
            return module(torch.from_numpy(batch).float()).numpy()


__all__ = ["HFImageTrainer", "build_model", "warm_up"]
