"""Ultralytics YOLO detection behind the Trainer contract.

Ultralytics does the work: its training loop, its checkpoints (weights/last.pt, weights/best.pt), its
resume and its ONNX export. This module maps a TrainConfig onto Ultralytics' arguments, forwards its progress
to the job's callbacks, keeps it offline, and keeps its MLflow integration inside the caller's run.

Layout of `job.output_dir` (it is Ultralytics' run directory):
    dataset.yaml        the data.yaml Ultralytics reads, written from the validated DatasetSpec
    trainyard.json      dataset version, label map and best metric, checked when a later attempt resumes here
    args.yaml, results.csv
    weights/last.pt     each saved epoch (Ultralytics' save_model); stripped of optimizer state when training ends
    weights/best.pt     the saved epoch of best fitness (Ultralytics); stripped when training ends. Fitness is
                        Ultralytics' own unless `checkpoint.best_metric` names a validation metric (map50_95,
                        map50, precision, recall; higher is better): the trainer subclass then returns that as the
                        fitness, so best_fitness, best.pt and early stopping follow it
    weights/epochN.pt   full-state copy of last.pt for a saved epoch N that is a multiple of
                        `checkpoint.every_n_epochs`, the last, a pause or a "checkpoint now";
                        written atomically, with its SHA-256 in weights/trainyard-manifest.json
The checkpoint policy (trainers/checkpoint_policy.py) is applied through Ultralytics' callbacks and a trainer
subclass (trainers/ultralytics_private.py, with every other private Ultralytics API this trainer needs).
Ultralytics saves every epoch; Trainyard's trainer subclass skips that save while the previous one (or the start of
this attempt) is younger than `checkpoint.min_interval_seconds`, except at the last epoch, on a pause or early stop,
on a "checkpoint now", and once `checkpoint.every_seconds` have passed. An epoch that is not saved cannot be best:
best_fitness goes back to its value at the last save, so best.pt is the best of the checkpoints written. Its metrics
reach MLflow with the next saved epoch.
Ultralytics writes last.pt in place, so a kill during that write truncates it: the resume then falls back to the
newest epochN.pt that verifies, with a warning. It resumes from epoch boundaries only: a cancel or a crash
mid-epoch keeps the last saved epoch's checkpoint (checkpoint.every_seconds acts at epoch ends only here), and the
unsaved epochs' rows are dropped from results.csv before they are trained again.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from trainers import offline  # noqa: F401  (before any library that might phone home)
from trainers.base import Trainer, TrainingPaused, TrainJob, TrainResult
from trainers.checkpoint_policy import CheckpointSchedule
from trainers.checkpoints import check_or_record_run, copy_atomic, record_file
from trainers.metrics_log import EpochMetricsLog
from trainers.ultralytics_private import (  # (it sets YOLO_CONFIG_DIR before Ultralytics is imported)
    adopt_mlflow_callbacks,
    export_head,
    interval_saving_trainer,
    prepare_ultralytics,
)
from trainers.yolo_resume import (  # noqa: F401  (_load_ckpt, read_results_csv: tests)
    _forget_unsaved_epochs,
    _load_ckpt,
    _resume_plan,
    checkpoint_labels,
    read_results_csv,
)
from trainers.yolo_setup import (  # noqa: F401  (_train_args: tests)
    _FITNESS_KEYS,
    _device,
    _epoch_metrics,
    _has_onnxslim,
    _mlflow_inside_active_run,
    _resume_overrides,
    _split_images,
    _split_metrics,
    _train_args,
    _write_data_yaml,
)

log = logging.getLogger("trainers.yolo")

PRIMARY_METRIC = "val_map50_95"
DEFAULT_BEST_METRIC = "fitness"  # Ultralytics' own fitness (the registry's first best_metrics choice)


class YoloTrainer(Trainer):
    """Object detection with Ultralytics YOLO (v8, 11, ... model yamls from scratch, or a local .pt)."""

    # ------------------------------------------------------------------ train

    def train(self, job: TrainJob) -> TrainResult:
        from ultralytics import YOLO

        prepare_ultralytics()
        output_dir = job.output_dir.resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        best_metric = job.config.checkpoint.best_metric or DEFAULT_BEST_METRIC
        check_or_record_run(output_dir, job, best_metric, resuming=(output_dir / "weights" / "last.pt").is_file())
        data_yaml = _write_data_yaml(job, output_dir)
        weights = output_dir / "weights"
        last, best = weights / "last.pt", weights / "best.pt"

        plan = _resume_plan(job, last)
        if plan.done:  # an earlier attempt already trained this far: nothing to train, report what it left
            log.info("%s already holds %d trained epoch(s); not training again", output_dir, plan.completed)
            job.emit_start(max(job.config.epochs, plan.completed), plan.completed)
            return self._result(job, best, last, plan.completed, None)

        args = _train_args(job, data_yaml, output_dir)
        if plan.resume_from is not None:
            log.info("resuming %s from epoch %d to %d", output_dir, plan.completed + 1, job.config.epochs)
            model = YOLO(str(plan.resume_from))
            args = {**_resume_overrides(args), "resume": True}
        else:
            model = YOLO(job.config.model)

        if plan.resume_from is not None:
            _forget_unsaved_epochs(output_dir / "results.csv", plan.completed)
        progress = _Progress(job)
        for event, hook in progress.hooks().items():
            model.add_callback(event, hook)

        fitness_key = _FITNESS_KEYS.get(job.config.checkpoint.best_metric)  # None: Ultralytics' own fitness
        with _mlflow_inside_active_run():
            base = model.task_map[model.task]["trainer"]
            model.train(trainer=interval_saving_trainer(base, progress, fitness_key), **args)
        if job.control.pause_requested and progress.last_epoch < job.config.epochs:
            raise TrainingPaused(f"paused after epoch {progress.last_epoch} (weights/epoch{progress.last_epoch}.pt)")

        if not progress.epochs_seen:
            raise RuntimeError(f"Ultralytics trained no epoch in {output_dir}; see its log above")
        return self._result(job, best, last, progress.last_epoch, progress.best_metrics)

    def _result(
        self, job: TrainJob, best: Path, last: Path, epochs: int, best_metrics: dict[str, float] | None
    ) -> TrainResult:
        if not best.is_file():
            best = last  # no epoch was validated (cannot happen with val=True, kept for safety)
        names = checkpoint_labels(best)
        if names != list(job.dataset.labels):
            raise RuntimeError(
                f"{best} holds the label map {names}, not the dataset's {list(job.dataset.labels)}; "
                "use a new output directory for a different dataset"
            )
        metrics = best_metrics if best_metrics else self.evaluate(job, best, "val")
        return TrainResult(
            best_checkpoint=best,
            last_checkpoint=last,
            labels=list(job.dataset.labels),
            metrics=metrics,
            epochs_completed=epochs,
            primary_metric=_primary_metric(job.config.checkpoint.best_metric),
        )

    # --------------------------------------------------------------- evaluate

    def evaluate(self, job: TrainJob, checkpoint: Path, split: str) -> dict[str, float]:
        from ultralytics import YOLO

        if split not in job.dataset.splits:
            raise ValueError(f"the dataset has no {split!r} split (it has {', '.join(job.dataset.splits)})")
        prepare_ultralytics()
        output_dir = job.output_dir.resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        data_yaml = _write_data_yaml(job, output_dir)
        metrics = YOLO(str(checkpoint)).val(
            data=str(data_yaml),
            split=split,
            imgsz=job.config.image_size,
            batch=job.config.batch_size,
            device=_device(job.device),
            workers=job.config.workers,
            plots=False,
            save_json=False,
            project=str(output_dir),  # Ultralytics makes a run directory even for val: keep it in the job's
            name=f"eval-{split}",
            exist_ok=True,
            verbose=False,
        )
        return _split_metrics(metrics.results_dict, split)

    # ----------------------------------------------------------------- export

    def export_onnx(self, job: TrainJob, checkpoint: Path, path: Path, opset: int) -> Path:
        from ultralytics import YOLO

        prepare_ultralytics()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Ultralytics writes the .onnx beside the checkpoint: export a private copy, weights/ stays as it was.
        with tempfile.TemporaryDirectory(prefix=".yolo-export-", dir=path.parent) as tmp:
            copy = Path(tmp) / "model.pt"
            shutil.copyfile(checkpoint, copy)
            exported = YOLO(str(copy)).export(
                format="onnx",
                imgsz=job.config.image_size,
                opset=opset,
                dynamic=True,
                simplify=_has_onnxslim(),  # without onnxslim Ultralytics would try to pip-install it
                # float32 (no `quantize`), raw head output (no `nms`): what torch_outputs returns
                device="cpu",
            )
            shutil.move(str(exported), path)
        return path

    def parity_inputs(self, job: TrainJob, count: int) -> np.ndarray:
        import cv2
        from ultralytics.data.augment import LetterBox

        size = job.config.image_size
        images = _split_images(job, "val")[:count]
        if not images:
            raise ValueError(f"no validation images under {job.dataset.splits.get('val')}")
        # As Ultralytics' predictor feeds an exported model: letterbox (gray 114 padding, centred) to
        # size x size, BGR -> RGB, HWC -> CHW, uint8 -> float32 / 255.
        letterbox = LetterBox((size, size), auto=False, stride=32)
        batch = []
        for file in images:
            image = cv2.imread(str(file), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f"cannot read image {file}")
            boxed = letterbox(image=image)
            batch.append(np.ascontiguousarray(boxed[..., ::-1].transpose(2, 0, 1)))
        return np.stack(batch).astype(np.float32) / 255.0

    def torch_outputs(self, job: TrainJob, checkpoint: Path, batch: np.ndarray) -> np.ndarray:
        import torch
        from ultralytics.nn.tasks import load_checkpoint

        # A fresh, unfused float32 model (export fuses and edits the model it is given), its head as the exporter
        # sets it, so it returns what the ONNX graph's first output holds.
        model, _ = load_checkpoint(str(checkpoint), device="cpu")
        model = export_head(model.float().eval())
        with torch.inference_mode():
            output = model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        if isinstance(output, (list, tuple)):
            output = output[0]
        return output.float().numpy()


def _primary_metric(best_metric: str | None) -> str:
    """The result's name for what best.pt was chosen by (Ultralytics' fitness is its mAP50-95 for detection)."""
    return PRIMARY_METRIC if best_metric in (None, "fitness") else f"val_{best_metric}"


class _Progress:
    """Ultralytics callbacks -> the job's callbacks (1-based epochs), the checkpoint policy (whether Ultralytics'
    every-epoch save is due, the every-N full-state copies) and the epoch metrics logger."""

    def __init__(self, job: TrainJob) -> None:
        self.job = job
        self.policy = CheckpointSchedule(job.config.checkpoint, job.control)
        self.metrics_log = EpochMetricsLog(enabled=False)
        self.train_epoch: int | None = None  # 0-based index of the epoch that just trained
        self.pending: tuple[int, Path] | None = None
        self.requested = False  # a pause or a "checkpoint now" arrived during this epoch
        self.epochs_seen: list[int] = []
        self.last_epoch = 0
        self.best_metrics: dict[str, float] | None = None
        self.saved_epoch = 0  # 1-based epoch of the last save
        self.unlogged: dict[int, dict[str, float]] = {}  # epoch -> metrics not yet in MLflow (no checkpoint yet)

    def hooks(self) -> dict[str, Any]:
        return {
            "on_pretrain_routine_start": adopt_mlflow_callbacks,
            "on_train_start": self.on_train_start,
            "on_train_batch_end": lambda trainer: self.job.control.mark_progress(),
            "on_train_epoch_end": self.on_train_epoch_end,
            "on_model_save": self.on_model_save,
            "on_fit_epoch_end": self.on_fit_epoch_end,
        }

    @property
    def saved_best_fitness(self) -> float | None:
        """trainer.best_fitness as of the last save (what an unsaved epoch's best goes back to)."""
        return self.policy.best_at_save

    def on_train_start(self, trainer) -> None:
        self.policy.start(trainer.best_fitness)  # the resumed checkpoint's, or None
        self.job.emit_start(int(trainer.epochs), int(trainer.start_epoch))
        # Same names and 1-based steps as the other trainers, beside Ultralytics' own (0-based) ones.
        self.metrics_log = EpochMetricsLog("val_map50_95", enabled=getattr(trainer, "_mlflow_active", False))
        if trainer.start_epoch and self.metrics_log.active:
            # The saved epochs the run lacks (an attempt killed after Ultralytics saved an epoch, before its metrics
            # were logged), from results.csv.
            try:
                rows = trainer.read_results_csv()
                saved = enumerate(int(e) for e in rows.get("epoch", []))
                history = {
                    epoch: _epoch_metrics({k: v[index] for k, v in rows.items() if k != "epoch"})
                    for index, epoch in saved
                    if epoch <= trainer.start_epoch
                }
            except Exception as exc:  # tracking must never stop training
                log.warning("could not fill in the MLflow run's missing epochs: %s", exc)
                history = {}
            self.metrics_log.log_epochs(history)

    def on_train_epoch_end(self, trainer) -> None:
        self.train_epoch = trainer.epoch
        # Ultralytics resumes from epoch boundaries only: a pause or a "checkpoint now" takes effect when this
        # epoch is saved. Stopping makes Ultralytics validate and save the epoch, then leave its loop.
        self.requested = self.policy.asked()
        if self.policy.pause_requested:
            trainer.stop = True

    def save_due(self, trainer) -> bool:
        """Ultralytics saves every epoch: the policy may skip it (min_interval_seconds) unless training stops after
        this epoch (the last one, a pause, early stopping), a checkpoint was asked for, or every_seconds is up."""
        final = trainer.stop or trainer.epoch + 1 >= trainer.epochs
        return self.policy.save_now(due=True, final=final, asked=self.requested)

    def written(self, trainer) -> None:
        self.policy.saved(trainer.best_fitness)
        self.saved_epoch = trainer.epoch + 1

    def on_model_save(self, trainer) -> None:
        epoch = trainer.epoch + 1
        if self.policy.epoch_due(epoch) or trainer.stop or epoch >= trainer.epochs or self.requested:
            # last.pt is rewritten every epoch and stripped at the end: keep a full-state (resumable) copy.
            path = Path(trainer.wdir) / f"epoch{epoch}.pt"
            copy_atomic(Path(trainer.last), path)
            record_file(path)  # its checksum, checked before a resume falls back to it
            self.pending = (epoch, path)

    def on_fit_epoch_end(self, trainer) -> None:
        metrics = {k: float(v) for k, v in (trainer.metrics or {}).items()}
        if trainer.epoch != self.train_epoch:
            # Ultralytics' final validation of best.pt reports through this hook too, with epoch + 1.
            self.best_metrics = _split_metrics(metrics, "val")
            return
        epoch = trainer.epoch + 1
        losses = trainer.label_loss_items(trainer.tloss, prefix="train")
        out = _epoch_metrics({**metrics, **losses, **(getattr(trainer, "lr", None) or {})})
        if self.metrics_log.active:
            # Only epochs a checkpoint holds, so that a resumed attempt never logs an epoch twice; an epoch that
            # was not saved (min_interval_seconds) goes with the next saved one.
            self.unlogged[epoch] = out
            if self.saved_epoch == epoch:
                self.metrics_log.log_epochs(self.unlogged)
                self.unlogged.clear()
        self.epochs_seen.append(epoch)
        self.last_epoch = epoch
        self.job.emit_epoch(epoch, out)
        if self.pending is not None:
            self.job.emit_checkpoint(*self.pending)
            self.pending = None
