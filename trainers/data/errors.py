"""Dataset defects: one error listing every defect found, each naming the file and the rule it breaks."""

from __future__ import annotations

from pathlib import Path


class DatasetError(ValueError):
    def __init__(self, root: Path, defects: list[str]) -> None:
        self.root = root
        self.defects = defects
        shown = defects[:20]
        more = f"\n  ... and {len(defects) - len(shown)} more" if len(defects) > len(shown) else ""
        super().__init__(
            f"dataset {root} is not valid ({len(defects)} defect(s)); nothing was trained:\n  - "
            + "\n  - ".join(shown)
            + more
        )
