"""Shared fixtures: tiny datasets written into tmp_path with PIL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

MakeImage = Callable[..., Path]


@pytest.fixture
def make_image() -> MakeImage:
    """Write a small solid image at path (parents created) and return the path."""

    def make(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 8), colour: object = 128) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, colour).save(path)
        return path

    return make


@pytest.fixture
def tiny_imagefolder(tmp_path: Path, make_image: MakeImage) -> Path:
    """root/{train,val}/{cat,dog}/: two training images and one validation image per class."""
    root = tmp_path / "cls"
    for split, count in (("train", 2), ("val", 1)):
        for name in ("cat", "dog"):
            for i in range(count):
                make_image(root / split / name / f"{i}.png")
    return root


@pytest.fixture
def tiny_yolo(tmp_path: Path, make_image: MakeImage) -> Path:
    """A YOLO dataset, classes [cat, dog]: two train images, one val image, one box each; its data.yaml."""
    root = tmp_path / "det"
    for split, stems in (("train", ("a", "b")), ("val", ("c",))):
        for cls, stem in enumerate(stems):
            make_image(root / "images" / split / f"{stem}.png", size=(16, 16))
            label = root / "labels" / split / f"{stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(f"{cls} 0.5 0.5 0.25 0.25\n")
    data_yaml = root / "data.yaml"
    data_yaml.write_text("train: images/train\nval: images/val\nnames: [cat, dog]\n", encoding="utf-8")
    return data_yaml
