"""Load a dataset from disk into a DatasetSpec, or fail with every defect it has."""

from __future__ import annotations

from pathlib import Path

from trainers.data.detect import scan_dataset
from trainers.data.errors import DatasetError
from trainers.data.fingerprint import content_hash
from trainers.data.images import inspect_images
from trainers.data.spec import DatasetSpec


def load_dataset(path: str | Path) -> DatasetSpec:
    """Detect the format (ImageFolder or YOLO), check the layout, every label and every image, and version it.

    Raises DatasetError listing all defects, each naming the file (relative to the dataset root) and the rule.
    """
    scan = scan_dataset(path)
    image_defects, digests = inspect_images(scan.images, scan.root)
    defects = scan.defects + image_defects
    if defects:
        raise DatasetError(scan.root, defects)
    return DatasetSpec(
        format=scan.format,
        root=scan.root,
        labels=scan.labels,
        splits=scan.splits,
        version=content_hash(scan, known=digests),
        stats=scan.stats,
        data_yaml=scan.data_yaml,
    )
