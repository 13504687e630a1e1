"""A plain PyTorch image classifier trainer for built-in or user-defined models.

The fastest trainer, and the readable reference for the contract: one loop, one checkpoint dict.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from trainers import offline  # noqa: F401  (before any library that might phone home)
from trainers.base import Trainer, TrainJob, TrainResult
from trainers.config import TrainConfig
from trainers.data.classification import ImageFolderSplit, eval_transform, preprocessed_batch, train_transform
from trainers.export import export_image_classifier

log = logging.getLogger("trainers.torch")
CHECKPOINT_FORMAT = 1


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


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact, never a truncated one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


class TorchClassifierTrainer(Trainer):
    def train(self, job: TrainJob) -> TrainResult:
        config, device = job.config, torch.device(job.device)
        seed_everything(config.seed, config.deterministic)
        job.output_dir.mkdir(parents=True, exist_ok=True)
        last_path, best_path = job.output_dir / "last.pt", job.output_dir / "best.pt"

        train_data = ImageFolderSplit(job.dataset, "train", train_transform(config.image_size, config.augmentations))
        val_data = ImageFolderSplit(job.dataset, "val", eval_transform(config.image_size))
        generator = torch.Generator().manual_seed(config.seed)
        train_loader = DataLoader(
            train_data, config.batch_size, shuffle=True, num_workers=config.workers, generator=generator
        )
        val_loader = DataLoader(val_data, config.batch_size, num_workers=config.workers)

        model = build_model(config.model, len(job.dataset.labels)).to(device)
        optimizer = make_optimizer(config, model.parameters())
        scheduler = make_scheduler(config, optimizer, config.epochs * len(train_loader))
        loss_fn = nn.CrossEntropyLoss(label_smoothing=config.loss.label_smoothing)

        start_epoch, best = 0, {"val_accuracy": -1.0}
        if last_path.exists():
            start_epoch, best = self._resume(job, last_path, model, optimizer, scheduler, generator)
        job.emit_start(config.epochs, start_epoch)

        epoch = start_epoch
        for epoch in range(start_epoch + 1, config.epochs + 1):
            model.train()
            total, seen = 0.0, 0
            for images, targets in train_loader:
                images, targets = images.to(device), targets.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(images), targets)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total, seen = total + loss.item() * len(targets), seen + len(targets)
            metrics = {
                "train_loss": total / max(seen, 1),
                **_evaluate(model, val_loader, loss_fn, device, "val"),
            }
            metrics["learning_rate"] = scheduler.get_last_lr()[0]
            _log_to_active_mlflow_run(metrics, epoch)
            job.emit_epoch(epoch, metrics)
            log.info("epoch %d/%d %s", epoch, config.epochs, _fmt(metrics))

            state = self._state(job, model, optimizer, scheduler, generator, epoch, best)
            if metrics["val_accuracy"] > best["val_accuracy"]:
                best = {k: v for k, v in metrics.items() if k.startswith("val_")}
                state["best"] = best
                save_checkpoint(best_path, state)
            if epoch % config.checkpoint.every_n_epochs == 0 or epoch == config.epochs:
                save_checkpoint(last_path, state)
                job.emit_checkpoint(epoch, last_path)

        return TrainResult(
            best_checkpoint=best_path,
            last_checkpoint=last_path,
            labels=list(job.dataset.labels),
            metrics=best,
            epochs_completed=epoch,
            primary_metric="val_accuracy",
        )

    @staticmethod
    def _state(job, model, optimizer, scheduler, generator, epoch, best) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "best": best,
            "labels": list(job.dataset.labels),
            "dataset_version": job.dataset.version,
            "config": job.config.model_dump(mode="json"),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "loader": generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    @staticmethod
    def _resume(job, path, model, optimizer, scheduler, generator) -> tuple[int, dict]:
        state = load_checkpoint(path)
        if state["labels"] != list(job.dataset.labels) or state["dataset_version"] != job.dataset.version:
            raise ValueError(
                f"checkpoint {path} was trained on another dataset or label map "
                f"({state['dataset_version']}, {state['labels']}); use a new output directory or remove it"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["loader"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        log.info("resuming from %s at epoch %d", path, state["epoch"])
        return state["epoch"], state["best"]

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


def _log_to_active_mlflow_run(metrics: dict[str, float], epoch: int) -> None:
    """Like the other libraries' MLflow callbacks: log into the caller's run if there is one, else nothing."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics(metrics, step=epoch)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
