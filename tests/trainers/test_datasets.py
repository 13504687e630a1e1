"""The dataset layer: format detection, every defect rule, the valid oddities, versions, demo datasets."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from trainers.data.errors import DatasetError
from trainers.data.fingerprint import fingerprint
from trainers.data.spec import DatasetSpec
from trainers.data.synthetic import main as synthetic_main
from trainers.data.synthetic import make_shapes_classification, make_shapes_detection
from trainers.data.validate import load_dataset


def defects_of(path: Path) -> list[str]:
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    assert str(caught.value).startswith(f"dataset {caught.value.root} is not valid")
    return caught.value.defects


def only_defect(path: Path, *parts: str) -> str:
    """The single defect naming all of parts (the file and the rule)."""
    defects = defects_of(path)
    matching = [d for d in defects if all(p in d for p in parts)]
    assert len(matching) == 1, f"no single defect with {parts} in {defects}"
    return matching[0]


# --- format detection -------------------------------------


def test_unknown_layout_explains_both_formats(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    defect = only_defect(tmp_path / "stuff", "ImageFolder", "YOLO", "data.yaml")
    assert "train/" in defect


def test_missing_path_is_a_dataset_error(tmp_path: Path) -> None:
    only_defect(tmp_path / "nowhere", "does not exist")


def test_yolo_is_found_from_its_directory_or_its_yaml(tiny_yolo: Path) -> None:
    assert load_dataset(tiny_yolo.parent) == load_dataset(tiny_yolo)
    assert load_dataset(str(tiny_yolo)).format == "yolo"


# --- imagefolder rules ------------------------------------


def test_imagefolder_loads_with_sorted_label_map(tiny_imagefolder: Path) -> None:
    spec = load_dataset(tiny_imagefolder)
    assert spec.format == "imagefolder"
    assert spec.label_map == {0: "cat", 1: "dog"}
    assert spec.splits == {"train": tiny_imagefolder / "train", "val": tiny_imagefolder / "val"}
    assert spec.stats == {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}}
    assert spec.version.startswith("sha256:") and len(spec.version) == 7 + 64
    assert spec.data_yaml is None
    assert DatasetSpec.from_json(spec.to_json()) == spec


def test_missing_val_split(tiny_imagefolder: Path) -> None:
    shutil.rmtree(tiny_imagefolder / "val")
    only_defect(tiny_imagefolder, "val/", "missing split folder")


def test_missing_train_split(tiny_imagefolder: Path) -> None:
    shutil.rmtree(tiny_imagefolder / "train")
    only_defect(tiny_imagefolder, "train/", "missing split folder")


def test_split_without_class_folders(tiny_imagefolder: Path) -> None:
    shutil.rmtree(tiny_imagefolder / "val")
    (tiny_imagefolder / "val").mkdir()
    only_defect(tiny_imagefolder, "val/", "no class folders")


def test_class_missing_from_a_split_names_both_splits(tiny_imagefolder: Path) -> None:
    shutil.rmtree(tiny_imagefolder / "val" / "dog")
    defect = only_defect(tiny_imagefolder, "val/", "'dog' is missing")
    assert "train/" in defect


def test_empty_class_folder(tiny_imagefolder: Path) -> None:
    (tiny_imagefolder / "train" / "bird").mkdir()
    (tiny_imagefolder / "val" / "bird").mkdir()
    only_defect(tiny_imagefolder, "train/bird/", "empty class folder")
    only_defect(tiny_imagefolder, "val/bird/", "empty class folder")


def test_class_names_differing_between_splits(tiny_imagefolder: Path) -> None:
    (tiny_imagefolder / "val" / "dog").rename(tiny_imagefolder / "val" / "Dog")
    defect = only_defect(tiny_imagefolder, "val/Dog/", "class name differs between splits", "'dog'")
    assert "train/ has 'dog'" in defect and "rename it to val/dog/" in defect


def test_class_names_differing_in_unicode_normalisation(tmp_path: Path, make_image) -> None:
    nfc, nfd = unicodedata.normalize("NFC", "čaj"), unicodedata.normalize("NFD", "čaj")  # macOS writes NFD
    for split, name in (("train", nfc), ("val", nfd), ("test", nfc)):
        make_image(tmp_path / split / name / "0.png")
    only_defect(tmp_path, f"val/{nfd}/", "class name differs between splits", f"rename it to val/{nfc}/")


def test_non_image_file_in_class_folder(tiny_imagefolder: Path) -> None:
    (tiny_imagefolder / "train" / "cat" / "notes.txt").write_text("hi")
    only_defect(tiny_imagefolder, "train/cat/notes.txt", "not an image")


def test_file_outside_class_folders(tiny_imagefolder: Path, make_image) -> None:
    make_image(tiny_imagefolder / "train" / "stray.png")
    only_defect(tiny_imagefolder, "train/stray.png", "outside any class folder")


def test_every_defect_is_reported_at_once(tiny_imagefolder: Path) -> None:
    (tiny_imagefolder / "train" / "cat" / "a.csv").write_text("x")
    (tiny_imagefolder / "val" / "dog" / "0.png").write_bytes(b"")
    (tiny_imagefolder / "train" / "fish").mkdir()
    defects = defects_of(tiny_imagefolder)
    assert len(defects) >= 4  # csv, zero-byte, empty fish/, fish missing from val
    assert any("train/cat/a.csv" in d for d in defects)
    assert any("val/dog/0.png" in d for d in defects)


def test_nested_folders_and_hidden_files(tiny_imagefolder: Path, make_image) -> None:
    make_image(tiny_imagefolder / "train" / "cat" / "batch1" / "deep" / "x.JPG")
    (tiny_imagefolder / "train" / "cat" / ".DS_Store").write_bytes(b"\0junk")
    (tiny_imagefolder / "train" / ".ipynb_checkpoints").mkdir()
    spec = load_dataset(tiny_imagefolder)
    assert spec.stats["train"]["cat"] == 3
    assert spec.labels == ["cat", "dog"]


def test_non_ascii_class_names(tmp_path: Path, make_image) -> None:
    for split in ("train", "val"):
        for name in ("čaj", "猫"):
            make_image(tmp_path / split / name / "ü.png")
    spec = load_dataset(tmp_path)
    assert spec.labels == ["čaj", "猫"]
    assert "čaj" in spec.to_json() and "猫" in spec.to_json()
    assert json.loads(spec.to_json())["stats"]["val"] == {"čaj": 1, "猫": 1}
    assert DatasetSpec.from_json(spec.to_json()) == spec


def test_image_modes_are_all_valid(tiny_imagefolder: Path, make_image) -> None:
    cat = tiny_imagefolder / "train" / "cat"
    make_image(cat / "gray.png", mode="L")
    make_image(cat / "rgba.png", mode="RGBA", colour=(1, 2, 3, 4))
    make_image(cat / "palette.gif", mode="P", colour=3)
    make_image(cat / "deep.png", mode="I;16", colour=40000)
    make_image(cat / "cmyk.jpg", mode="CMYK", colour=(1, 2, 3, 4))
    make_image(cat / "gray.tiff", mode="L")
    assert load_dataset(tiny_imagefolder).stats["train"]["cat"] == 8


# --- image rules (both formats) ---------------------------


def test_zero_byte_image(tiny_imagefolder: Path) -> None:
    (tiny_imagefolder / "train" / "dog" / "0.png").write_bytes(b"")
    only_defect(tiny_imagefolder, "train/dog/0.png", "empty file (0 bytes)")


def test_truncated_image(tiny_imagefolder: Path) -> None:
    path = tiny_imagefolder / "train" / "dog" / "big.png"
    Image.effect_noise((64, 64), 64).save(path)  # noise compresses badly, so half the file is missing pixels
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    only_defect(tiny_imagefolder, "train/dog/big.png", "cannot be decoded")


def test_garbage_with_an_image_suffix(tiny_yolo: Path) -> None:
    (tiny_yolo.parent / "images" / "val" / "c.png").write_bytes(b"this is not a png")
    only_defect(tiny_yolo, "images/val/c.png", "cannot be decoded")


# --- yolo rules -------------------------------------------


def test_yolo_loads_with_stats(tiny_yolo: Path) -> None:
    spec = load_dataset(tiny_yolo)
    root = tiny_yolo.parent
    assert (spec.root, spec.data_yaml, spec.labels) == (root, tiny_yolo, ["cat", "dog"])
    assert spec.splits == {"train": root / "images" / "train", "val": root / "images" / "val"}
    assert spec.stats == {
        "train": {"cat": 1, "dog": 1, "images": 2, "background": 0},
        "val": {"cat": 1, "dog": 0, "images": 1, "background": 0},
    }


def test_yaml_that_does_not_parse(tiny_yolo: Path) -> None:
    tiny_yolo.write_text("train: [unclosed\n")
    only_defect(tiny_yolo, "data.yaml", "cannot be read as YAML")


def test_yaml_missing_keys(tiny_yolo: Path) -> None:
    tiny_yolo.write_text("train: images/train\n")
    only_defect(tiny_yolo, "data.yaml", "missing key(s) val, names")


def test_names_mapping_must_be_contiguous(tiny_yolo: Path) -> None:
    tiny_yolo.write_text("train: images/train\nval: images/val\nnames: {0: cat, 2: dog}\n")
    only_defect(tiny_yolo, "data.yaml", "names", "0..1 with no gaps")


def test_names_mapping_and_relative_path(tiny_yolo: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "configs" / "det.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text("path: ../det\ntrain: images/train\nval: images/val\nnames: {1: dog, 0: cat}\n")
    spec = load_dataset(elsewhere)
    assert spec.root == tiny_yolo.parent and spec.labels == ["cat", "dog"]
    assert spec.version == load_dataset(tiny_yolo).version  # same files and meaning, another yaml


def test_split_dir_that_does_not_exist(tiny_yolo: Path) -> None:
    tiny_yolo.write_text("train: images/train\nval: images/valid\nnames: [cat, dog]\n")
    only_defect(tiny_yolo, "data.yaml", "val: 'images/valid' is not a directory")


def test_malformed_label_row_names_file_and_line(tiny_yolo: Path) -> None:
    (tiny_yolo.parent / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n1 a b c d\n")
    only_defect(tiny_yolo, "labels/train/a.txt:2", "malformed row", "cls cx cy w h")
    only_defect(tiny_yolo, "labels/train/a.txt:3", "malformed row")


def test_class_id_out_of_range(tiny_yolo: Path) -> None:
    (tiny_yolo.parent / "labels" / "train" / "b.txt").write_text("2 0.5 0.5 0.2 0.2\n0.5 0.5 0.5 0.2 0.2\n")
    only_defect(tiny_yolo, "labels/train/b.txt:1", "class id 2 is not an integer in [0, 2)")
    only_defect(tiny_yolo, "labels/train/b.txt:2", "class id 0.5")


def test_coordinates_outside_unit_range(tiny_yolo: Path) -> None:
    (tiny_yolo.parent / "labels" / "val" / "c.txt").write_text("0 320 240 50 50\n")
    only_defect(tiny_yolo, "labels/val/c.txt:1", "not all in [0, 1]")


def test_label_file_without_image(tiny_yolo: Path) -> None:
    (tiny_yolo.parent / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    only_defect(tiny_yolo, "labels/train/ghost.txt", "no matching image")


def test_split_with_no_label_files_at_all(tiny_yolo: Path) -> None:
    shutil.rmtree(tiny_yolo.parent / "labels" / "val")
    only_defect(tiny_yolo, "labels/val/", "no label file for any of the 1 val images")


def test_some_missing_label_files_are_background(tiny_yolo: Path, make_image) -> None:
    make_image(tiny_yolo.parent / "images" / "train" / "sky.jpg")  # no label file: a background image
    (tiny_yolo.parent / "labels" / "val" / "c.txt").write_text("")  # empty: a background image too
    spec = load_dataset(tiny_yolo)
    assert spec.stats["train"] == {"cat": 1, "dog": 1, "images": 3, "background": 1}
    assert spec.stats["val"] == {"cat": 0, "dog": 0, "images": 1, "background": 1}


def test_crlf_and_trailing_blank_lines(tiny_yolo: Path) -> None:
    label = tiny_yolo.parent / "labels" / "train" / "a.txt"
    label.write_bytes(b"0 0.5 0.5 0.2 0.2\r\n1 0.1 0.1 0.1 0.1\r\n\r\n\r\n")
    assert load_dataset(tiny_yolo).stats["train"]["dog"] == 2


def test_test_split_is_validated_when_present(tiny_yolo: Path, make_image) -> None:
    root = tiny_yolo.parent
    make_image(root / "images" / "test" / "t.png")
    (root / "labels" / "test").mkdir()
    (root / "labels" / "test" / "t.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    tiny_yolo.write_text(tiny_yolo.read_text() + "test: images/test\n")
    only_defect(tiny_yolo, "labels/test/t.txt:1", "class id 7")


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
    assert cls.stats["train"] == {"circle": 60, "square": 60, "triangle": 60}
    assert cls.stats["val"]["square"] == cls.stats["test"]["square"] == 20
    assert (det.stats["train"]["images"], det.stats["val"]["images"]) == (64, 16)
    stamp = (tmp_path / "shapes-det" / "data.yaml").stat().st_mtime_ns
    synthetic_main([str(tmp_path)])  # both exist: skipped
    assert (tmp_path / "shapes-det" / "data.yaml").stat().st_mtime_ns == stamp
