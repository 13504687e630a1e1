"""The YOLO (Ultralytics) layout: a data.yaml naming the classes and the images dir of each split.

Labels live where Ultralytics looks for them: the image path with its last `images` component replaced by
`labels` and the suffix by `.txt`; one `cls cx cy w h` row per object, normalised to [0, 1].
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from trainers.data.errors import DatasetError
from trainers.data.images import IMAGE_SUFFIXES, is_image_name, walk_files
from trainers.data.scan import Scan, relative

SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "val")
STATS_KEYS = ("images", "background")  # per-split stats entries next to the class counts
_ACCEPTED = ", ".join(sorted(IMAGE_SUFFIXES))


def scan_yolo(data_yaml: Path) -> Scan:
    """Read data.yaml, then find every image and label file and check every label row; decodes no image.

    Raises DatasetError at once when data.yaml itself is unusable: nothing else can be checked without it.
    """
    data_yaml = Path(data_yaml).resolve()
    config = _read_config(data_yaml)
    root, labels = _root(data_yaml, config), _names(data_yaml, config)
    scan = Scan(format="yolo", root=root, labels=labels, splits={}, data_yaml=data_yaml)
    yaml_name = relative(data_yaml, root)
    for split in SPLITS:
        value = config.get(split)
        if split not in REQUIRED_SPLITS and value in (None, ""):
            continue
        directory = _split_dir(root, value)
        if directory is None:
            scan.defects.append(
                f"{yaml_name}: {split}: {value!r} is not a directory under {root}; point it at the {split} "
                f"images folder, relative to `path` (e.g. images/{split})"
            )
            continue
        scan.splits[split] = directory
        _scan_split(scan, split, directory)
    return scan


def label_path(image: Path) -> Path:
    """Ultralytics' rule (img2label_paths), so the trainer reads exactly the labels validated here."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(labels.join(str(image).rsplit(images, 1))).with_suffix(".txt")


def _read_config(data_yaml: Path) -> dict[str, Any]:
    def fail(rule: str) -> DatasetError:
        return DatasetError(data_yaml.parent, [f"{data_yaml.name}: {rule}"])

    try:
        config = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise fail(f"cannot be read as YAML ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise fail("must be a YAML mapping with keys train, val and names (and optionally path, test)")
    missing = [key for key in ("train", "val", "names") if config.get(key) in (None, "")]
    if missing:
        raise fail(
            f"missing key(s) {', '.join(missing)}; a YOLO data.yaml needs train and val (images folders, "
            "relative to `path`) and names (a list, or a mapping {0: name, ...})"
        )
    return config


def _root(data_yaml: Path, config: dict[str, Any]) -> Path:
    """`path` from data.yaml, relative to the yaml's folder; the yaml's folder when absent."""
    raw = config.get("path")
    root = data_yaml.parent if raw in (None, "") else (data_yaml.parent / Path(str(raw)).expanduser()).resolve()
    if not root.is_dir():
        raise DatasetError(
            data_yaml.parent,
            [
                f"{data_yaml.name}: path: {raw!r} is not a directory (resolved to {root}); point it at the dataset "
                f"folder, absolute or relative to {data_yaml.name}'s folder, or remove it to use that folder"
            ],
        )
    return root


def _names(data_yaml: Path, config: dict[str, Any]) -> list[str]:
    raw = config["names"]
    defects: list[str] = []
    names: list[Any] = []
    if isinstance(raw, list):
        names = raw
    elif isinstance(raw, dict):
        ids = list(raw)
        if all(isinstance(i, int) and not isinstance(i, bool) for i in ids) and sorted(ids) == list(range(len(ids))):
            names = [raw[i] for i in range(len(ids))]
        else:
            defects.append(f"names: class ids must be the integers 0..{len(ids) - 1} with no gaps, got {ids}")
    else:
        defects.append(f"names: must be a list or a mapping {{0: name, ...}}, got {type(raw).__name__}")
    if not names and not defects:
        defects.append("names: lists no class; name every class the labels use (e.g. names: [person, car])")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            defects.append(f"names[{i}]: {name!r} is not a class name; quote it in data.yaml (e.g. '{name}')")
        elif name in STATS_KEYS:
            defects.append(f"names[{i}]: {name!r} is reserved for the dataset stats; rename the class")
    duplicates = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    if duplicates:
        defects.append(f"names: duplicate class name(s) {duplicates}; each class needs its own name")
    if "nc" in config and config["nc"] != len(names):
        defects.append(f"nc: {config['nc']!r} does not match the {len(names)} names; fix nc or remove it")
    if defects:
        raise DatasetError(data_yaml.parent, [f"{data_yaml.name}: {d}" for d in defects])
    return names


def _split_dir(root: Path, value: Any) -> Path | None:
    if not isinstance(value, str) or not value:
        return None  # lists of folders and .txt image lists are Ultralytics options this platform does not take
    directory = (root / value).resolve()
    if not directory.exists() and value.startswith("../"):
        directory = (root / value[3:]).resolve()  # Roboflow exports say ../train/images; Ultralytics accepts it
    return directory if directory.is_dir() else None


def _scan_split(scan: Scan, split: str, images_dir: Path) -> None:
    labels_dir = label_path(images_dir / "x").parent
    beside = labels_dir == images_dir  # no `images` component: labels sit next to the images
    images_rel, labels_rel = relative(images_dir, scan.root), relative(labels_dir, scan.root)
    images: list[Path] = []
    for file in walk_files(images_dir):
        if is_image_name(file.name):
            images.append(file)
        elif not (beside and file.suffix.lower() == ".txt"):
            scan.files.append(file)
            scan.defects.append(
                f"{relative(file, scan.root)}: not an image (suffix {file.suffix or 'none'!r}); "
                f"the {split} images folder holds only images ({_ACCEPTED}); remove it"
            )
    if not images:
        scan.defects.append(f"{images_rel}/: no images in the {split} split")
    scan.images.extend(images)
    scan.files.extend(images)

    expected: dict[Path, Path] = {}  # label file -> its image
    for image in images:
        label = label_path(image)
        if label in expected:
            scan.defects.append(
                f"{relative(image, scan.root)}: shares its label file {relative(label, scan.root)} with "
                f"{relative(expected[label], scan.root)}; rename one of the two images"
            )
        expected[label] = image
    found = {f for f in walk_files(labels_dir) if f.suffix.lower() == ".txt"} if labels_dir.is_dir() else set()
    for orphan in sorted(found - expected.keys()):
        scan.files.append(orphan)
        scan.defects.append(
            f"{relative(orphan, scan.root)}: label file with no matching image in {images_rel}/ "
            "(same name, an image suffix); add the image or remove the label file"
        )
    labelled = sorted(found & expected.keys())
    if images and not labelled:
        scan.defects.append(
            f"{labels_rel}/: no label file for any of the {len(images)} {split} images; each image needs "
            f"{labels_rel}/<image name>.txt with one 'cls cx cy w h' row per object "
            "(an empty file marks a background image)"
        )

    objects: Counter[int] = Counter()
    background = len(images) - len(labelled)  # an image without a label file is a background image
    for label in labelled:
        scan.files.append(label)
        classes, has_rows = _read_label_file(scan, label)
        objects.update(classes)
        background += not has_rows
    scan.stats[split] = {name: objects[i] for i, name in enumerate(scan.labels)}
    scan.stats[split].update(images=len(images), background=background)


def _read_label_file(scan: Scan, label: Path) -> tuple[list[int], bool]:
    """The class ids of the file's valid rows, and whether it has any rows; defects go into the scan."""
    name, n_classes = relative(label, scan.root), len(scan.labels)
    try:
        text = label.read_text(encoding="utf-8-sig")  # universal newlines: CRLF and CR files read as LF
    except (OSError, UnicodeDecodeError) as exc:
        scan.defects.append(
            f"{name}: cannot be read as UTF-8 text ({type(exc).__name__}: {exc}); save it as UTF-8 (or ASCII) text"
        )
        return [], True
    classes: list[int] = []
    has_rows = False
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue  # blank lines, trailing ones included
        has_rows = True
        where = f"{name}:{line_no}"
        try:
            values = [float(f) for f in fields]
        except ValueError:
            values = []
        if len(fields) != 5 or not values:
            scan.defects.append(
                f"{where}: malformed row {line.strip()!r}; a detection label row is 5 numbers 'cls cx cy w h'"
            )
            continue
        cls, coords = values[0], values[1:]
        valid = True
        if not (cls.is_integer() and 0 <= cls < n_classes):
            valid = False
            scan.defects.append(
                f"{where}: class id {fields[0]} is not an integer in [0, {n_classes}) "
                f"(data.yaml names {n_classes} classes)"
            )
        if not all(0.0 <= v <= 1.0 for v in coords):
            valid = False
            scan.defects.append(
                f"{where}: coordinates {' '.join(fields[1:])} are not all in [0, 1]; YOLO boxes are "
                "normalised (divide x and w by the image width, y and h by its height)"
            )
        if valid:
            classes.append(int(cls))
    return classes, has_rows
