"""Stage 1: validate the dataset, version it by content, persist its label map."""

from __future__ import annotations

from datetime import timedelta

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.context import TaskRunContext

from trainers.data.errors import DatasetError
from trainers.data.fingerprint import fingerprint
from trainers.data.spec import DatasetSpec
from trainers.data.validate import load_dataset
from trainers.registry import TRAINERS

FORMAT_NAMES = {"imagefolder": "an ImageFolder directory", "yolo": "a YOLO data.yaml"}


def _content_key(context: TaskRunContext, parameters: dict) -> str | None:
    # Same bytes at the same place => same validated result; a changed byte re-runs the validation.
    try:
        version = fingerprint(parameters["path"])
    except (DatasetError, OSError):
        return None  # nothing to cache: the task itself says what is wrong, without a traceback in the run's log
    return f"prepare_dataset:{parameters['expected_format']}:{parameters['path']}:{version}"


def checked_dataset(path: str, expected_format: str) -> DatasetSpec:
    """The dataset at `path`, validated and versioned, in the format the trainer takes; DatasetError otherwise."""
    dataset = load_dataset(path)
    if dataset.format != expected_format:
        takers = " or ".join(name for name, spec in TRAINERS.items() if spec.dataset_format == dataset.format)
        raise DatasetError(
            dataset.root,
            [
                f"this trainer needs {FORMAT_NAMES[expected_format]}, but {path} is {FORMAT_NAMES[dataset.format]}; "
                f"give {FORMAT_NAMES[expected_format]}, or train this one with trainer {takers}"
            ],
        )
    return dataset


@task(cache_key_fn=_content_key, cache_expiration=timedelta(days=30), persist_result=True)
def prepare_dataset(path: str, expected_format: str) -> DatasetSpec:
    """Validate every file, hash the content (the dataset version) and count images per class and split."""
    return checked_dataset(path, expected_format)


@task
def publish_dataset_stats(dataset: DatasetSpec) -> None:
    """Images per class and split, in every run's artifacts (also when preparation came from the cache)."""
    rows = [
        {"split": split, "class": name, "count": count}
        for split, counts in dataset.stats.items()
        for name, count in counts.items()
    ]
    create_table_artifact(rows, key="dataset-stats", description=f"Dataset {dataset.version[:19]}")
