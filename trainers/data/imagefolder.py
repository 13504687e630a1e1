"""The ImageFolder layout: root/{train,val[,test]}/<class>/**/<image>; labels: the sorted class folders (2 or more)."""

from __future__ import annotations

import os
import unicodedata
from collections import defaultdict
from pathlib import Path

from trainers.data.images import IMAGE_SUFFIXES, is_ignorable, is_image_name, walk_files
from trainers.data.scan import Scan, relative

SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "val")
_ACCEPTED = ", ".join(sorted(IMAGE_SUFFIXES))


def scan_imagefolder(root: Path) -> Scan:
    """Find every split, class and image, and every structural defect; decodes nothing."""
    root = Path(root).resolve()
    scan = Scan(format="imagefolder", root=root, labels=[], splits={})
    for split in SPLITS:
        if (root / split).is_dir():
            scan.splits[split] = root / split
        elif split in REQUIRED_SPLITS:
            scan.defects.append(
                f"{split}/: missing split folder; an ImageFolder dataset needs train/ and val/ "
                "(test/ optional), each holding one folder per class"
            )
    classes = {split: _scan_split(scan, split, directory) for split, directory in scan.splits.items()}
    scan.defects.extend(_class_mismatches(classes))
    scan.defects.extend(_too_few_classes(classes))
    scan.labels = sorted({name for per_class in classes.values() for name in per_class})
    scan.stats = {
        split: {name: len(images) for name, images in per_class.items()} for split, per_class in classes.items()
    }
    return scan


def _scan_split(scan: Scan, split: str, directory: Path) -> dict[str, list[Path]]:
    """class name -> its images (found recursively: nested folders inside a class folder are allowed)."""
    per_class: dict[str, list[Path]] = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if is_ignorable(entry.name):
            continue
        path = Path(entry.path)
        if not entry.is_dir():
            scan.files.append(path)
            scan.defects.append(
                f"{relative(path, scan.root)}: file directly in {split}/, outside any class folder; "
                f"move it into {split}/<class>/ or remove it"
            )
            continue
        images = []
        for file in walk_files(path):
            scan.files.append(file)
            if is_image_name(file.name):
                images.append(file)
            else:
                scan.defects.append(
                    f"{relative(file, scan.root)}: not an image (suffix {file.suffix or 'none'!r}); "
                    f"class folders hold only images ({_ACCEPTED}); remove it"
                )
        if not images:
            scan.defects.append(f"{split}/{entry.name}/: empty class folder (no images); add images or remove it")
        per_class[entry.name] = images
        scan.images.extend(images)
    if not per_class:
        scan.defects.append(f"{split}/: no class folders; put each class's images in {split}/<class name>/")
    return per_class


def _class_mismatches(classes: dict[str, dict[str, list[Path]]]) -> list[str]:
    """Every split must hold the same class folders, or the label maps of the splits would disagree."""
    present = {split: set(per_class) for split, per_class in classes.items() if per_class}
    holders = {name: [s for s in present if name in present[s]] for names in present.values() for name in names}
    spellings: dict[str, list[str]] = defaultdict(list)  # names equal but for case or Unicode normalisation
    for name in sorted(holders):
        spellings[_loose(name)].append(name)
    defects: list[str] = []
    for group in spellings.values():
        # The spelling most splits use (train's on a tie) is the one to keep; the others are renames.
        keep = max(group, key=lambda n: (len(holders[n]), "train" in holders[n]))
        keepers = ", ".join(f"{s}/" for s in holders[keep])
        for name in group:
            defects.extend(
                f"{split}/{name}/: class name differs between splits ({keepers} has {keep!r}, only case or "
                f"Unicode normalisation differ); rename it to {split}/{keep}/"
                for split in holders[name]
                if name != keep
            )
        for split in present:
            if not any(split in holders[n] for n in group):
                defects.append(
                    f"{split}/: class {keep!r} is missing (it is in {keepers}); add {split}/{keep}/ "
                    f"with images or remove the class from {keepers}"
                )
    return defects


def _too_few_classes(classes: dict[str, dict[str, list[Path]]]) -> list[str]:
    """A classifier tells classes apart: it needs at least two class folders that hold images."""
    if not any(classes.values()):
        return []  # no class folders at all: reported per split
    holding = sorted({name for per_class in classes.values() for name, images in per_class.items() if images})
    if len(holding) >= 2:
        return []
    splits = ", ".join(f"{split}/" for split in classes)
    found = f"one class only ({holding[0]!r})" if holding else "no class folder holds images"
    return [
        f"{splits}: {found}; a classifier needs at least two classes, i.e. two class folders with images in each "
        "split; add a folder of images for another class to every split (train/<class>/, val/<class>/)"
    ]


def _loose(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()
