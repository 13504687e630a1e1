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

import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trainers.offline  # noqa: F401  (before Transformers: offline, no telemetry)
from trainers.base import Trainer as BaseTrainer
from trainers.base import TrainingPaused, TrainJob, TrainResult
from trainers.checkpoints import (
    CheckpointError,
    check_or_record_run,
    dir_damage,
    signals_held,
    write_dir_manifest,
)
from trainers.onnx_export import export_image_classifier

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

PRIMARY_METRIC = "val_accuracy"
KEEP_CHECKPOINTS = 2  # plus the best one, which Transformers never rotates away
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_MLFLOW_ARTIFACT = "hf-image/training_args.json"


# ----------------------------------------------------------------------------------------------- models


def _tiny_config(name: str, image_size: int) -> Any:
    from transformers import ResNetConfig, ViTConfig

    if name == "vit-tiny":
        return ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            patch_size=8,
            image_size=image_size,
            num_channels=3,
        )
    if name == "resnet-tiny":
        return ResNetConfig(
            num_channels=3,
            embedding_size=16,
            hidden_sizes=[16, 32, 64, 128],
            depths=[1, 1, 1, 1],
            layer_type="basic",
        )
    raise ValueError(f"model {name!r} is not known to the hf-image trainer; use vit-tiny, resnet-tiny or a directory")


def build_model(model: str, labels: list[str], image_size: int) -> PreTrainedModel:
    """A classifier for `labels`: a tiny model from a config, or a local pretrained directory, new head."""
    from transformers import AutoModelForImageClassification

    id2label = dict(enumerate(labels))
    label2id = {name: index for index, name in id2label.items()}
    path = Path(model).expanduser()
    if model not in ("vit-tiny", "resnet-tiny") and path.is_dir():
        return AutoModelForImageClassification.from_pretrained(
            str(path),
            id2label=id2label,  # num_labels follows from it (passing both warns when the count changes)
            label2id=label2id,
            ignore_mismatched_sizes=True,  # a head for other classes is replaced by a fresh one
            local_files_only=True,
        )
    config = _tiny_config(model, image_size)
    config.num_labels = len(labels)
    config.id2label = id2label
    config.label2id = label2id
    config.problem_type = "single_label_classification"
    return AutoModelForImageClassification.from_config(config)


def warm_up() -> None:
    """Transformers builds its table of checkpoint weight conversions (about 1,000 compiled patterns, some 50 ms
    on a 2-core machine) in the first `save_pretrained` of a process, the first checkpoint of a model built from a
    config. The warm-start server (infra/runs/warm_start.py) builds it once, for every training it forks."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    get_checkpoint_conversion_mapping("vit")


def _load(checkpoint: Path) -> PreTrainedModel:
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(str(checkpoint), local_files_only=True)


def _trainer_class() -> type:
    """Transformers' Trainer, loading checkpoints the way from_pretrained does.

    Transformers 5 renames some models' weights in memory (ViT: vit.encoder.layer.N.attention.attention.query
    -> vit.layers.N.attention.q_proj) and save_pretrained writes the original names back, but the Trainer's
    resume (_load_from_checkpoint) and load_best_model_at_end (_load_best_model) call
    model.load_state_dict(strict=False) on the file as written: every renamed weight is silently skipped and
    keeps its current value (huggingface/transformers#43701, #48805). Here both go through from_pretrained,
    which applies the renaming, and a strict load_state_dict, so a mismatch raises instead.
    """
    from transformers import Trainer

    for name in ("_load_from_checkpoint", "_load_best_model"):
        if not callable(getattr(Trainer, name, None)):  # pragma: no cover - a Transformers upgrade
            raise RuntimeError(f"transformers.Trainer has no {name}: review trainers/hf_image.py for this version")

    class CheckpointSafeTrainer(Trainer):
        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            _copy_weights(_load(Path(resume_from_checkpoint)), model if model is not None else self.model)

        def _load_best_model(self) -> None:
            _copy_weights(_load(Path(self.state.best_model_checkpoint)), self.model)

    return CheckpointSafeTrainer


def _copy_weights(source: PreTrainedModel, target: Any) -> None:
    import torch

    with torch.no_grad():
        target.load_state_dict(source.state_dict(), strict=True)


# ------------------------------------------------------------------------------------------------- data


class _Split:
    """An ImageFolder split as the dicts the Transformers Trainer feeds to the model."""

    def __init__(self, job: TrainJob, split: str, *, train: bool) -> None:
        from trainers.data.classification import list_images

        if split not in job.dataset.splits:
            raise ValueError(f"dataset {job.dataset.root} has no {split!r} split (it has {sorted(job.dataset.splits)})")
        self.items = list_images(Path(job.dataset.splits[split]), job.dataset.labels)
        self.transform = _transform(job, train=train)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from trainers.data.classification import load_rgb

        path, label = self.items[index]
        return {"pixel_values": self.transform(load_rgb(path)), "labels": label}


def _transform(job: TrainJob, *, train: bool):
    """The one preprocessing: RGB, resize, [0,1], normalise (mean = std = 0.5); augmentation on train only."""
    from trainers.data.classification import eval_transform, train_transform

    size = job.config.image_size
    return train_transform(size, job.config.augmentations) if train else eval_transform(size)


def _compute_metrics(eval_pred: Any) -> dict[str, float]:
    import numpy as np

    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_pred.label_ids).mean())}


# -------------------------------------------------------------------------------------------- callbacks


def _progress_callback(job: TrainJob, steps_per_epoch: int, moved_best: Path | None = None) -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Trainyard's callbacks from Transformers' events: start, each epoch's evaluation, each save."""

        def __init__(self) -> None:
            self.training = False
            self.train_loss: float | None = None
            # False while the optimizer updates the weights and until the next step begins (logging, evaluation,
            # saving): a checkpoint written on an interruption then would hold a state that never was.
            self.consistent = False
            self.last_saved = time.monotonic()
            # state.best_metric / best_global_step as of the last save, and whether an evaluated step since then
            # was not saved (see on_step_begin).
            self.best_as_saved: tuple[Any, Any] = (None, None)
            self.save_skipped = False

        def _epoch(self, state: Any) -> int:
            return math.ceil(state.global_step / steps_per_epoch)

        def on_train_begin(self, args, state, control, **kwargs):
            self.training = True  # the trainer state is already restored from the checkpoint when resuming
            if moved_best is not None:  # this directory's copy, not the path another host recorded
                state.best_model_checkpoint = str(moved_best)
            self.last_saved = time.monotonic()
            self.best_as_saved = (state.best_metric, state.best_global_step)
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
            job.emit_epoch(self._epoch(state), out)

        def on_step_begin(self, args, state, control, **kwargs):
            self.consistent = True
            if self.save_skipped:
                # Transformers' _determine_best_metric took the previous step's evaluation as the best so far,
                # but that step has no checkpoint: compare the next saved step with the best saved one instead.
                # Direction-free: a value is compared with greater_is_better, and None (nothing saved yet) starts
                # again from -inf or +inf, so a minimised best_metric (val_loss) is restored the same way.
                state.best_metric, state.best_global_step = self.best_as_saved
                self.save_skipped = False

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.consistent = False

        def on_step_end(self, args, state, control, **kwargs):
            # Runs after DefaultFlowCallback, which asks for a save every save_steps and at the last step.
            job.control.mark_progress()
            policy = job.config.checkpoint
            age = time.monotonic() - self.last_saved
            time_is_up = bool(policy.every_seconds) and age >= policy.every_seconds
            if job.control.pause_requested or job.control.take_checkpoint_request() or time_is_up:
                # A pause, a "checkpoint now" or every_seconds: Transformers saves a full checkpoint at this
                # step. Mid-epoch is fine: its resume skips the batches of the epoch that were already trained.
                control.should_save = True
            elif control.should_save and state.global_step < state.max_steps and age < policy.min_interval_seconds:
                control.should_save = False  # too soon after the last checkpoint (min_interval_seconds)
                self.save_skipped = True
            if job.control.pause_requested:
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            self.best_as_saved = (state.best_metric, state.best_global_step)
            self.save_skipped = False
            self.saved(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

        def saved(self, path: Path, step: int) -> None:
            write_dir_manifest(path)
            self.last_saved = time.monotonic()
            job.emit_checkpoint(step // steps_per_epoch, path)  # epochs completed

        def on_train_end(self, args, state, control, **kwargs):
            self.training = False

    return Progress()


def _mlflow_callback(run_id: str) -> Any:
    import mlflow
    from transformers.integrations import MLflowCallback

    class ActiveRunMLflowCallback(MLflowCallback):
        """Transformers' MLflowCallback bound to one run that the caller started and will end."""

        def _bound(self) -> bool:
            active = mlflow.active_run()
            return active is not None and active.info.run_id == run_id

        def setup(self, args, state, model):
            # Replaces the base setup, which may start a run (MLFLOW_RUN_ID, MLFLOW_NESTED_RUN, no active
            # run), call set_experiment (MLFLOW_EXPERIMENT_NAME) and log every TrainingArguments field as a
            # param.
            self._initialized = True
            self._auto_end_run = False
            self._log_artifacts = False
            self._async_log = False  # a step counts as logged once it is in MLflow (see on_log)
            if state.is_world_process_zero and self._bound():
                record = {"training_args": json.loads(args.to_json_string())}
                if model is not None and getattr(model, "config", None) is not None:
                    record["model_config"] = json.loads(model.config.to_json_string())
                mlflow.log_dict(record, _MLFLOW_ARTIFACT)

        def on_log(self, args, state, control, logs, model=None, **kwargs):
            # A step an earlier attempt logged before it was killed (after this step's evaluation, before its
            # checkpoint) is trained and logged again by the resumed attempt: MLflow keeps the first, once.
            numeric = [k for k, v in logs.items() if k != "epoch" and isinstance(v, int | float)]
            if not numeric or not self._bound():  # never into a run someone starts later, nor once it has ended
                return
            logged = self._logged_steps(min(numeric))  # one key stands for its log entry
            if state.global_step not in logged:
                super().on_log(args, state, control, logs, model=model, **kwargs)
                logged.add(state.global_step)

        def on_save(self, args, state, control, **kwargs):
            pass  # checkpoints are the caller's to log

        def _logged_steps(self, key: str) -> set[int]:
            if key not in self.logged:  # read once per metric name and run, then kept up to date here
                history = mlflow.MlflowClient().get_metric_history(run_id, _mlflow_key(key))
                self.logged[key] = {metric.step for metric in history}
            return self.logged[key]

    callback = ActiveRunMLflowCallback()
    callback.logged = {}
    return callback


def _mlflow_key(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", key)  # as Transformers' MLflowCallback sanitizes metric names


def _active_mlflow_run_id() -> str | None:
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return None
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


# ---------------------------------------------------------------------------------------------- helpers


def _use_cpu(device: str) -> bool:
    """Transformers' Trainer has no device argument: CPU, or cuda:0 (DataParallel over every visible GPU)."""
    if device == "cpu":
        return True
    if not device.startswith("cuda"):
        raise ValueError(f"device {device!r} is not supported by the hf-image trainer; use 'cpu' or 'cuda:N'")
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but CUDA is not available on this machine")
    index = int(device.partition(":")[2] or 0)
    if index != 0 or torch.cuda.device_count() > 1:
        raise ValueError(
            f"device {device!r}: the Transformers Trainer trains on cuda:0 and spreads over all visible GPUs "
            f"({torch.cuda.device_count()} visible here); start the job with CUDA_VISIBLE_DEVICES=<the GPU> "
            "and device 'cuda:0'"
        )
    return False


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def _last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint that verifies against its manifest.

    Transformers writes trainer_state.json last, after the weights, optimizer, scheduler and RNG states: a newer
    checkpoint without it (a crash while saving) is removed. One that is damaged (a file differs from its manifest)
    is set aside as damaged-checkpoint-N with a warning, and the one before it is used.
    """
    found = _checkpoints(output_dir)
    complete = [(step, path) for step, path in found if (path / "trainer_state.json").is_file()]
    last_step, last = complete[-1] if complete else (-1, None)
    for step, path in found:
        if step > last_step:
            log.warning("removing incomplete checkpoint %s (interrupted while saving)", path)
            shutil.rmtree(path, ignore_errors=True)
    for _, path in reversed(complete):
        damage = dir_damage(path)
        if damage is None:
            return path
        aside = path.with_name(f"damaged-{path.name}")
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        log.warning("checkpoint %s is damaged (%s): set aside as %s; trying the one before it", path, damage, aside)
    if complete:
        raise CheckpointError(
            f"no usable checkpoint in {output_dir}: every one is damaged (set aside as damaged-checkpoint-*). "
            "Training will not restart from scratch on its own: restore them, or remove the directory (or use "
            "another output directory) to start over"
        )
    return last


def _moved_best(resume: Path, output_dir: Path) -> Path | None:
    """The best checkpoint the resumed state records, in this directory, when it is recorded in another one.

    trainer_state.json holds best_model_checkpoint as an absolute path: in a run directory restored on another host
    it names the first host's directory, and Transformers drops it on resume. Without it a resume with nothing left
    to train would skip load_best_model_at_end and return the last checkpoint as the best.
    """
    recorded = json.loads((resume / "trainer_state.json").read_text()).get("best_model_checkpoint")
    if not recorded or Path(recorded).parent == output_dir:
        return None
    here = output_dir / Path(recorded).name
    if not _CHECKPOINT.match(here.name) or not here.is_dir():
        return None
    log.info("best checkpoint %s was recorded in another run directory: using %s", recorded, here)
    return here


def _stamp_in_step_order(output_dir: Path) -> None:
    """Give the checkpoint directories mtimes in step order when they are not.

    Transformers' rotation (save_total_limit) deletes the oldest checkpoints by directory mtime. A copied run
    directory (restored from the artifact store) has the copy's order, e.g. checkpoint-16 before checkpoint-8, and
    rotation would then delete the newest but one.
    """
    found = _checkpoints(output_dir)
    mtimes = [path.stat().st_mtime for _, path in found]
    if all(a < b for a, b in zip(mtimes, mtimes[1:], strict=False)):
        return
    now = time.time()
    for age, (_, path) in enumerate(reversed(found), start=1):
        os.utime(path, (now - age, now - age))  # a second apart: Transformers ignores mtimes closer than that


def _checkpoint_on_the_way_out(trainer: Any, progress: Any, output_dir: Path, why: str) -> None:
    """A checkpoint of the steps trained so far, unless the interruption landed in the middle of an update."""
    step = trainer.state.global_step
    if not progress.consistent:
        log.warning(
            "interrupted (%s) in the middle of a training step: the last checkpoint stands, and the steps since "
            "it are trained again on resume",
            why,
        )
        return
    path = output_dir / f"checkpoint-{step}"
    if step == 0 or (path / "trainer_state.json").is_file():
        return  # nothing trained yet, or this very step is saved already
    with signals_held():
        trainer._save_checkpoint(trainer.model, trial=None)  # what Transformers' loop calls at a save step
        trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)  # manifest, MLflow, callbacks
    log.warning("interrupted (%s): checkpoint at step %d (%s)", why, step, path)


def _optimizer(name: str) -> dict[str, Any]:
    if name == "adamw":
        return {"optim": "adamw_torch", "weight_decay": 0.01}
    if name == "adam":
        return {"optim": "adamw_torch", "weight_decay": 0.0}
    if name == "sgd":
        return {"optim": "sgd", "optim_args": "momentum=0.9", "weight_decay": 0.0}
    raise ValueError(f"optimizer {name!r} is not supported by the hf-image trainer")


def _best_model_args(best_metric: str) -> dict[str, Any]:
    """Transformers' choice of the best checkpoint for a Trainyard metric name (val_accuracy, val_loss)."""
    name = best_metric.removeprefix("val_")  # what compute_metrics / the eval loss are called; Transformers adds eval_
    return {"metric_for_best_model": name, "greater_is_better": name != "loss"}


def _eval_at(log_history: list[dict[str, Any]], step: int) -> dict[str, float] | None:
    for entry in reversed(log_history):
        if entry.get("step") == step and "eval_accuracy" in entry:
            return {"val_accuracy": float(entry["eval_accuracy"]), "val_loss": float(entry["eval_loss"])}
    return None


def _link_model_files(checkpoint: Path, target: Path) -> None:
    """`target` becomes a loadable model directory of the checkpoint's config and weights, hard-linked: the chosen
    weights are already on disk, so they are not written a second time (and a rotated checkpoint keeps them)."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for path in checkpoint.iterdir():
        if path.name == "config.json" or path.name.startswith(("model.", "model-")):  # weights, shards, index
            os.link(path, partial / path.name)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def _logits_module(checkpoint: Path) -> torch.nn.Module:
    """The checkpoint's model on the CPU in float32 and eval mode, returning only the logits tensor."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.inner(pixel_values=pixel_values).logits

    # eval() on the wrapper too: torch.onnx.export restores the wrapper's mode afterwards, and a wrapper left
    # in training mode puts the inner model back into training mode (BatchNorm then uses batch statistics).
    return LogitsOnly(_load(checkpoint).float().cpu()).eval()


# ---------------------------------------------------------------------------------------------- trainer


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

        run_id = _active_mlflow_run_id()
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
        callbacks = [progress] + ([_mlflow_callback(run_id)] if run_id else [])
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
            if not isinstance(interruption, Exception):  # a signal (Prefect's cancellation, Ctrl-C): keep the work
                _checkpoint_on_the_way_out(trainer, progress, output_dir, type(interruption).__name__)
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
        model = _load(Path(checkpoint)).to(device).eval()
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


__all__ = ["HFImageTrainer", "build_model"]
