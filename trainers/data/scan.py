"""What a dataset format finds on disk before any image is decoded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class Scan:
    format: Literal["imagefolder", "yolo"]
    root: Path
    labels: list[str]  # class index -> name
    splits: dict[str, Path]  # split -> imagefolder split dir, or yolo images dir
    images: list[Path] = field(default_factory=list)  # every image, to be decoded
    files: list[Path] = field(default_factory=list)  # every file that makes up the dataset: what the version hashes
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    defects: list[str] = field(default_factory=list)
    data_yaml: Path | None = None


def relative(path: Path, root: Path) -> str:
    """The path as defect messages and the content hash name it: relative to the dataset root, posix."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # a yolo split may live outside `path`
        return Path(os.path.relpath(path, root)).as_posix()
