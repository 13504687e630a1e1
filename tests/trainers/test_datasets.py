"""The dataset layer: format detection, loading, label maps, versions, demo datasets.

Every defect rule (what is refused, and the odd datasets that are accepted) is in tests/test_bad_input_catalog.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from trainers.data.fingerprint import fingerprint
from trainers.data.spec import DatasetSpec
from trainers.data.synthetic import main as synthetic_main
from trainers.data.synthetic import make_shapes_classification, make_shapes_detection
from trainers.data.validate import load_dataset

# --- format detection -------------------------------------


def test_yolo_is_found_from_its_directory_or_its_yaml(tiny_yolo: Path) -> None:
    assert load_dataset(tiny_yolo.parent) == load_dataset(tiny_yolo)
    assert load_dataset(str(tiny_yolo)).format == "yolo"


# --- imagefolder ------------------------------------------


def test_imagefolder_loads_with_sorted_label_map(tiny_imagefolder: Path) -> None:
    spec = load_dataset(tiny_imagefolder)
    assert spec.format == "imagefolder"
    assert spec.label_map == {0: "cat", 1: "dog"}
    assert spec.splits == {"train": tiny_imagefolder / "train", "val": tiny_imagefolder / "val"}
    assert spec.stats == {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}}
    assert spec.version.startswith("sha256:") and len(spec.version) == 7 + 64
    assert spec.data_yaml is None
    assert DatasetSpec.from_json(spec.to_json()) == spec


def test_non_ascii_class_names(tmp_path: Path, make_image) -> None:
    for split in ("train", "val"):
        for name in ("čaj", "猫"):
            make_image(tmp_path / split / name / "ü.png")
    spec = load_dataset(tmp_path)
    assert spec.labels == ["čaj", "猫"]
    assert "čaj" in spec.to_json() and "猫" in spec.to_json()
    assert json.loads(spec.to_json())["stats"]["val"] == {"čaj": 1, "猫": 1}
    assert DatasetSpec.from_json(spec.to_json()) == spec


# --- yolo -------------------------------------------------


def test_yolo_loads_with_stats(tiny_yolo: Path) -> None:
    spec = load_dataset(tiny_yolo)
    root = tiny_yolo.parent
    assert (spec.root, spec.data_yaml, spec.labels) == (root, tiny_yolo, ["cat", "dog"])
    assert spec.splits == {"train": root / "images" / "train", "val": root / "images" / "val"}
    assert spec.stats == {
        "train": {"cat": 1, "dog": 1, "images": 2, "background": 0},
        "val": {"cat": 1, "dog": 0, "images": 1, "background": 0},
    }


def test_names_mapping_and_relative_path(tiny_yolo: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "configs" / "det.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text("path: ../det\ntrain: images/train\nval: images/val\nnames: {1: dog, 0: cat}\n")
    spec = load_dataset(elsewhere)
    assert spec.root == tiny_yolo.parent and spec.labels == ["cat", "dog"]
    assert spec.version == load_dataset(tiny_yolo).version  # same files and meaning, another yaml


def test_non_ascii_yolo_names(tiny_yolo: Path) -> None:
    tiny_yolo.write_text("train: images/train\nval: images/val\nnames: [čaj, 猫]\n", encoding="utf-8")
    spec = load_dataset(tiny_yolo)
    assert spec.label_map == {0: "čaj", 1: "猫"} and spec.stats["val"]["čaj"] == 1
    assert "猫" in spec.to_json()


# --- versions ---------------------------------------------


def test_version_is_stable_across_copies_and_changes_with_a_byte(tiny_imagefolder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_imagefolder, copy)
    version = load_dataset(tiny_imagefolder).version
    assert load_dataset(copy).version == version == fingerprint(copy)
    image = copy / "val" / "cat" / "0.png"
    Image.new("RGB", (8, 8), 129).save(image)  # one pixel value differs, so does the file
    assert load_dataset(copy).version != version
    assert fingerprint(copy) == load_dataset(copy).version


def test_version_changes_with_a_rename(tiny_imagefolder: Path) -> None:
    version = fingerprint(tiny_imagefolder)
    (tiny_imagefolder / "val" / "cat" / "0.png").rename(tiny_imagefolder / "val" / "cat" / "1.png")
    assert fingerprint(tiny_imagefolder) != version


def test_yolo_version_ignores_where_it_lives_but_not_its_labels(tiny_yolo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "moved"
    shutil.copytree(tiny_yolo.parent, copy)
    (copy / "data.yaml").write_text(f"path: {copy}\n" + tiny_yolo.read_text())
    assert fingerprint(copy) == fingerprint(tiny_yolo) == load_dataset(copy).version
    (copy / "labels" / "val" / "c.txt").write_text("0 0.5 0.5 0.25 0.26\n")
    assert fingerprint(copy) != fingerprint(tiny_yolo)


# --- generated demo datasets ------------------------------


def test_synthetic_classification_is_deterministic_and_valid(tmp_path: Path) -> None:
    sizes = dict(train_per_class=4, val_per_class=2, test_per_class=1, image_size=32)
    first = load_dataset(make_shapes_classification(tmp_path / "a", seed=3, **sizes))
    second = load_dataset(make_shapes_classification(tmp_path / "b", seed=3, **sizes))
    other_seed = load_dataset(make_shapes_classification(tmp_path / "c", seed=4, **sizes))
    assert first.version == second.version != other_seed.version
    assert first.labels == ["circle", "square", "triangle"]
    assert first.stats == {
        "train": dict.fromkeys(first.labels, 4),
        "val": dict.fromkeys(first.labels, 2),
        "test": dict.fromkeys(first.labels, 1),
    }
    with Image.open(tmp_path / "a" / "train" / "circle" / "0000.png") as image:
        assert (image.mode, image.size) == ("RGB", (32, 32))


def test_synthetic_detection_is_deterministic_and_valid(tmp_path: Path) -> None:
    sizes = dict(train_images=20, val_images=4, image_size=64, classes=("circle", "triangle"))
    first = load_dataset(make_shapes_detection(tmp_path / "a", seed=1, **sizes))
    second = load_dataset(make_shapes_detection(tmp_path / "b", seed=1, **sizes))
    assert first.version == second.version
    assert first.data_yaml == (tmp_path / "a" / "data.yaml").resolve()
    assert first.label_map == {0: "circle", 1: "triangle"}
    train = first.stats["train"]
    assert (train["images"], train["background"]) == (20, 2)
    assert 18 <= train["circle"] + train["triangle"] <= 18 * 3
    assert first.stats["val"]["images"] == 4


def test_synthetic_cli_makes_both_default_datasets_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    synthetic_main([str(tmp_path)])
    printed = capsys.readouterr().out.split()
    assert printed == [
        str((tmp_path / "shapes-cls").resolve()),
        str((tmp_path / "shapes-det" / "data.yaml").resolve()),
    ]
    cls, det = load_dataset(printed[0]), load_dataset(printed[1])
    assert cls.stats["train"] == {"circle": 300, "square": 300, "triangle": 300}  # the demos' sizes
    assert (cls.stats["val"]["square"], cls.stats["test"]["square"]) == (50, 20)
    assert (det.stats["train"]["images"], det.stats["val"]["images"]) == (1000, 100)
    stamp = (tmp_path / "shapes-det" / "data.yaml").stat().st_mtime_ns
    synthetic_main([str(tmp_path)])  # both exist: skipped
    assert (tmp_path / "shapes-det" / "data.yaml").stat().st_mtime_ns == stamp


def test_bytes_in_no_image_format_are_named_so_even_with_ultralytics_heif_opener(tmp_path):
    """Importing Ultralytics registers a HEIF opener whose module (pi_heif) may be missing: Pillow then raises
    ModuleNotFoundError instead of UnidentifiedImageError for bytes in no format. The defect reads the same."""
    import ultralytics.data.utils  # noqa: F401  (registers the opener)

    from trainers.data.images import inspect_image

    path = tmp_path / "val" / "cat" / "0.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a png")
    defect, _ = inspect_image(path, tmp_path)
    assert defect == (
        "val/cat/0.png: cannot be decoded as an image (its bytes are in no image format Pillow reads); re-export it "
        "or remove it"
    )
