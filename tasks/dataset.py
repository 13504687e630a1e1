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


def _content_key(context: TaskRunContext, parameters: dict) -> str:
    # Same bytes at the same place => same validated result; a changed byte re-runs the validation.
    return f"prepare_dataset:{parameters['expected_format']}:{parameters['path']}:{fingerprint(parameters['path'])}"


@task(cache_key_fn=_content_key, cache_expiration=timedelta(days=30), persist_result=True)
def prepare_dataset(path: str, expected_format: str) -> DatasetSpec:
    """Validate every file, hash the content (the dataset version) and count images per class and split."""
    dataset = load_dataset(path)
    if dataset.format != expected_format:
        wanted = "a YOLO data.yaml" if expected_format == "yolo" else "an ImageFolder directory"
        raise DatasetError(dataset.root, [f"this trainer needs {wanted}, but {path} is a {dataset.format} dataset"])
    return dataset


@task
def publish_dataset_stats(dataset: DatasetSpec) -> None:
    """Images per class and split, in every run's artifacts (also when preparation came from the cache)."""
    rows = [
        {"split": split, "class": name, "count": count}
        for split, counts in dataset.stats.items()
        for name, count in counts.items()
    ]
    create_table_artifact(rows, key="dataset-stats", description=f"Dataset {dataset.version[:19]}")
