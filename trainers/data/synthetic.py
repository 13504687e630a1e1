"""Generated demo datasets of coloured shapes: deterministic from a seed, small, and learnable.

The default sizes are the demos': enough images that each demo deployment (prefect.yaml) trains a model that is
good at its task in about 3 minutes on 2 CPU cores. Tests pass their own, smaller sizes.

Every image draws from its own generator seeded by (seed, split, class or index), so the same seed gives
byte-identical files (a stable dataset version) and changing one split's size leaves the others unchanged.

    python -m trainers.data.synthetic OUT_DIR   # makes OUT_DIR/shapes-cls and OUT_DIR/shapes-det
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

Box = tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive pixel coordinates as PIL draws them
Colour = tuple[int, int, int]
DEFAULT_CLASSES = ("circle", "square", "triangle")
_SPLITS = ("train", "val", "test")
_NOISE = 12  # +- per channel: enough that a model cannot key on flat colours, little enough to keep edges
# Side of a detection object, as fractions of the image side: at the demo's 64 pixels 12 to 28 pixels, large enough
# for a from-scratch YOLO to find within a few minutes of CPU training.
_DETECTION_OBJECT_SIZE = (0.2, 0.45)


def _circle(draw: ImageDraw.ImageDraw, box: Box, fill: Colour) -> None:
    draw.ellipse(box, fill=fill)


def _square(draw: ImageDraw.ImageDraw, box: Box, fill: Colour) -> None:
    draw.rectangle(box, fill=fill)


def _triangle(draw: ImageDraw.ImageDraw, box: Box, fill: Colour) -> None:
    x0, y0, x1, y1 = box
    draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def _diamond(draw: ImageDraw.ImageDraw, box: Box, fill: Colour) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def _cross(draw: ImageDraw.ImageDraw, box: Box, fill: Colour) -> None:
    x0, y0, x1, y1 = box
    third = (x1 - x0) / 3
    draw.rectangle((x0 + third, y0, x1 - third, y1), fill=fill)
    draw.rectangle((x0, y0 + third, x1, y1 - third), fill=fill)


def _ring(draw: ImageDraw.ImageDraw, box: Box, fill: Colour) -> None:
    draw.ellipse(box, outline=fill, width=max(2, (box[2] - box[0]) // 6))


_SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, Box, Colour], None]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
    "cross": _cross,
    "ring": _ring,
}


def _drawers(classes: Sequence[str]) -> list[Callable[[ImageDraw.ImageDraw, Box, Colour], None]]:
    """A distinct shape per class: by name when it names a shape, otherwise the next unclaimed shape."""
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be non-empty and distinct, got {list(classes)}")
    if len(classes) > len(_SHAPES):
        raise ValueError(f"at most {len(_SHAPES)} classes ({', '.join(_SHAPES)}), got {len(classes)}")
    free = iter(name for name in _SHAPES if name not in classes)
    return [_SHAPES[name] if name in _SHAPES else _SHAPES[next(free)] for name in classes]


def _colours(rng: np.random.Generator) -> tuple[Colour, Colour]:
    """Background and shape colours far enough apart that the shape is always visible."""
    background = tuple(int(c) for c in rng.integers(0, 256, 3))
    while True:
        shape = tuple(int(c) for c in rng.integers(0, 256, 3))
        if sum(abs(a - b) for a, b in zip(background, shape, strict=True)) > 180:
            return background, shape  # type: ignore[return-value]


def _canvas(size: int, background: Colour) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), background)
    return image, ImageDraw.Draw(image)


def _add_noise(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    pixels = np.asarray(image, dtype=np.int16)
    pixels = pixels + rng.integers(-_NOISE, _NOISE + 1, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _random_box(rng: np.random.Generator, image_size: int, low: float, high: float) -> Box:
    side = int(rng.integers(int(image_size * low), int(image_size * high) + 1))
    x0 = int(rng.integers(0, image_size - side + 1))
    y0 = int(rng.integers(0, image_size - side + 1))
    return x0, y0, x0 + side - 1, y0 + side - 1


def _overlaps(box: Box, others: list[Box], margin: int = 2) -> bool:
    return any(
        box[0] <= o[2] + margin and o[0] <= box[2] + margin and box[1] <= o[3] + margin and o[1] <= box[3] + margin
        for o in others
    )


@contextmanager
def _built_in_place_or_atomically(root: Path) -> Iterator[Path]:
    """Build a new dataset beside its final place and rename it in, so a crash never leaves half of one."""
    if root.exists():
        yield root
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.with_name(f".{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
        partial.rename(root)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def make_shapes_classification(
    root: Path,
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    train_per_class: int = 300,
    val_per_class: int = 50,
    test_per_class: int = 20,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write an ImageFolder tree root/{train,val,test}/<class>/<n>.png, one shape per image; return root."""
    root = Path(root)
    drawers = _drawers(classes)
    counts = dict(zip(_SPLITS, (train_per_class, val_per_class, test_per_class), strict=True))
    with _built_in_place_or_atomically(root) as out:
        for split_no, (split, count) in enumerate(counts.items()):
            for class_no, (name, draw_shape) in enumerate(zip(classes, drawers, strict=True)):
                folder = out / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for n in range(count):
                    rng = np.random.default_rng([seed, split_no, class_no, n])
                    background, colour = _colours(rng)
                    image, draw = _canvas(image_size, background)
                    draw_shape(draw, _random_box(rng, image_size, 0.45, 0.85), colour)
                    _add_noise(rng, image).save(folder / f"{n:04d}.png", format="PNG")
    return root


def make_shapes_detection(
    root: Path,
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    train_images: int = 1000,
    val_images: int = 100,
    image_size: int = 64,
    max_objects: int = 3,
    seed: int = 0,
) -> Path:
    """Write a YOLO dataset (images/, labels/, data.yaml), 1..max_objects shapes an image; return data.yaml.

    Every tenth image is a background image (no shapes, empty label file), as real datasets have.
    """
    root = Path(root)
    drawers = _drawers(classes)
    with _built_in_place_or_atomically(root) as out:
        for split_no, (split, count) in enumerate((("train", train_images), ("val", val_images))):
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            (out / "labels" / split).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_no, i])
                rows = _draw_detection_image(
                    rng,
                    out / "images" / split / f"{i:04d}.png",
                    drawers,
                    image_size,
                    max_objects,
                    background_only=i % 10 == 9,
                )
                (out / "labels" / split / f"{i:04d}.txt").write_text("".join(rows), encoding="utf-8")
        data = {
            "path": str(root.resolve()),
            "train": "images/train",
            "val": "images/val",
            "names": dict(enumerate(classes)),
        }
        (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return root / "data.yaml"


def _draw_detection_image(
    rng: np.random.Generator,
    path: Path,
    drawers: list[Callable[[ImageDraw.ImageDraw, Box, Colour], None]],
    image_size: int,
    max_objects: int,
    *,
    background_only: bool,
) -> list[str]:
    """Draw one image and return its YOLO label rows."""
    background, _ = _colours(rng)
    image, draw = _canvas(image_size, background)
    boxes: list[Box] = []
    rows: list[str] = []
    for _ in range(0 if background_only else int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(0, len(drawers)))
        _, colour = _colours(rng)
        for _attempt in range(20):  # objects do not overlap, so every box is fully visible
            box = _random_box(rng, image_size, *_DETECTION_OBJECT_SIZE)
            if not _overlaps(box, boxes):
                break
        else:
            continue
        drawers[cls](draw, box, colour)
        boxes.append(box)
        x0, y0, x1, y1 = box
        # PIL fills x0..x1 inclusive, so the box spans x1 - x0 + 1 pixels.
        cx, cy = (x0 + x1 + 1) / 2 / image_size, (y0 + y1 + 1) / 2 / image_size
        w, h = (x1 - x0 + 1) / image_size, (y1 - y0 + 1) / image_size
        rows.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    _add_noise(rng, image).save(path, format="PNG")
    return rows


def _default(function: Callable[..., Path], parameter: str) -> int:
    return inspect.signature(function).parameters[parameter].default


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the shapes demo datasets (skips any that exist).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cls_root, det_root = args.out_dir / "shapes-cls", args.out_dir / "shapes-det"
    if not cls_root.exists():
        make_shapes_classification(cls_root, seed=args.seed)
    if not det_root.exists():
        make_shapes_detection(det_root, seed=args.seed)
    per_class = _default(make_shapes_classification, "train_per_class")
    for root, train_dir, expected, unit in (
        (cls_root, cls_root / "train" / DEFAULT_CLASSES[0], per_class, " a class"),
        (det_root, det_root / "images" / "train", _default(make_shapes_detection, "train_images"), ""),
    ):
        found = sum(1 for _ in train_dir.glob("*.png")) if train_dir.is_dir() else 0
        if found != expected:  # another version's demo data (older ones were smaller: their demos trained worse)
            print(
                f"note: {root} has {found} training images{unit}, this version's demo data {expected}; remove it "
                "and run again to regenerate it",
                file=sys.stderr,
            )
    print(cls_root.resolve())
    print((det_root / "data.yaml").resolve())


if __name__ == "__main__":
    main()
