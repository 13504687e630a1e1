"""The hf-image trainer's models, data and TrainingArguments pieces (see trainers/hf_image.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainers.base import TrainJob

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


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


def _load(checkpoint: Path) -> PreTrainedModel:
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(str(checkpoint), local_files_only=True)


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
