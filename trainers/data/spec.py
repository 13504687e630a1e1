"""A validated dataset, as the trainers see it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class DatasetSpec:
    format: Literal["imagefolder", "yolo"]
    root: Path
    labels: list[str]  # class index -> name; the label map that travels with checkpoints and exports
    splits: dict[str, Path]  # split name -> its directory (imagefolder: class folders; yolo: images/)
    version: str  # content hash of every file: the dataset version
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class name -> image count
    data_yaml: Path | None = None  # yolo only

    @property
    def label_map(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    def to_json(self) -> str:
        data = asdict(self)
        data.update(root=str(self.root), splits={k: str(v) for k, v in self.splits.items()})
        data["data_yaml"] = str(self.data_yaml) if self.data_yaml else None
        return json.dumps(data, indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> DatasetSpec:
        data = json.loads(text)
        data.update(root=Path(data["root"]), splits={k: Path(v) for k, v in data["splits"].items()})
        data["data_yaml"] = Path(data["data_yaml"]) if data["data_yaml"] else None
        return cls(**data)
