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

import csv
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from trainers import offline  # noqa: F401  (before any library that might phone home)
from trainers.base import Trainer, TrainingPaused, TrainJob, TrainResult
from trainers.checkpoints import (
    CheckpointError,
    check_or_record_run,
    copy_atomic,
    file_damage,
    record_file,
    write_atomic,
)

log = logging.getLogger("trainers.yolo")

# Ultralytics reads YOLO_CONFIG_DIR once, at import: point it at a stable cache directory before then, so
# its settings.json (this module edits it: integrations on/off) is Trainyard's, not the user's ~/.config one.
os.environ.setdefault(
    "YOLO_CONFIG_DIR",
    str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainyard"),  # + /Ultralytics
)

PRIMARY_METRIC = "val_map50_95"
_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}
# Ultralytics' validation keys -> Trainyard's names (prefixed with the split).
_BOX_METRICS = {
    "metrics/mAP50(B)": "map50",
    "metrics/mAP50-95(B)": "map50_95",
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
}
# checkpoint.best_metric -> Ultralytics' validation key that becomes the fitness ("fitness": Ultralytics' own).
_FITNESS_KEYS = {name: key for key, name in _BOX_METRICS.items()}
DEFAULT_BEST_METRIC = "fitness"  # Ultralytics' own fitness (the registry's first best_metrics choice)
_INTEGRATIONS_OFF = {"sync": False, "clearml": False, "comet": False, "dvc": False, "raytune": False}
_MLFLOW_PARAM_PREFIX = "yolo."  # Ultralytics' args, namespaced so they never collide with the caller's params


class YoloTrainer(Trainer):
    """Object detection with Ultralytics YOLO (v8, 11, ... model yamls from scratch, or a local .pt)."""

    # ------------------------------------------------------------------ train

    def train(self, job: TrainJob) -> TrainResult:
        from ultralytics import YOLO

        _prepare_ultralytics()
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

        with _mlflow_inside_active_run():
            base = model.task_map[model.task]["trainer"]
            model.train(trainer=_interval_saving_trainer(base, progress, job.config.checkpoint.best_metric), **args)
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
        _prepare_ultralytics()
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

        _prepare_ultralytics()
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
        from ultralytics.nn.modules import Detect
        from ultralytics.nn.tasks import load_checkpoint

        # A fresh, unfused float32 model (export fuses and edits the model it is given), its head switched to
        # export mode as Ultralytics' exporter does, so it returns what the ONNX graph's first output holds
        # (detect: (N, 4 + classes, anchors), boxes decoded to pixels xywh, class scores sigmoided).
        model, _ = load_checkpoint(str(checkpoint), device="cpu")
        model = model.float().eval()
        if hasattr(model, "end2end"):
            model.end2end = False  # as the exporter without nms=False: the raw one-to-many head, NMS outside
        for module in model.modules():
            if isinstance(module, Detect):
                module.export, module.format, module.dynamic, module.shape = True, "onnx", True, None
                module.xyxy = False
        with torch.inference_mode():
            output = model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        if isinstance(output, (list, tuple)):
            output = output[0]
        return output.float().numpy()


# ---------------------------------------------------------------------------- helpers


def checkpoint_labels(checkpoint: Path) -> list[str]:
    """The label map Ultralytics stored in a checkpoint (model.names), index order."""
    from ultralytics.utils.patches import torch_load

    ckpt = torch_load(str(checkpoint), map_location="cpu", weights_only=False)
    model = ckpt.get("model") if ckpt.get("model") is not None else ckpt.get("ema")
    names = getattr(model, "names", None) or {}
    if isinstance(names, dict):
        return [names[i] for i in sorted(names)]
    return list(names)


def _device(device: str) -> str:
    """Trainyard's "cpu" / "cuda" / "cuda:N" as Ultralytics' device argument ("cpu" / "N")."""
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        return "0"
    if device.startswith("cuda:") and device[5:].isdigit():
        return device[5:]
    raise ValueError(f"device {device!r} is not 'cpu' or 'cuda:N'")


def _has_onnxslim() -> bool:
    from importlib.util import find_spec

    return find_spec("onnxslim") is not None


def _split_images(job: TrainJob, split: str) -> list[Path]:
    from trainers.data.images import is_image_name, walk_files

    return [p for p in walk_files(job.dataset.splits[split]) if is_image_name(p.name)]


def _split_metrics(results: dict[str, Any], split: str) -> dict[str, float]:
    return {f"{split}_{name}": float(results[key]) for key, name in _BOX_METRICS.items() if key in results}


def _write_data_yaml(job: TrainJob, output_dir: Path) -> Path:
    """The data.yaml Ultralytics reads, from the validated spec: absolute split paths, the spec's label map.

    A user's data.yaml may hold a relative `path` that Ultralytics would resolve against the working directory
    or its own datasets_dir; this one means exactly what validation checked.
    """
    if job.dataset.format != "yolo":
        raise ValueError(f"the yolo trainer needs a YOLO dataset (data.yaml), not {job.dataset.format}")
    data: dict[str, Any] = {"path": str(Path(job.dataset.root).resolve())}
    for split in ("train", "val", "test"):
        if split in job.dataset.splits:
            data[split] = str(Path(job.dataset.splits[split]).resolve())
    data["names"] = dict(enumerate(job.dataset.labels))
    path = output_dir / "dataset.yaml"
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def _train_args(job: TrainJob, data_yaml: Path, output_dir: Path) -> dict[str, Any]:
    config, aug = job.config, job.config.augmentations
    on_cuda = job.device.startswith("cuda")
    args: dict[str, Any] = {
        "data": str(data_yaml),
        "epochs": config.epochs,
        "batch": config.batch_size,
        "imgsz": config.image_size,
        "lr0": config.learning_rate,
        "optimizer": _OPTIMIZERS[config.optimizer],
        "cos_lr": config.scheduler == "cosine",
        "seed": config.seed,
        "deterministic": config.deterministic,
        "workers": config.workers,
        "fliplr": aug.horizontal_flip,
        "flipud": aug.vertical_flip,
        # color_jitter is brightness/contrast/saturation strength: Ultralytics' saturation and value gains
        # (both random in [1 - g, 1 + g], like torchvision's ColorJitter); no hue shift, 0 turns it all off.
        "hsv_h": 0.0,
        "hsv_s": aug.color_jitter,
        "hsv_v": aug.color_jitter,
        "mosaic": aug.mosaic,
        "device": _device(job.device),
        "amp": on_cuda,
        "plots": False,
        "val": True,
        "save": True,
        "save_period": -1,  # Trainyard's every-N copies are made by _Progress (Ultralytics' count is 0-based)
        "project": str(output_dir.parent),
        "name": output_dir.name,
        "exist_ok": True,
        "verbose": True,
    }
    if config.scheduler == "constant":
        args["lrf"] = 1.0  # final lr = lr0 * lrf: no decay (warmup still applies, as in any Ultralytics run)
    if config.optimizer in ("adam", "adamw"):
        # Ultralytics warms bias lr down from 0.1 (an SGD value, 100x a typical Adam lr0: the loss blows up);
        # its own optimizer=auto sets 0 when it picks AdamW. Do the same for an explicit Adam/AdamW.
        args["warmup_bias_lr"] = 0.0
    loss = config.loss
    for key, value in (("box", loss.box_gain), ("cls", loss.cls_gain), ("dfl", loss.dfl_gain)):
        if value is not None:
            args[key] = value
    return args


def _resume_overrides(args: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run may change: Ultralytics keeps every other argument from the checkpoint."""
    keep = ("data", "device", "batch", "imgsz", "workers", "save_period", "plots", "val")
    overrides = {key: args[key] for key in keep}
    overrides["save_dir"] = str(Path(args["project"]) / args["name"])  # the checkpoint's may be a moved dir
    return overrides


class _Plan:
    def __init__(self, completed: int = 0, resume_from: Path | None = None, done: bool = False) -> None:
        self.completed, self.resume_from, self.done = completed, resume_from, done


def _resume_plan(job: TrainJob, last: Path) -> _Plan:
    """Fresh start, resume, or nothing to do, from what an earlier attempt left in weights/.

    - No last.pt: train from the start.
    - last.pt with optimizer state (an interrupted run): Ultralytics resumes it, to the config's epochs.
    - last.pt stripped (a finished run; Ultralytics refuses to resume those): done if it reached
      config.epochs; otherwise resume from the full-state weights/epochN.pt copy of its final epoch.
    """
    if not last.is_file():
        return _Plan()
    try:
        ckpt = _load_ckpt(last)
    except Exception as error:  # Ultralytics writes last.pt in place: a kill during that write truncates it
        ckpt = _recover_last(last, error)
    if ckpt.get("optimizer") is not None and ckpt.get("epoch", -1) >= 0:
        completed = ckpt["epoch"] + 1
        if completed >= job.config.epochs:
            # Interrupted after its final save (in Ultralytics' final validation): the weights are complete.
            return _Plan(completed, done=True)
        _set_checkpoint_epochs(last, ckpt, job.config.epochs)
        return _Plan(completed, resume_from=last)
    completed = _finished_epochs(ckpt, last)
    if completed >= job.config.epochs:
        return _Plan(completed, done=True)
    full = last.parent / f"epoch{completed}.pt"
    full_ckpt = _load_ckpt(full) if full.is_file() else {}
    if full_ckpt.get("optimizer") is None or full_ckpt.get("epoch", -1) < 0:
        raise RuntimeError(
            f"{last.parent.parent} holds a finished {completed}-epoch training without a resumable "
            f"checkpoint ({full.name}); Ultralytics cannot continue it to {job.config.epochs} epochs. "
            "Use a new output directory, or remove this one to train from the start"
        )
    _set_checkpoint_epochs(last, full_ckpt, job.config.epochs, force=True)  # last.pt: resumable again
    return _Plan(completed, resume_from=last)


def _recover_last(last: Path, error: Exception) -> dict[str, Any]:
    """Replace an unreadable last.pt with the newest epochN.pt copy that verifies and loads, with a warning."""
    copies = sorted(last.parent.glob("epoch*.pt"), key=lambda p: int(p.stem[5:]) if p.stem[5:].isdigit() else -1)
    problems = [f"{last.name} ({type(error).__name__})"]
    for copy in reversed(copies):
        damage = file_damage(copy)
        try:
            if damage:
                raise ValueError(damage)
            ckpt = _load_ckpt(copy)
        except Exception as bad:
            problems.append(f"{copy.name} ({bad})")
            continue
        log.warning("%s does not load (%s): resuming from %s instead", last, error, copy.name)
        copy_atomic(copy, last)
        return ckpt
    raise CheckpointError(
        f"no usable checkpoint in {last.parent}: {'; '.join(problems)}. Training will not restart from scratch on "
        "its own: restore the files, or remove the directory (or use another output directory) to start over"
    )


def _load_ckpt(path: Path) -> dict[str, Any]:
    from ultralytics.utils.patches import torch_load

    return torch_load(str(path), map_location="cpu", weights_only=False)


def _finished_epochs(ckpt: dict[str, Any], last: Path) -> int:
    epochs = (ckpt.get("train_results") or {}).get("epoch") or []
    if epochs:
        return int(max(epochs))
    return int((ckpt.get("train_args") or {}).get("epochs") or 0)


def _set_checkpoint_epochs(path: Path, ckpt: dict[str, Any], epochs: int, *, force: bool = False) -> None:
    """Write ckpt to path with `epochs` as its total: Ultralytics resumes to the checkpoint's own `epochs`."""
    import torch

    if not force and ckpt["train_args"].get("epochs") == epochs:
        return
    ckpt["train_args"] = {**ckpt["train_args"], "epochs": epochs}
    write_atomic(path, lambda handle: torch.save(ckpt, handle))


def read_results_csv(path: Path) -> dict[str, list[int | float]]:
    """results.csv as {column: values}, as Ultralytics' read_results_csv gives it: a column of integers as ints,
    any other as floats; {} when the file cannot be read."""
    try:
        with path.open(newline="") as handle:
            header, *rows = list(csv.reader(handle))
        columns = {name.strip(): [row[i].strip() for row in rows] for i, name in enumerate(header)}
        return {name: _numbers(values) for name, values in columns.items()}
    except (OSError, ValueError, IndexError):
        return {}


def _numbers(values: list[str]) -> list[int | float]:
    try:
        return [int(value) for value in values]
    except ValueError:
        return [float(value) for value in values]


def _forget_unsaved_epochs(results_csv: Path, completed: int) -> None:
    """Drop the rows of epochs after the checkpoint a resume starts from (trained, not saved: min_interval_seconds
    or a crash): Ultralytics appends to results.csv, and those epochs are trained and written again."""
    if not results_csv.is_file():
        return
    header, *rows = results_csv.read_text(encoding="utf-8").splitlines()
    kept = [row for row in rows if float(row.split(",", 1)[0]) <= completed]
    if len(kept) < len(rows):
        write_atomic(results_csv, lambda handle: handle.write("\n".join([header, *kept, ""]).encode()))


def _primary_metric(best_metric: str | None) -> str:
    """The result's name for what best.pt was chosen by (Ultralytics' fitness is its mAP50-95 for detection)."""
    return PRIMARY_METRIC if best_metric in (None, "fitness") else f"val_{best_metric}"


def _interval_saving_trainer(base: type, progress: _Progress, best_metric: str | None = None) -> type:
    """Ultralytics' trainer for the model's task (`base`), saving an epoch only when `progress` says it is due,
    with `best_metric` (checkpoint.best_metric) as the fitness that best.pt follows."""
    fitness_key = _FITNESS_KEYS.get(best_metric)  # None: Ultralytics' own fitness

    class IntervalSavingTrainer(base):
        def validate(self):
            best_before = self.best_fitness
            metrics, fitness = super().validate()
            if metrics is None or fitness_key is None:
                return metrics, fitness
            # The chosen metric is the fitness: Ultralytics' best_fitness, best.pt and early stopping follow it.
            fitness = metrics[fitness_key]
            self.best_fitness = fitness if best_before is None or best_before < fitness else best_before
            return metrics, fitness

        def read_results_csv(self) -> dict[str, list]:
            # Ultralytics' own imports polars for this on its first call, which is inside the first checkpoint
            # (save_model stores the rows): 0.1 s on a 2-core machine, for a few rows the stdlib reads as well.
            return read_results_csv(Path(self.csv))

        def save_model(self) -> bool:
            if not progress.save_due(self):
                # validate() has already raised best_fitness to this epoch's: back to its value at the last save,
                # so that best.pt stays the best of the checkpoints written and a later epoch is compared with it.
                self.best_fitness = progress.saved_best_fitness
                return False  # Ultralytics runs on_model_save only after a save
            written = super().save_model()
            progress.written(self)
            return written

    return IntervalSavingTrainer


class _Progress:
    """Ultralytics callbacks -> the job's callbacks (1-based epochs), the every-N checkpoint copies, and when
    Ultralytics' every-epoch save is due (checkpoint.min_interval_seconds)."""

    def __init__(self, job: TrainJob) -> None:
        self.job = job
        self.every = job.config.checkpoint.every_n_epochs
        self.min_interval = job.config.checkpoint.min_interval_seconds
        self.every_seconds = job.config.checkpoint.every_seconds
        self.train_epoch: int | None = None  # 0-based index of the epoch that just trained
        self.pending: tuple[int, Path] | None = None
        self.requested = False  # a "checkpoint now" arrived during this epoch
        self.epochs_seen: list[int] = []
        self.last_epoch = 0
        self.best_metrics: dict[str, float] | None = None
        self.last_saved = time.monotonic()
        self.saved_best_fitness: float | None = None  # trainer.best_fitness as of the last save
        self.saved_epoch = 0  # 1-based epoch of the last save
        self.unlogged: dict[int, dict[str, float]] = {}  # epoch -> metrics not yet in MLflow (no checkpoint yet)

    def hooks(self) -> dict[str, Any]:
        return {
            "on_pretrain_routine_start": _adopt_mlflow_callbacks,
            "on_train_start": self.on_train_start,
            "on_train_batch_end": lambda trainer: self.job.control.mark_progress(),
            "on_train_epoch_end": self.on_train_epoch_end,
            "on_model_save": self.on_model_save,
            "on_fit_epoch_end": self.on_fit_epoch_end,
        }

    def on_train_start(self, trainer) -> None:
        self.last_saved = time.monotonic()
        self.saved_best_fitness = trainer.best_fitness  # the resumed checkpoint's, or None
        self.job.emit_start(int(trainer.epochs), int(trainer.start_epoch))
        if trainer.start_epoch and getattr(trainer, "_mlflow_active", False):
            _log_missing_epochs(trainer)

    def on_train_epoch_end(self, trainer) -> None:
        self.train_epoch = trainer.epoch
        # Ultralytics resumes from epoch boundaries only: a pause or a "checkpoint now" takes effect when this
        # epoch is saved. Stopping makes Ultralytics validate and save the epoch, then leave its loop.
        if self.job.control.pause_requested:
            trainer.stop = True
        self.requested = self.job.control.take_checkpoint_request()

    def save_due(self, trainer) -> bool:
        """Ultralytics saves every epoch: not while the last checkpoint is younger than min_interval_seconds, unless
        training stops after this epoch (the last one, a pause, early stopping), a checkpoint was asked for, or
        every_seconds (an explicit ask, here at epoch ends) have passed."""
        age = time.monotonic() - self.last_saved
        final = trainer.stop or trainer.epoch + 1 >= trainer.epochs
        time_is_up = bool(self.every_seconds) and age >= self.every_seconds
        return final or self.requested or time_is_up or age >= self.min_interval

    def written(self, trainer) -> None:
        self.last_saved = time.monotonic()
        self.saved_best_fitness = trainer.best_fitness
        self.saved_epoch = trainer.epoch + 1

    def on_model_save(self, trainer) -> None:
        epoch = trainer.epoch + 1
        if epoch % self.every == 0 or trainer.stop or epoch >= trainer.epochs or self.requested:
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
        if getattr(trainer, "_mlflow_active", False):
            # Only epochs a checkpoint holds, so that a resumed attempt never logs an epoch twice; an epoch that
            # was not saved (min_interval_seconds) goes with the next saved one.
            self.unlogged[epoch] = out
            if self.saved_epoch == epoch:
                self._log_unlogged()
        self.epochs_seen.append(epoch)
        self.last_epoch = epoch
        self.job.emit_epoch(epoch, out)
        if self.pending is not None:
            self.job.emit_checkpoint(*self.pending)
            self.pending = None

    def _log_unlogged(self) -> None:
        """Same names and 1-based steps as the other trainers, beside Ultralytics' own (0-based) ones."""
        import mlflow

        try:
            for epoch in sorted(self.unlogged):
                mlflow.log_metrics(self.unlogged.pop(epoch), step=epoch)
        except Exception as exc:  # tracking must never stop training
            log.warning("MLflow metric logging failed: %s", exc)


def _epoch_metrics(values: dict[str, Any]) -> dict[str, float]:
    """Ultralytics' names for one epoch (metrics/..., val/..., train/..., lr/pg0) -> Trainyard's."""
    out = _split_metrics(values, "val")
    for key, value in values.items():
        if key.startswith(("val/", "train/")):
            out[key.replace("/", "_")] = float(value)
    if "lr/pg0" in values:
        out["learning_rate"] = float(values["lr/pg0"])
    return out


def _log_missing_epochs(trainer) -> None:
    """A resumed run: log the saved epochs the MLflow run lacks (an attempt killed after Ultralytics saved an
    epoch, before its metrics were logged), from results.csv, so every epoch is in the run once."""
    import mlflow

    try:
        run_id = mlflow.active_run().info.run_id
        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_map50_95")}
        rows = trainer.read_results_csv()
        for index, epoch in enumerate(int(e) for e in rows.get("epoch", [])):
            if epoch <= trainer.start_epoch and epoch not in logged:
                mlflow.log_metrics(_epoch_metrics({k: v[index] for k, v in rows.items() if k != "epoch"}), step=epoch)
    except Exception as exc:  # tracking must never stop training
        log.warning("could not fill in the MLflow run's missing epochs: %s", exc)


# ---------------------------------------------------------------------- Ultralytics setup


_prepared = False


def _prepare_ultralytics() -> None:
    """Integrations off (the MLflow one is switched per run), and no network attempts while offline."""
    global _prepared
    from ultralytics import settings

    off = {k: v for k, v in _INTEGRATIONS_OFF.items() if settings.get(k) != v}
    if off:
        settings.update(off)
    if _prepared or os.environ.get("YOLO_OFFLINE", "").lower() not in {"1", "true", "yes", "on"}:
        return
    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as engine_trainer
    import ultralytics.utils.plotting as plotting

    # check_font() is called on every dataset check (plots or not) and downloads Arial.ttf when it is missing:
    # offline that is a failed HTTP request per train/val call (3 s timeout, longer where DNS hangs).
    data_utils.check_font = _local_font
    plotting.check_font = _local_font
    # check_amp() downloads yolo26n.pt on CUDA to compare FP32 with AMP; offline that fails and AMP stays on.
    engine_trainer.check_amp = _offline_check_amp(engine_trainer.check_amp)
    _prepared = True


def _local_font(font: str = "Arial.ttf"):
    """Ultralytics' check_font without the download: its config dir's font, matplotlib's, or None."""
    from matplotlib import font_manager
    from ultralytics.utils import USER_CONFIG_DIR

    file = USER_CONFIG_DIR / Path(font).name
    if file.exists():
        return file
    fonts = font_manager.fontManager.ttflist
    return next((f.fname for f in fonts if font in f.fname and os.path.exists(f.fname)), None)


def _offline_check_amp(original):
    def check_amp(model) -> bool:
        from ultralytics.utils import WEIGHTS_DIR

        if next(model.parameters()).device.type in {"cpu", "mps"} or (WEIGHTS_DIR / "yolo26n.pt").is_file():
            return original(model)
        log.info("AMP check skipped (offline, no yolo26n.pt to compare with); AMP stays on")
        return True

    check_amp.__wrapped__ = original
    return check_amp


@contextmanager
def _mlflow_inside_active_run() -> Iterator[None]:
    """Ultralytics' MLflow callback on only when the caller has an active run in this thread, kept inside it.

    Its metric callbacks log into that run; its setup (set_experiment, autolog, log_params of its args,
    starting a run) and its end-of-training artifact upload are replaced by _adopt_mlflow_callbacks.
    """
    from ultralytics import settings

    mlflow = sys.modules.get("mlflow")  # not imported: nobody can have started a run
    run = mlflow.active_run() if mlflow is not None else None
    if settings.get("mlflow") != (run is not None):
        settings.update(mlflow=run is not None)
    if run is None:
        yield
        return
    saved = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    try:
        # Belt and braces: were Ultralytics' own setup to run, it would set_experiment() this existing name.
        experiment = mlflow.get_experiment(run.info.experiment_id)
        if experiment is not None:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment.name
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = saved
        active = mlflow.active_run()
        if active is None or active.info.run_id != run.info.run_id:
            log.error("the caller's MLflow run %s is no longer active after training", run.info.run_id)


def _adopt_mlflow_callbacks(trainer) -> None:
    """Keep Ultralytics' MLflow metric callbacks; replace its setup and end-of-training ones.

    Its setup would call mlflow.set_experiment(<project dir name>) (a stray experiment), mlflow.autolog()
    (autologging on for every installed library, for the rest of the process), log its ~100 args as params (a
    conflict with the caller's params, or with an earlier attempt's on resume, makes MLflow raise and the
    callback stop tracking), and does nothing at all under pytest (unless the test's name says test_mlflow).
    Its train-end hook uploads weights/ (every checkpoint) as run artifacts.
    """
    module = "ultralytics.utils.callbacks.mlflow"
    replaced = False
    for event in ("on_pretrain_routine_end", "on_train_end", "teardown"):
        hooks = trainer.callbacks.get(event, [])
        kept = [hook for hook in hooks if getattr(hook, "__module__", None) != module]
        replaced |= len(kept) != len(hooks)
        trainer.callbacks[event] = kept
    if replaced:
        trainer.callbacks["on_pretrain_routine_end"].append(_attach_mlflow_run)


def _attach_mlflow_run(trainer) -> None:
    """Point Ultralytics' MLflow metric callbacks at the caller's active run; log its args, namespaced."""
    import mlflow

    trainer._mlflow_active = False
    trainer._mlflow_started_run = False
    run = mlflow.active_run()
    if run is None:
        return
    trainer._mlflow_active = True
    try:
        existing = mlflow.MlflowClient().get_run(run.info.run_id).data.params
        params = {f"{_MLFLOW_PARAM_PREFIX}{k}": _param_value(v) for k, v in vars(trainer.args).items()}
        new = {k: v for k, v in params.items() if k not in existing}  # resumed: the first values stay
        if new:
            mlflow.log_params(new)
    except Exception as exc:
        log.warning("could not log Ultralytics' args to MLflow run %s: %s", run.info.run_id, exc)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
