"""The bad-input catalog: what Trainyard refuses before it spends any compute, and the odd inputs it accepts.

Groups: datasets (ImageFolder, YOLO, either), request fields, dataset URIs, compute profiles, environment settings,
and a few cases through the real train flow. A refused case is one clear message naming the thing (file, field,
setting), the rule it breaks and the fix, raised as a plain error (or printed as one `error:` line by a command),
never a traceback. Each case calls the real validation directly: the plain function under the flow's
prepare_dataset task, the request model, the profile validation and CLI, Settings.from_env with an env of its own.
Every case's id is the rule, in a few words.
"""

from __future__ import annotations

import math
import os
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter
from prefect_logs import run_logs
from pydantic import ValidationError

from flows.request import TrainRequest
from flows.train import train
from infra.compute.profiles import ProfileError, load_seed, validate_profile
from infra.compute.profiles import main as profiles_cli
from infra.settings import ArtifactStore, Database, Settings, SettingsError
from infra.stack import services as trainyard_stack
from infra.storage import StorageError
from tasks.dataset import checked_dataset
from tasks.remote_storage import sync_dataset_uri
from tasks.tracking import runs_of_flow_run
from trainers.data.errors import DatasetError

PASSWORD = "ty-pg-password-0b7e-never-log-me"  # in bad database URLs: never in the message


def cases(*rows: tuple) -> list:
    """Parameters from rows that start with their id."""
    return [pytest.param(*values, id=case_id) for case_id, *values in rows]


def refusal(call: Callable[[], object], error: type[Exception]) -> Exception:
    """The error `call` raises: of that type, with a message and no traceback in it."""
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    assert message and "Traceback" not in message and 'File "' not in message, message
    return caught.value


def says(message: str, words: list[str]) -> None:
    missing = [word for word in words if word not in message]
    assert not missing, f"{missing} not in the message:\n{message}"


# --- Datasets ---------------------------------------------------------------------------------------------------
# Every defect of a dataset comes in one DatasetError ("dataset <root> is not valid ...; nothing was trained"),
# one line per defect, each naming the file relative to the root, the rule and the fix.


def dataset_defect(path: Path, words: list[str], expected_format: str = "imagefolder") -> str:
    """The one defect line that holds all the words, from the error that refuses the dataset."""
    error = refusal(lambda: checked_dataset(str(path), expected_format), DatasetError)
    says(str(error), [f"dataset {error.root} is not valid", "nothing was trained"])
    matching = [defect for defect in error.defects if all(word in defect for word in words)]
    assert len(matching) == 1, f"not one defect with {words} in {error.defects}"
    return matching[0]


def remove(*parts: str):
    return lambda root, make_image: shutil.rmtree(root.joinpath(*parts))


def add_image(*parts: str):
    return lambda root, make_image: make_image(root.joinpath(*parts))


def write(relative: str, content: bytes | str):
    def spoil(root: Path, make_image) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return spoil


def empty_val_split(root: Path, make_image) -> None:
    shutil.rmtree(root / "val")
    (root / "val").mkdir()


def one_class(root: Path, make_image) -> None:
    shutil.rmtree(root / "train" / "dog")
    shutil.rmtree(root / "val" / "dog")


def second_class_without_images(root: Path, make_image) -> None:
    for image in root.glob("*/dog/*.png"):
        image.unlink()


def empty_class_folder(root: Path, make_image) -> None:
    (root / "train" / "bird").mkdir()
    (root / "val" / "bird").mkdir()


def class_case_differs(root: Path, make_image) -> None:
    (root / "val" / "dog").rename(root / "val" / "Dog")


NFC, NFD = unicodedata.normalize("NFC", "čaj"), unicodedata.normalize("NFD", "čaj")  # macOS writes NFD


def class_normalisation_differs(root: Path, make_image) -> None:
    make_image(root / "train" / NFC / "0.png")
    make_image(root / "val" / NFD / "0.png")


def truncated_image(root: Path, make_image) -> None:
    path = root / "train" / "dog" / "big.png"
    Image.effect_noise((64, 64), 64).save(path)  # noise compresses badly, so half the file is missing pixels
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def broken_link(root: Path, make_image) -> None:
    os.symlink(root / "nowhere.png", root / "val" / "cat" / "gone.png")


@pytest.mark.parametrize(
    ("spoil", "words"),
    cases(
        ("val-split-required", remove("val"), ["val/", "missing split folder", "needs train/ and val/"]),
        ("train-split-required", remove("train"), ["train/", "missing split folder"]),
        ("split-needs-class-folders", empty_val_split, ["val/", "no class folders", "images in val/<class name>/"]),
        (
            "classifier-needs-two-classes",
            one_class,
            ["train/, val/", "one class only ('cat')", "a classifier needs at least two classes", "another class"],
        ),
        ("classifier-needs-two-classes-with-images", second_class_without_images, ["one class only ('cat')"]),
        ("val-needs-every-train-class", remove("val", "dog"), ["val/", "'dog' is missing (it is in train/)"]),
        ("train-needs-every-val-class", add_image("val", "bird", "0.png"), ["train/", "add train/bird/ with images"]),
        ("class-folder-needs-images", empty_class_folder, ["train/bird/", "empty class folder", "add images or"]),
        ("class-names-match-across-splits", class_case_differs, ["val/Dog/", "differs", "rename it to val/dog/"]),
        (
            "class-names-match-in-unicode-normalisation",
            class_normalisation_differs,
            [f"val/{NFD}/", "Unicode normalisation", f"rename it to val/{NFC}/"],
        ),
        ("class-folder-holds-only-images", write("train/cat/a.txt", "hi"), ["train/cat/a.txt", "not an image"]),
        ("images-sit-in-class-folders", add_image("train", "x.png"), ["train/x.png", "outside any class folder"]),
        ("image-not-empty", write("train/dog/0.png", b""), ["train/dog/0.png", "empty file (0 bytes)", "re-export"]),
        ("image-decodes-fully", truncated_image, ["train/dog/big.png", "cannot be decoded", "re-export it or remove"]),
        (
            "image-bytes-are-an-image",
            write("val/cat/0.png", b"this is not a png"),
            ["val/cat/0.png", "cannot be decoded", "no image format", "re-export it or remove it"],
        ),
        ("image-readable", broken_link, ["val/cat/gone.png", "cannot be read", "No such file", "or remove it"]),
    ),
)
def test_imagefolder_defect_is_refused(tiny_imagefolder, make_image, spoil, words):
    spoil(tiny_imagefolder, make_image)
    defect = dataset_defect(tiny_imagefolder, words)
    assert "BytesIO" not in defect and "0x" not in defect  # Pillow's own text names a buffer, not the file


def test_every_defect_of_a_dataset_is_in_the_one_error(tiny_imagefolder):
    (tiny_imagefolder / "train" / "cat" / "a.csv").write_text("x")
    (tiny_imagefolder / "val" / "dog" / "0.png").write_bytes(b"")
    (tiny_imagefolder / "train" / "fish").mkdir()
    error = refusal(lambda: checked_dataset(str(tiny_imagefolder), "imagefolder"), DatasetError)
    assert len(error.defects) >= 4  # csv, zero-byte, empty fish/, fish missing from val
    says(str(error), ["train/cat/a.csv", "val/dog/0.png", "train/fish/", "val/: class 'fish' is missing"])


def yaml_says(text: str):
    return lambda data_yaml, make_image: data_yaml.write_text(text, encoding="utf-8")


def label(relative: str, content: bytes | str):
    return lambda data_yaml, make_image: write(relative, content)(data_yaml.parent, make_image)


def no_val_labels(data_yaml: Path, make_image) -> None:
    shutil.rmtree(data_yaml.parent / "labels" / "val")


def bad_test_split(data_yaml: Path, make_image) -> None:
    make_image(data_yaml.parent / "images" / "test" / "t.png")
    write("labels/test/t.txt", "7 0.5 0.5 0.1 0.1\n")(data_yaml.parent, make_image)
    data_yaml.write_text(data_yaml.read_text() + "test: images/test\n")


SPLITS = "train: images/train\nval: images/val\n"


@pytest.mark.parametrize(
    ("spoil", "words"),
    cases(
        ("yaml-parses", yaml_says("train: [unclosed\n"), ["data.yaml", "cannot be read as YAML"]),
        ("yaml-is-a-mapping", yaml_says("- a\n"), ["data.yaml", "must be a YAML mapping with keys train, val"]),
        ("yaml-has-train-val-names", yaml_says("train: images/train\n"), ["missing key(s) val, names", "needs"]),
        ("names-lists-a-class", yaml_says(SPLITS + "names: []\n"), ["names: lists no class", "e.g. names: ["]),
        ("names-ids-contiguous", yaml_says(SPLITS + "names: {0: a, 2: b}\n"), ["names", "0..1 with no gaps"]),
        ("names-unique", yaml_says(SPLITS + "names: [cat, cat]\n"), ["duplicate class name(s) ['cat']", "own name"]),
        ("names-are-strings", yaml_says(SPLITS + "names: [1, dog]\n"), ["names[0]: 1 is not a class name", "quote"]),
        ("nc-matches-names", yaml_says(SPLITS + "names: [a, b]\nnc: 3\n"), ["nc: 3 does not match", "fix nc or"]),
        (
            "path-is-a-directory",
            yaml_says("path: nowhere\n" + SPLITS + "names: [cat, dog]\n"),
            ["path: 'nowhere' is not a directory", "point it at the dataset folder"],
        ),
        (
            "split-folder-exists",
            yaml_says("train: images/train\nval: images/valid\nnames: [cat, dog]\n"),
            ["val: 'images/valid' is not a directory", "point it at the val images folder"],
        ),
        ("images-folder-only-images", label("images/train/a.csv", "x"), ["images/train/a.csv", "not an image"]),
        ("image-bytes-are-an-image", label("images/val/c.png", b"not a png"), ["images/val/c.png", "cannot be"]),
        (
            "label-row-has-5-numbers",
            label("labels/train/a.txt", "0 0.5 0.5 0.2\n"),
            ["labels/train/a.txt:1", "malformed row", "5 numbers 'cls cx cy w h'"],
        ),
        ("label-row-is-numbers", label("labels/train/a.txt", "1 a b c d\n"), ["a.txt:1", "malformed row"]),
        (
            "class-id-in-range",
            label("labels/train/b.txt", "2 0.5 0.5 0.2 0.2\n"),
            ["labels/train/b.txt:1", "class id 2 is not an integer in [0, 2)", "data.yaml names 2 classes"],
        ),
        ("class-id-is-an-integer", label("labels/train/b.txt", "0.5 0.5 0.5 0.2 0.2\n"), ["b.txt:1", "class id 0.5"]),
        (
            "box-is-normalised",
            label("labels/val/c.txt", "0 320 240 50 50\n"),
            ["labels/val/c.txt:1", "not all in [0, 1]", "divide x and w by the image width"],
        ),
        (
            "label-file-has-an-image",
            label("labels/train/ghost.txt", "0 0.5 0.5 0.1 0.1\n"),
            ["labels/train/ghost.txt", "no matching image", "add the image or remove the label file"],
        ),
        ("split-has-labels", no_val_labels, ["labels/val/", "no label file for any of the 1 val images"]),
        (
            "label-file-is-utf8",
            label("labels/train/a.txt", b"\xff\xfe0 0.5 0.5 0.1 0.1"),
            ["labels/train/a.txt", "cannot be read as UTF-8 text", "save it as UTF-8"],
        ),
        ("test-split-checked-when-given", bad_test_split, ["labels/test/t.txt:1", "class id 7"]),
    ),
)
def test_yolo_defect_is_refused(tiny_yolo, make_image, spoil, words):
    spoil(tiny_yolo, make_image)
    dataset_defect(tiny_yolo, words, expected_format="yolo")


def a_zip_file(tmp_path: Path, imagefolder: Path, yolo: Path) -> Path:
    (tmp_path / "shapes.zip").write_bytes(b"PK\x03\x04")
    return tmp_path / "shapes.zip"


def neither_layout(tmp_path: Path, imagefolder: Path, yolo: Path) -> Path:
    (tmp_path / "stuff").mkdir()
    return tmp_path / "stuff"


@pytest.mark.parametrize(
    ("given", "expected_format", "words"),
    cases(
        ("dataset-exists", lambda tmp, _, __: tmp / "nowhere", "imagefolder", ["does not exist", "ImageFolder"]),
        ("dataset-is-a-folder-or-yaml", a_zip_file, "imagefolder", ["shapes.zip: is a file, not a dataset"]),
        ("dataset-has-a-known-layout", neither_layout, "imagefolder", ["no train/ and val/ folders", "data.yaml"]),
        (
            "classifier-takes-imagefolder",
            lambda tmp, imagefolder, yolo: yolo,
            "imagefolder",
            ["this trainer needs an ImageFolder directory", "is a YOLO data.yaml", "with trainer yolo"],
        ),
        (
            "detector-takes-yolo",
            lambda tmp, imagefolder, yolo: imagefolder,
            "yolo",
            ["this trainer needs a YOLO data.yaml", "is an ImageFolder directory", "with trainer torch or hf-image"],
        ),
    ),
)
def test_a_path_that_is_not_the_dataset_the_trainer_takes_is_refused(
    tmp_path, tiny_imagefolder, tiny_yolo, given, expected_format, words
):
    dataset_defect(given(tmp_path, tiny_imagefolder, tiny_yolo), words, expected_format)


# Accepted: valid datasets that look odd.


def all_image_modes(root: Path, make_image) -> None:
    cat = root / "train" / "cat"
    make_image(cat / "gray.png", mode="L")
    make_image(cat / "rgba.png", mode="RGBA", colour=(1, 2, 3, 4))
    make_image(cat / "palette.gif", mode="P", colour=3)
    make_image(cat / "deep.png", mode="I;16", colour=40000)
    make_image(cat / "cmyk.jpg", mode="CMYK", colour=(1, 2, 3, 4))
    make_image(cat / "gray.tiff", mode="L")


def nested_and_hidden(root: Path, make_image) -> None:
    make_image(root / "train" / "cat" / "batch1" / "deep" / "x.JPG")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0junk")
    (root / "train" / "cat" / "Thumbs.db").write_bytes(b"\0junk")
    (root / "train" / ".ipynb_checkpoints").mkdir()


def renamed_class(new_name: str):
    def rename(root: Path, make_image) -> None:
        for split in ("train", "val"):
            (root / split / "cat").rename(root / split / new_name)

    return rename


def jpeg_named_png(root: Path, make_image) -> None:
    Image.new("RGB", (8, 8), 7).save(root / "train" / "cat" / "photo.png", format="JPEG")


@pytest.mark.parametrize(
    ("change", "labels", "train_counts"),
    cases(
        ("two-classes-are-enough", lambda root, make_image: None, ["cat", "dog"], {"cat": 2, "dog": 2}),
        ("grayscale-rgba-palette-16bit-cmyk", all_image_modes, ["cat", "dog"], {"cat": 8, "dog": 2}),
        ("nested-folders-and-hidden-files", nested_and_hidden, ["cat", "dog"], {"cat": 3, "dog": 2}),
        ("class-name-with-spaces", renamed_class("tabby cat"), ["dog", "tabby cat"], {"dog": 2, "tabby cat": 2}),
        ("image-format-told-by-content", jpeg_named_png, ["cat", "dog"], {"cat": 3, "dog": 2}),
    ),
)
def test_odd_but_valid_imagefolder_is_accepted(tiny_imagefolder, make_image, change, labels, train_counts):
    change(tiny_imagefolder, make_image)
    dataset = checked_dataset(str(tiny_imagefolder), "imagefolder")
    assert dataset.labels == labels and dataset.stats["train"] == train_counts


def background_images(data_yaml: Path, make_image) -> None:
    make_image(data_yaml.parent / "images" / "train" / "sky.jpg")  # no label file: a background image
    make_image(data_yaml.parent / "images" / "train" / "sea.jpg")
    (data_yaml.parent / "labels" / "train" / "sea.txt").write_text("")  # an empty one: a background image too


def crlf_labels(data_yaml: Path, make_image) -> None:
    (data_yaml.parent / "labels" / "train" / "a.txt").write_bytes(b"0 0.5 0.5 0.2 0.2\r\n1 0.1 0.1 0.1 0.1\r\n\r\n\r\n")


def one_detection_class(data_yaml: Path, make_image) -> None:
    data_yaml.write_text(SPLITS + "names: [cat]\n")
    (data_yaml.parent / "labels" / "train" / "b.txt").write_text("0 0.5 0.5 0.25 0.25\n")


@pytest.mark.parametrize(
    ("change", "labels", "train_stats"),
    cases(
        ("unlabelled-images-are-background", background_images, ["cat", "dog"], {"images": 4, "background": 2}),
        ("crlf-and-blank-lines-in-labels", crlf_labels, ["cat", "dog"], {"cat": 1, "dog": 2, "images": 2}),
        ("one-class-is-enough-to-detect", one_detection_class, ["cat"], {"cat": 2, "images": 2}),
    ),
)
def test_odd_but_valid_yolo_dataset_is_accepted(tiny_yolo, make_image, change, labels, train_stats):
    change(tiny_yolo, make_image)
    dataset = checked_dataset(str(tiny_yolo), "yolo")
    assert dataset.labels == labels and train_stats.items() <= dataset.stats["train"].items()


# --- Request fields ---------------------------------------------------------------------------------------------
# TrainRequest is the train flow's parameters: one error per bad field, naming the field (pydantic's location line,
# or the message itself), the rule, and what to write instead.


@pytest.mark.parametrize(
    ("fields", "words"),
    cases(
        ("epochs-at-least-1", {"epochs": 0}, ["epochs\n  Input should be greater than or equal to 1"]),
        ("epochs-whole", {"epochs": 2.5}, ["epochs\n  Input should be a valid integer"]),
        ("batch-size-at-least-1", {"batch_size": -1}, ["batch_size\n  Input should be greater than or equal to 1"]),
        ("learning-rate-positive", {"learning_rate": 0}, ["learning_rate\n  Input should be greater than 0"]),
        ("learning-rate-a-number", {"learning_rate": math.nan}, ["learning_rate\n  Input should be"]),
        ("image-size-at-least-16", {"image_size": 8}, ["image_size\n  Input should be greater than or equal to 16"]),
        (
            "probability-at-most-1",
            {"augmentations": {"horizontal_flip": 1.5}},
            ["augmentations.horizontal_flip\n  Input should be less than or equal to 1"],
        ),
        ("trainer-is-known", {"trainer": "xgboost"}, ["trainer\n  Input should be 'torch', 'hf-image' or 'yolo'"]),
        ("device-is-known", {"device": "tpu"}, ["device\n  Input should be 'auto', 'cpu' or 'cuda'"]),
        ("strategy-is-known", {"compute": {"strategy": "random"}}, ["compute.strategy\n  Input should be 'pre"]),
        ("deadline-positive", {"compute": {"start_deadline_s": 0}}, ["compute.start_deadline_s\n  Input should be"]),
        ("profiles-are-a-list", {"compute": {"profiles": "local"}}, ["compute.profiles\n  Input should be a valid"]),
        (
            "opset-at-least-11",
            {"export": {"opset": 9}},
            ["export.opset\n  Input should be greater than or equal to 11"],
        ),
        ("tag-values-are-text", {"tags": {"ticket": 42}}, ["tags.ticket\n  Input should be a valid string"]),
        ("no-unknown-fields", {"optimiser": "sgd"}, ["optimiser\n  Extra inputs are not permitted"]),
        ("no-unknown-nested-fields", {"augmentations": {"hflip": 1}}, ["augmentations.hflip\n  Extra inputs are not"]),
        ("alias-not-a-version", {"alias": "v3"}, ["alias 'v3' must be a name like 'candidate'", "not v<N>"]),
        (
            "model-known-to-torch",
            {"model": "resnet9000"},
            ["model 'resnet9000' is not known to the torch trainer", "use one of tiny-cnn"],
        ),
        (
            "model-known-to-hf-image",
            {"trainer": "hf-image", "model": "bert"},
            ["model 'bert' is not known to the hf-image trainer", "vit-tiny", "config.json"],
        ),
        (
            "loss-option-of-torch",
            {"loss": {"box_gain": 7.5}},
            ["loss option(s) box_gain are not taken by the torch trainer", "remove them from `loss`"],
        ),
        (
            "loss-option-of-yolo",
            {"trainer": "yolo", "model": "yolov8n.yaml", "loss": {"label_smoothing": 0.1}},
            ["label_smoothing are not taken by the yolo trainer", "it takes: box_gain, cls_gain, dfl_gain"],
        ),
        (
            "mosaic-is-yolo-only",
            {"augmentations": {"mosaic": 0.5}},
            ["augmentations.mosaic applies to detection (yolo) only", "set it to 0"],
        ),
        (
            "best-metric-of-the-trainer",
            {"checkpoint": {"best_metric": "f1"}},
            ["checkpoint.best_metric 'f1' is not a metric the torch trainer", "use one of val_accuracy"],
        ),
    ),
)
def test_bad_request_field_is_refused(tiny_imagefolder, fields, words):
    error = refusal(lambda: TrainRequest(dataset=str(tiny_imagefolder), **fields), ValidationError)
    assert error.error_count() == 1, str(error)
    says(str(error), words)


@pytest.mark.parametrize(
    ("dataset", "words"),
    cases(
        (
            "dataset-path-exists",
            "/no/such/dataset",
            ["dataset path '/no/such/dataset' does not exist", "make datasets"],
        ),
        ("dataset-given", "", ["dataset is empty", "give an ImageFolder directory"]),
    ),
)
def test_missing_dataset_is_refused_by_the_request(dataset, words):
    says(str(refusal(lambda: TrainRequest(dataset=dataset), ValidationError)), words)


@pytest.mark.parametrize(
    ("fields", "check"),
    cases(
        ("numbers-as-text-from-the-cli", {"epochs": "5"}, lambda request: request.epochs == 5),
        (
            "bounds-are-inclusive",
            {"epochs": 10_000, "learning_rate": 10, "augmentations": {"horizontal_flip": 1}},
            lambda request: request.epochs == 10_000,
        ),
        ("any-ultralytics-model-yaml", {"trainer": "yolo", "model": "yolo11s.yaml"}, lambda request: request.model),
        ("unset-option-is-no-option", {"loss": {"box_gain": None}}, lambda request: request.loss.box_gain is None),
    ),
)
def test_edge_of_the_request_is_accepted(tiny_imagefolder, fields, check):
    assert check(TrainRequest(dataset=str(tiny_imagefolder), **fields))


# --- Dataset URIs -----------------------------------------------------------------------------------------------
# A remote dataset's URI is checked for its shape when the request is made; its bucket when it is synced, which is
# still before compute is chosen.


@pytest.mark.parametrize(
    ("uri", "rule"),
    cases(
        ("bucket-given", "s3://", "'' is not an S3 bucket name"),
        ("bucket-given-before-prefix", "s3:///shapes", "'' is not an S3 bucket name"),
        ("two-slashes", "s3:/ml-data/shapes", "starts with s3:// (lowercase)"),
        ("scheme-lowercase", "S3://ml-data/shapes", "starts with s3:// (lowercase)"),
        ("only-s3", "gs://ml-data/shapes", "only s3:// URIs are synced, not gs://"),
        ("not-http", "https://example.com/shapes.zip", "only s3:// URIs are synced, not https://"),
        ("bucket-lowercase", "s3://ML-data/x", "'ML-data' is not an S3 bucket name"),
        ("bucket-3-characters-or-more", "s3://ab/x", "'ab' is not an S3 bucket name (3-63 characters"),
        ("bucket-no-double-dot", "s3://a..b/x", "no '..'"),
        ("bucket-not-an-ip", "s3://10.0.0.1/x", "not an IP address"),
        ("prefix-no-empty-segment", "s3://ml-data//x", "empty, '.' or '..' segment"),
        ("prefix-no-dotdot", "s3://ml-data/a/../b", "empty, '.' or '..' segment"),
        ("no-query", "s3://ml-data/x?versionId=3", "no '?', ';' or '#' part"),
    ),
)
def test_malformed_dataset_uri_is_refused(uri, rule):
    message = str(refusal(lambda: TrainRequest(dataset=uri), ValidationError))
    says(message, [f"dataset {uri!r} is not a dataset URI Trainyard can sync", rule, "Write s3://bucket/prefix"])


@pytest.mark.parametrize(
    ("uri", "kept"),
    cases(
        ("bucket-alone", "s3://ml-data", "s3://ml-data"),
        ("trailing-slash", "s3://ml-data/shapes/", "s3://ml-data/shapes"),
        ("yolo-data-yaml", "s3://ml-data/det/data.yaml", "s3://ml-data/det/data.yaml"),
    ),
)
def test_well_formed_dataset_uri_is_accepted(uri, kept):
    assert TrainRequest(dataset=uri).dataset == kept


def test_a_bucket_that_does_not_exist_is_refused_when_the_dataset_syncs(s3_env, tmp_path):
    error = refusal(lambda: sync_dataset_uri("s3://ty-no-such-bucket/shapes", tmp_path), StorageError)
    says(str(error), ["Bucket 'ty-no-such-bucket' does not exist", "Create it"])


# --- Compute profiles -------------------------------------------------------------------------------------------

PROFILE = {"kind": "process", "work_pool": "box-pool"}


@pytest.mark.parametrize(
    ("name", "fields", "words"),
    cases(
        ("name-starts-alphanumeric", "-box", PROFILE, ["profile name '-box' must be letters, digits"]),
        ("name-without-spaces", "my box", PROFILE, ["profile name 'my box'"]),
        ("work-pool-required", "box", {"kind": "process"}, ["field 'work_pool' is required", "Prefect work pool"]),
        ("no-unknown-fields", "box", PROFILE | {"gpus": 2}, ["unknown field(s) 'gpus'", "known: kind, work_pool"]),
        ("kind-is-known", "box", PROFILE | {"kind": "slurm"}, ["field 'kind' must be one of process, docker"]),
        ("gpu-count-not-negative", "box", PROFILE | {"gpu_count": -1}, ["field 'gpu_count' must be at least 0"]),
        ("gpu-count-whole", "box", PROFILE | {"gpu_count": 1.5}, ["field 'gpu_count' must be an integer"]),
        ("speed-positive", "box", PROFILE | {"speed": 0}, ["field 'speed' must be greater than 0"]),
        ("numbers-finite", "box", PROFILE | {"ram_gb": math.nan}, ["field 'ram_gb' must be a finite number"]),
        ("price-finite", "box", PROFILE | {"price_per_hour": math.inf}, ["'price_per_hour' must be a finite"]),
        ("deployment-flow-slash-name", "box", PROFILE | {"deployment": "x"}, ["'<flow name>/<deployment name>'"]),
        (
            "credential-blocks-a-list",
            "box",
            PROFILE | {"credential_blocks": "aws-credentials/x"},
            ["field 'credential_blocks' must be a list of block slugs"],
        ),
        ("enabled-is-a-bool", "box", PROFILE | {"enabled": "yes"}, ["field 'enabled' must be true or false"]),
        ("fields-are-a-mapping", "box", ["kind"], ["expected a mapping of fields"]),
    ),
)
def test_bad_profile_is_refused(name, fields, words):
    says(str(refusal(lambda: validate_profile(name, fields), ProfileError)), words)


def test_minimal_profile_is_accepted_with_its_default_deployment():
    profile = validate_profile("box", PROFILE | {"gpu_type": None, "credential_blocks": []})
    assert (profile.deployment, profile.gpu_count, profile.enabled) == ("train-step/box", 0, True)


@pytest.mark.parametrize(
    ("text", "words"),
    cases(
        ("seed-is-yaml", "profiles: {box: {kind: process\n", ["is not valid YAML at line 2, column 1", "fix it"]),
        ("seed-maps-names-to-fields", "profiles: [a, b]\n", ["must have a 'profiles:' mapping of name -> fields"]),
        ("seed-entry-complete", "profiles:\n  box:\n", ["profile 'box': field 'work_pool' is required"]),
    ),
)
def test_bad_profile_seed_is_refused(tmp_path, text, words):
    seed = tmp_path / "profiles.yaml"
    seed.write_text(text)
    message = str(refusal(lambda: load_seed(seed), ProfileError))
    assert "\n" not in message
    says(message, words)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`python -m infra.compute.profiles` in-process, on a seeded store of its own: (exit code, stderr)."""
    url = f"sqlite:///{tmp_path / 'trainyard.db'}"
    assert profiles_cli(["--url", url, "seed"]) == 0

    def run(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        code = profiles_cli(["--url", url, *argv])
        return code, capsys.readouterr().err

    return run


@pytest.mark.parametrize(
    ("argv", "message"),
    cases(
        ("show-a-known-profile", ["show", "nope"], "unknown profile 'nope'; known: local"),
        ("remove-a-known-profile", ["remove", "nope"], "unknown profile 'nope'"),
        ("set-a-known-profile", ["set", "nope", "speed=2"], "unknown profile 'nope'"),
        ("set-a-known-field", ["set", "local", "gpus=2"], "profile 'local': unknown field 'gpus'; known:"),
        ("speed-a-number", ["set", "local", "speed=fast"], "field 'speed' must be a number, got 'fast'"),
        ("speed-finite", ["set", "local", "speed=nan"], "field 'speed' must be a finite number"),
        ("max-concurrent-at-least-1", ["set", "local", "max_concurrent=0"], "'max_concurrent' must be at least 1"),
        ("enabled-bool", ["set", "local", "enabled=maybe"], "field 'enabled' must be true or false"),
        ("kind-known", ["set", "local", "kind=lambda"], "field 'kind' must be one of process, docker, kubernetes"),
        ("credential-block-slugs", ["set", "local", "credential_blocks=x"], "'credential_blocks' must be a list"),
        ("name-not-settable", ["set", "local", "name=other"], "field 'name' cannot be set; add a new profile"),
        ("assignment-has-equals", ["set", "local", "speed"], "expected field=value"),
        (
            "add-a-new-name",
            ["add", "local", "--kind", "process", "--work-pool", "p"],
            "profile 'local' already exists; change it with `set local field=value`",
        ),
        (
            "add-typed-values",
            ["add", "new", "--kind", "process", "--work-pool", "p", "--gpu-count", "x"],
            "field 'gpu_count' must be an integer",
        ),
        ("add-needs-a-pool", ["add", "new", "--kind", "process"], "--work-pool"),
        ("seed-file-exists", ["seed", "--file", "/nonexistent/profiles.yaml"], "cannot read the profile seed"),
        ("command-is-known", ["frobnicate"], "invalid choice"),
    ),
)
def test_profiles_cli_refuses_with_one_line_and_exit_2(cli, argv, message):
    code, err = cli(*argv)
    assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("url", "code", "words"),
    cases(
        ("store-url-is-a-url", "nonsense", 2, ["the platform store URL 'nonsense' cannot be used", "sqlite:///"]),
        (
            "store-reachable",
            "postgresql+psycopg://postgres:secret@127.0.0.1:1/none?connect_timeout=2",
            1,
            ["the platform store at", "failed"],
        ),
    ),
)
def test_a_store_that_cannot_be_used_is_one_line_without_its_password(capsys, url, code, words):
    assert profiles_cli(["--url", url, "list"]) == code
    err = capsys.readouterr().err
    says(err, words)
    assert err.count("\n") == 1 and "secret" not in err and "Traceback" not in err


# --- Environment settings ---------------------------------------------------------------------------------------
# Settings.from_env reads another host's environment as easily as this one's: each case is an env of its own.


@pytest.mark.parametrize(
    ("env", "words"),
    cases(
        (
            "port-is-a-number",
            {"TRAINYARD_PREFECT_PORT": "abc"},
            ["TRAINYARD_PREFECT_PORT='abc' is not a TCP port", "from 1 to 65535", "unset it for 4200"],
        ),
        ("port-at-most-65535", {"TRAINYARD_MLFLOW_PORT": "70000"}, ["TRAINYARD_MLFLOW_PORT='70000' is not a TCP"]),
        ("port-at-least-1", {"TRAINYARD_PREFECT_PORT": "0"}, ["TRAINYARD_PREFECT_PORT='0' is not a TCP port"]),
        (
            "servers-on-different-ports",
            {"TRAINYARD_PREFECT_PORT": "5000"},
            ["TRAINYARD_PREFECT_PORT and TRAINYARD_MLFLOW_PORT are both 5000", "a port of their own"],
        ),
        (
            "database-is-postgresql",
            {"TRAINYARD_DATABASE_URL": f"mysql://root:{PASSWORD}@db/ml"},
            ["TRAINYARD_DATABASE_URL must name a PostgreSQL server", "leave it unset"],
        ),
        (
            "database-has-a-host",
            {"TRAINYARD_DATABASE_URL": f"postgresql://root:{PASSWORD}@/ml"},
            ["TRAINYARD_DATABASE_URL has no host", "postgresql://user@host:5432/db"],
        ),
        (
            "database-port-in-range",
            {"TRAINYARD_DATABASE_URL": f"postgresql://root:{PASSWORD}@db:99999/ml"},
            ["TRAINYARD_DATABASE_URL has port 99999, not a TCP port", "5432"],
        ),
        (
            "database-options-as-libpq-variables",
            {"TRAINYARD_DATABASE_URL": f"postgresql://root:{PASSWORD}@db/ml?sslmode=require"},
            ["takes no query parameters", "PGSSLMODE"],
        ),
        (
            "database-name-lowercase",
            {"TRAINYARD_DATABASE_URL": f"postgresql://root:{PASSWORD}@db/ML-Runs"},
            ["database name 'ML-Runs'", "lowercase letters, digits and '_'"],
        ),
        (
            "database-url-is-a-url",
            {"TRAINYARD_DATABASE_URL": "not a url"},
            ["TRAINYARD_DATABASE_URL is not a database URL", "percent-encoded"],
        ),
        (
            "store-url-is-a-url",
            {"TRAINYARD_STORE_URL": f"::{PASSWORD}"},
            ["TRAINYARD_STORE_URL is not a database URL", "or unset it"],
        ),
        (
            "artifact-store-s3-or-local",
            {"TRAINYARD_ARTIFACT_STORE": "gs://bucket/x"},
            ["TRAINYARD_ARTIFACT_STORE must be s3://bucket/prefix", "or a local directory"],
        ),
        (
            "artifact-store-without-credentials",
            {"TRAINYARD_ARTIFACT_STORE": f"s3://key:{PASSWORD}@bucket/x"},
            ["TRAINYARD_ARTIFACT_STORE must be s3://bucket/prefix (no credentials"],
        ),
        (
            "artifact-store-names-a-bucket",
            {"TRAINYARD_ARTIFACT_STORE": "s3://"},
            ["TRAINYARD_ARTIFACT_STORE='s3://'", "not an S3 bucket name", "write s3://bucket/prefix"],
        ),
        (
            "artifact-store-bucket-name",
            {"TRAINYARD_ARTIFACT_STORE": "s3://Team_Bucket/x"},
            ["'Team_Bucket' is not an S3 bucket name", "write s3://bucket/prefix"],
        ),
        (
            "artifact-store-prefix-no-dotdot",
            {"TRAINYARD_ARTIFACT_STORE": "s3://bucket/a/../b"},
            ["TRAINYARD_ARTIFACT_STORE: a prefix cannot contain '..'"],
        ),
        (
            "direct-artifacts-need-s3",
            {"TRAINYARD_MLFLOW_ARTIFACTS": "direct"},
            ["TRAINYARD_MLFLOW_ARTIFACTS=direct needs TRAINYARD_ARTIFACT_STORE=s3://bucket/prefix"],
        ),
        (
            "direct-artifacts-need-s3-not-a-directory",
            {"TRAINYARD_MLFLOW_ARTIFACTS": "direct", "TRAINYARD_ARTIFACT_STORE": "/data/artifacts"},
            ["needs TRAINYARD_ARTIFACT_STORE=s3://"],
        ),
        (
            "artifact-mode-is-known",
            {"TRAINYARD_MLFLOW_ARTIFACTS": "s3", "TRAINYARD_ARTIFACT_STORE": "s3://ml-artifacts/p"},
            ["TRAINYARD_MLFLOW_ARTIFACTS='s3': write proxied", "or direct"],
        ),
    ),
)
def test_bad_setting_is_refused_without_secrets(tmp_path, env, words):
    error = refusal(lambda: Settings.from_env({"TRAINYARD_HOME": str(tmp_path)} | env), SettingsError)
    says(str(error), words)
    assert PASSWORD not in str(error)


@pytest.mark.parametrize(
    ("env", "check"),
    cases(
        ("empty-setting-is-unset", {"TRAINYARD_HOME": ""}, lambda settings: settings.home.name == ".trainyard"),
        ("port-with-spaces", {"TRAINYARD_PREFECT_PORT": " 4201 "}, lambda settings: settings.prefect_port == 4201),
        (
            "artifact-store-a-local-directory",
            {"TRAINYARD_ARTIFACT_STORE": "/data/artifacts"},
            lambda settings: settings.artifact_store is None,
        ),
        (
            "artifact-mode-any-case",
            {"TRAINYARD_ARTIFACT_STORE": "s3://ml-artifacts/team-a/", "TRAINYARD_MLFLOW_ARTIFACTS": "Direct "},
            lambda settings: settings.mlflow_artifacts == "direct" and settings.artifact_store.prefix == "team-a",
        ),
        (
            "database-defaults",
            {"TRAINYARD_DATABASE_URL": "postgresql://db.internal"},
            lambda settings: (settings.database.name, settings.database.port) == ("trainyard", 5432),
        ),
    ),
)
def test_setting_at_the_edge_is_accepted(env, check):
    assert check(Settings.from_env(env))


def test_the_parsers_refuse_alone_too_and_keep_the_password_out():
    error = refusal(lambda: Database.parse(f"postgresql://root:{PASSWORD}@/ml"), SettingsError)
    assert PASSWORD not in str(error)
    assert ArtifactStore.parse("file:///data/models") is None
    refusal(lambda: ArtifactStore.parse("gs://bucket/x"), SettingsError)


def test_the_stack_command_says_a_bad_setting_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("TRAINYARD_MLFLOW_PORT", "mlflow")
    assert trainyard_stack.main(["env"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: TRAINYARD_MLFLOW_PORT='mlflow' is not a TCP port") and err.count("\n") == 1


# --- Through the train flow -------------------------------------------------------------------------------------
# The real flow on the real servers: the run fails before anything trains (a dataset: before compute is selected)
# with the reason in its state message, and leaves no MLflow run.


def task_names(flow_run_id) -> set[str]:
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [str(flow_run_id)]}))
    return {run.name.rsplit("-", 1)[0] for run in runs}


def refused_run(words: list[str], **parameters) -> set[str]:
    """Run the train flow: it fails with all the words in its message and no MLflow run; the tasks that ran."""
    state = train(return_state=True, **parameters)
    run_id = state.state_details.flow_run_id
    assert state.is_failed(), state.message
    says(state.message, words)
    assert "Traceback" not in state.message
    assert runs_of_flow_run(run_id) == []
    names = task_names(run_id)
    assert not names & {"train_on_compute", "evaluate_model", "export_model"}, names
    return names


def test_flow_refuses_a_bad_parameter_before_anything_runs(stack, shapes_cls):
    assert refused_run(["epochs", "greater than or equal to 1"], dataset=str(shapes_cls), epochs=0) == set()


def test_flow_refuses_an_option_its_trainer_does_not_take(stack, shapes_cls):
    words = ["box_gain are not taken by the torch trainer"]
    assert refused_run(words, dataset=str(shapes_cls), loss={"box_gain": 2.0}) == set()


def test_flow_refuses_a_one_class_dataset_before_compute(stack, tiny_imagefolder):
    one_class(tiny_imagefolder, None)
    words = [str(tiny_imagefolder), "one class only ('cat')", "at least two classes", "nothing was trained"]
    assert "select_compute" not in refused_run(words, dataset=str(tiny_imagefolder), epochs=1)


def test_flow_refuses_a_corrupt_image_and_names_the_file(stack, shapes_cls, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shapes_cls, broken)
    victim = next((broken / "val" / "square").glob("*.png"))
    victim.write_bytes(victim.read_bytes()[:40])  # truncated mid-file, as an interrupted copy leaves it
    words = [f"val/square/{victim.name}", "cannot be decoded", "nothing was trained"]
    assert "select_compute" not in refused_run(words, dataset=str(broken))


def test_flow_refuses_a_broken_image_link_without_a_cache_key_traceback(stack, tiny_imagefolder):
    broken_link(tiny_imagefolder, None)  # the dataset's version cannot be computed: nothing to cache the result on
    state = train(dataset=str(tiny_imagefolder), epochs=1, return_state=True)
    assert state.is_failed() and "val/cat/gone.png: cannot be read" in state.message
    logs = [log.message for log in run_logs(state.state_details.flow_run_id)]
    assert not [line for line in logs if "computing cache key" in line]


def test_flow_refuses_an_unknown_compute_profile_naming_the_known_ones(stack, shapes_cls):
    words = ["unknown compute profile(s) moon; known:", "local", "python -m infra.compute.profiles list"]
    refused_run(words, dataset=str(shapes_cls), compute={"profiles": ["moon"]})
