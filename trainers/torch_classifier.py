"""A plain PyTorch image classifier trainer for built-in or user-defined models.

The fastest trainer, and the readable reference for the contract: one loop, one checkpoint dict.

When it checkpoints: at the end of an epoch that is due (a multiple of `checkpoint.every_n_epochs`, or the best
metric better than the best checkpoint's) unless the previous checkpoint, or the start of this attempt, is younger
than `checkpoint.min_interval_seconds`; and always at the last epoch, once `checkpoint.every_seconds` have passed
(mid-epoch too), on a pause, on "checkpoint now" and on a cancel. best.pt is the best of the checkpoints written,
by `checkpoint.best_metric`: val_accuracy (higher is better, the default) or val_loss (lower is better).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from trainers import offline  # noqa: F401  (before any library that might phone home)
from trainers.base import Trainer, TrainingPaused, TrainJob, TrainResult
from trainers.checkpoint_policy import CheckpointSchedule, improves, save_on_the_way_out
from trainers.checkpoints import CheckpointError, CheckpointStore
from trainers.config import TrainConfig
from trainers.data.classification import ImageFolderSplit, eval_transform, preprocessed_batch, train_transform
from trainers.metrics_log import EpochMetricsLog
from trainers.onnx_export import export_image_classifier

log = logging.getLogger("trainers.torch")
CHECKPOINT_FORMAT = 2  # 2: mid-epoch progress, per-epoch loader order
DEFAULT_BEST_METRIC = "val_accuracy"


def tiny_cnn(num_classes: int) -> nn.Module:
    """A small conv net that learns the demo shapes in a few CPU epochs."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(3, 32),
        block(32, 64),
        block(64, 96),
        block(96, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def build_model(name: str, num_classes: int) -> nn.Module:
    if name == "tiny-cnn":
        return tiny_cnn(num_classes)
    if name in ("resnet18", "mobilenet_v3_small"):
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    module, factory = name.split(":")
    return getattr(importlib.import_module(module), factory)(num_classes=num_classes)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.learning_rate)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps: int):
    def factor(step: int) -> float:
        progress = min(step / max(steps, 1), 1.0)
        if config.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if config.scheduler == "linear":
            return 1.0 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint, so a resumed run continues mid-epoch where it stopped."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps done in all
    loss_sum: float = 0.0  # the current epoch's train loss so far (sum over samples)
    seen: int = 0
    best: dict = field(default_factory=lambda: {"val_accuracy": -1.0})
    history: dict = field(default_factory=dict)  # epoch -> its metrics, what MLflow must end up with


class TorchClassifierTrainer(Trainer):
    def train(self, job: TrainJob) -> TrainResult:
        config, device = job.config, torch.device(job.device)
        seed_everything(config.seed, config.deterministic)
        store = CheckpointStore(job.output_dir, config.checkpoint.keep_last)

        train_data = ImageFolderSplit(job.dataset, "train", train_transform(config.image_size, config.augmentations))
        val_data = ImageFolderSplit(job.dataset, "val", eval_transform(config.image_size))
        val_loader = DataLoader(val_data, config.batch_size, num_workers=config.workers)
        steps_per_epoch = math.ceil(len(train_data) / config.batch_size)

        model = build_model(config.model, len(job.dataset.labels)).to(device)
        optimizer = make_optimizer(config, model.parameters())
        scheduler = make_scheduler(config, optimizer, config.epochs * steps_per_epoch)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=config.loss.label_smoothing)

        progress = Progress()
        if found := store.latest(load_checkpoint):
            progress = self._resume(job, *found, model, optimizer, scheduler)
        metrics_log = EpochMetricsLog("train_loss")
        metrics_log.log_epochs(progress.history)  # a crash between a checkpoint and its logging left these out
        job.emit_start(config.epochs, progress.epoch)
        policy = CheckpointSchedule(config.checkpoint, job.control)
        best_metric = config.checkpoint.best_metric or DEFAULT_BEST_METRIC

        def checkpoint(best: bool = False) -> str:
            state = self._state(job, model, optimizer, scheduler, progress)
            path = store.save(lambda handle: torch.save(state, handle), progress.epoch, progress.step, best)
            policy.saved(progress.best)
            metrics_log.log_epochs(progress.history)  # only epochs a checkpoint holds: a resume never repeats one
            job.emit_checkpoint(progress.epoch, path)
            return f"epoch {progress.epoch}, batch {progress.batch}"

        consistent = True  # False while the model, the optimizer and `progress` are being updated together
        try:
            for epoch in range(progress.epoch + 1, config.epochs + 1):
                model.train()
                for images, targets in _epoch_loader(train_data, config, epoch, skip=progress.batch):
                    images, targets = images.to(device), targets.to(device)
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(model(images), targets)
                    loss.backward()
                    consistent = False
                    optimizer.step()
                    scheduler.step()
                    progress.batch, progress.step = progress.batch + 1, progress.step + 1
                    progress.loss_sum += loss.item() * len(targets)
                    progress.seen += len(targets)
                    consistent = True
                    job.control.mark_progress()
                    if policy.asked() or (policy.time_is_up() and progress.batch < steps_per_epoch):
                        checkpoint()  # a pause, "checkpoint now", or mid-epoch by every_seconds
                        if policy.pause_requested:
                            raise TrainingPaused(f"paused in epoch {epoch}, after batch {progress.batch}")
                metrics = {
                    "train_loss": progress.loss_sum / max(progress.seen, 1),
                    **_evaluate(model, val_loader, loss_fn, device, "val"),
                    "learning_rate": scheduler.get_last_lr()[0],
                }
                # progress.best is the best of the checkpoints written: an epoch that is not saved cannot be best.
                improved = improves(metrics, progress.best, best_metric)
                save = policy.save_now(due=improved or policy.epoch_due(epoch), final=epoch == config.epochs)
                consistent = False
                progress.epoch, progress.batch, progress.loss_sum, progress.seen = epoch, 0, 0.0, 0
                progress.history[epoch] = metrics
                if save and improved:
                    progress.best = {k: v for k, v in metrics.items() if k.startswith("val_")}
                consistent = True
                job.emit_epoch(epoch, metrics)
                log.info("epoch %d/%d %s", epoch, config.epochs, _fmt(metrics))
                if save:
                    checkpoint(best=improved)
        except BaseException as interruption:
            save_on_the_way_out(interruption, consistent, checkpoint)
            raise

        return TrainResult(
            best_checkpoint=job.output_dir / "best.pt",
            last_checkpoint=job.output_dir / "last.pt",
            labels=list(job.dataset.labels),
            metrics=progress.best,
            epochs_completed=progress.epoch,
            primary_metric=best_metric,
        )

    @staticmethod
    def _state(job, model, optimizer, scheduler, progress: Progress) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": asdict(progress),
            "epoch": progress.epoch,
            "labels": list(job.dataset.labels),
            "dataset_version": job.dataset.version,
            "config": job.config.model_dump(mode="json"),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            },
        }

    @staticmethod
    def _resume(job, path, state, model, optimizer, scheduler) -> Progress:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint {path} has format {state.get('format')}, this trainer writes {CHECKPOINT_FORMAT}: "
                "it cannot resume it exactly; use a new output directory"
            )
        if state["labels"] != list(job.dataset.labels) or state["dataset_version"] != job.dataset.version:
            raise CheckpointError(
                f"checkpoint {path} was trained on another dataset or label map "
                f"({state['dataset_version']}, {state['labels']}); use a new output directory or remove it"
            )
        best_then = state["config"]["checkpoint"].get("best_metric") or DEFAULT_BEST_METRIC
        best_now = job.config.checkpoint.best_metric or DEFAULT_BEST_METRIC
        if best_then != best_now:  # its best.pt and best-so-far were chosen by the other metric
            raise CheckpointError(
                f"checkpoint {path} chose its best by checkpoint.best_metric {best_then!r}, this run asks for "
                f"{best_now!r}: resume with {best_then!r}, or use a new output directory"
            )
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise CheckpointError(
                f"checkpoint {path} holds another architecture ({state['config']['model']!r}) than this run's "
                f"{job.config.model!r}; use a new output directory. ({str(error).splitlines()[0]})"
            ) from error
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        progress = Progress(**state["progress"])
        log.info("resuming from %s at epoch %d, batch %d", path, progress.epoch, progress.batch)
        return progress

    def _load_model(self, job: TrainJob, checkpoint: Path) -> nn.Module:
        state = load_checkpoint(checkpoint)
        model = build_model(state["config"]["model"], len(state["labels"]))
        model.load_state_dict(state["model"])
        return model.eval()

    def evaluate(self, job: TrainJob, checkpoint: Path, split: str) -> dict[str, float]:
        model = self._load_model(job, checkpoint).to(job.device)
        data = ImageFolderSplit(job.dataset, split, eval_transform(job.config.image_size))
        loader = DataLoader(data, job.config.batch_size, num_workers=job.config.workers)
        return _evaluate(model, loader, nn.CrossEntropyLoss(), torch.device(job.device), split)

    def export_onnx(self, job: TrainJob, checkpoint: Path, path: Path, opset: int) -> Path:
        return export_image_classifier(self._load_model(job, checkpoint), job.config.image_size, path, opset)

    def parity_inputs(self, job: TrainJob, count: int) -> np.ndarray:
        return preprocessed_batch(job.dataset, "val", job.config.image_size, count)

    def torch_outputs(self, job: TrainJob, checkpoint: Path, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._load_model(job, checkpoint)(torch.from_numpy(batch)).numpy()


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, loss_fn, device: torch.device, split: str) -> dict[str, float]:
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        logits = model(images)
        loss += loss_fn(logits, targets).item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        total += len(targets)
    return {f"{split}_accuracy": correct / max(total, 1), f"{split}_loss": loss / max(total, 1)}


def _epoch_loader(data, config: TrainConfig, epoch: int, skip: int) -> DataLoader:
    """The epoch's batches in an order fixed by (seed, epoch), from batch `skip` on: a resumed epoch sees exactly
    the batches the interrupted one had left. The loader's own generator seeds its workers, so it never draws
    from the global RNG that the augmentations use."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
    indices = order[skip * config.batch_size :].tolist()
    seeds = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 7919 + skip)
    return DataLoader(data, config.batch_size, sampler=indices, num_workers=config.workers, generator=seeds)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
