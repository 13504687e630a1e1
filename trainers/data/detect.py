"""Which format a path holds, told from its layout alone."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from trainers.data.errors import DatasetError
from trainers.data.imagefolder import scan_imagefolder
from trainers.data.scan import Scan
from trainers.data.yolo_layout import scan_yolo

LAYOUTS = (
    "expected either an ImageFolder directory (train/<class>/<images>, val/<class>/<images>, optional test/) "
    "or a YOLO dataset (a data.yaml with train, val and names, or a directory holding data.yaml)"
)


def detect_format(path: str | Path) -> tuple[Literal["imagefolder", "yolo"], Path]:
    """("yolo", its data.yaml) or ("imagefolder", its root); otherwise DatasetError explaining both."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(path, [f"{path}: does not exist; {LAYOUTS}"])
    if path.is_file():
        if path.suffix.lower() in {".yaml", ".yml"}:
            return "yolo", path
        raise DatasetError(path, [f"{path.name}: is a file, not a dataset; {LAYOUTS}"])
    for name in ("data.yaml", "data.yml"):
        if (path / name).is_file():
            return "yolo", path / name
    if (path / "train").is_dir() or (path / "val").is_dir():  # one split alone is reported as a missing split
        return "imagefolder", path
    raise DatasetError(path, [f"{path}: no train/ and val/ folders and no data.yaml; {LAYOUTS}"])


def scan_dataset(path: str | Path) -> Scan:
    """Detect the format and scan the layout, labels included; no image is decoded."""
    fmt, location = detect_format(path)
    return scan_yolo(location) if fmt == "yolo" else scan_imagefolder(location)
