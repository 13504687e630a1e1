"""ImageFolder splits as torch datasets, with the preprocessing that export and parity checks reuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from trainers.config import Augmentations
from trainers.data.images import is_image_name, walk_files
from trainers.data.spec import DatasetSpec

MEAN = STD = (0.5, 0.5, 0.5)  # fixed, so an exported model needs no statistics from the training set


def list_images(split_dir: Path, labels: list[str]) -> list[tuple[Path, int]]:
    """(image, class index) for every image under each class folder, nested folders included, sorted.

    The same walk as validation, so training sees exactly the images that were checked and counted."""
    return [
        (path, index)
        for index, name in enumerate(labels)
        for path in walk_files(split_dir / name)
        if is_image_name(path.name)
    ]


def eval_transform(image_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def train_transform(image_size: int, aug: Augmentations) -> v2.Compose:
    steps: list[v2.Transform] = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
    if aug.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip(aug.horizontal_flip))
    if aug.vertical_flip:
        steps.append(v2.RandomVerticalFlip(aug.vertical_flip))
    if aug.color_jitter:
        steps.append(v2.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


def load_rgb(path: Path) -> Image.Image:
    # Grayscale, palette and RGBA images are all valid inputs; the models take RGB.
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageFolderSplit(Dataset):
    def __init__(self, dataset: DatasetSpec, split: str, transform: v2.Compose) -> None:
        self.items = list_images(dataset.splits[split], dataset.labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        return self.transform(load_rgb(path)), label


def preprocessed_batch(dataset: DatasetSpec, split: str, image_size: int, count: int) -> np.ndarray:
    """The first `count` images of a split, preprocessed for inference (NCHW float32)."""
    data = ImageFolderSplit(dataset, split, eval_transform(image_size))
    count = min(count, len(data))
    return torch.stack([data[i][0] for i in range(count)]).numpy()
