"""Storage stages: an s3:// dataset synced into the local cache; the run's checkpoints mirrored to the artifact store
while it trains (an attempt on another host resumes from them); the exported model uploaded, with a presigned URL.

The artifact store is `TRAINYARD_ARTIFACT_STORE` (`s3://bucket/prefix`, or a shared directory); without it nothing
is uploaded. Keys of one run: `<prefix>/<experiment>/<train flow run id>/{checkpoints,model}/...` (docs/storage.md).
Credentials come from the environment or a Prefect block (infra/storage), never from here.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

import mlflow
from prefect import get_run_logger, task

from infra.settings import get_settings
from infra.storage import StorageError, SyncResult, project_prefix, storage_for, sync_to_cache
from infra.storage.mirror import RunMirror
from tasks.tracking import ensure_active
from trainers.base import Callback, TrainResult
from trainers.data.fingerprint import fingerprint
from trainers.data.spec import DatasetSpec

if TYPE_CHECKING:
    from tasks.export import ExportedModel

ARTIFACT_STORE = "TRAINYARD_ARTIFACT_STORE"
LATEST_MODEL = "latest-model.json"  # per experiment: the pointer to the newest exported model


def artifact_store() -> str | None:
    """Where checkpoints and models are uploaded (`TRAINYARD_ARTIFACT_STORE`); None: nowhere."""
    return get_settings().artifact_store_uri


def is_remote(dataset: str) -> bool:
    return "://" in dataset


def dataset_cache() -> Path:
    return get_settings().home / "cache" / "datasets"


def run_uri(experiment: str, run: str) -> str:
    """The artifact store's root for one train flow run, under its experiment's own prefix."""
    return f"{project_prefix(artifact_store(), experiment)}/{run}"


# --- datasets ------------------------------------------------------------------------------------------------


def sync_dataset_uri(uri: str, cache_root: Path) -> tuple[str, SyncResult]:
    """The local path of a remote dataset, synced into cache_root; a YOLO data.yaml URI syncs the prefix holding it."""
    prefix, _, name = uri.rpartition("/")
    inside = name if name.endswith((".yaml", ".yml")) and prefix.count("/") >= 2 else None
    result = sync_to_cache(prefix if inside else uri, cache_root)
    return str(result.path / inside) if inside else str(result.path), result


@task
def sync_dataset(dataset: str) -> str:
    """Mirror an s3:// dataset into TRAINYARD_HOME/cache/datasets (only what changed) and return its local path."""
    path, result = sync_dataset_uri(dataset, dataset_cache())
    get_run_logger().info(
        "dataset %s synced to %s: %d downloaded (%d bytes), %d unchanged, %d removed in %.2f s",
        dataset, result.path, result.downloaded, result.bytes_downloaded, result.unchanged, result.removed,
        result.seconds,
    )  # fmt: skip
    return path


def rebased(spec: DatasetSpec, old_root: Path, new_root: Path) -> DatasetSpec:
    """The same dataset at another place: every path of the spec moved from old_root to new_root."""

    def move(path: Path) -> Path:
        return new_root / Path(path).relative_to(old_root)

    return replace(
        spec,
        root=move(spec.root),
        splits={name: move(path) for name, path in spec.splits.items()},
        data_yaml=move(spec.data_yaml) if spec.data_yaml else None,
    )


@task
def localize_dataset(dataset: str, spec: DatasetSpec) -> DatasetSpec:
    """On the host that trains: the remote dataset synced into this host's cache, as the version the run validated."""
    path, result = sync_dataset_uri(dataset, dataset_cache())
    old_root = spec.data_yaml.parent if spec.data_yaml else spec.root
    if result.path == old_root and not result.downloaded:
        return spec  # the host that validated it, nothing changed since
    get_run_logger().info("dataset %s synced to %s: %d downloaded", dataset, result.path, result.downloaded)
    if (version := fingerprint(path)) != spec.version:
        raise StorageError(
            f"Dataset {dataset} changed since this run validated it (version {spec.version[:19]}, now "
            f"{version[:19]}): the objects under the prefix were replaced. Start a new run for the new data, or "
            "restore the objects."
        )
    return rebased(spec, old_root, result.path)


# --- the artifact store ----------------------------------------------------------------------------------------


@task
def check_artifact_store(experiment: str) -> str:
    """Reach the artifact store before compute is chosen: a missing bucket or credentials fail the run now."""
    uri = project_prefix(artifact_store(), experiment)
    storage_for(uri).read_pointer(LATEST_MODEL)
    get_run_logger().info("checkpoints and the exported model go to %s", uri)
    return uri


def checkpoint_mirror(experiment: str, run: str, output_dir: Path) -> RunMirror | None:
    store = artifact_store()
    return RunMirror(storage_for(f"{run_uri(experiment, run)}/checkpoints"), output_dir) if store else None


class CheckpointUploads(Callback):
    """After each checkpoint, the run directory is pushed to the artifact store by a background thread.

    The queue holds one request: a push takes the directory as it is when it starts, so a request made while one
    waits adds nothing. Leaving the context waits for the thread and pushes once more, so the last checkpoint is
    never lost; that final push fails the training when it fails, unless the training failed first.
    """

    def __init__(self, mirror: RunMirror | None) -> None:
        self.mirror = mirror
        self.logger = get_run_logger()  # bound to this task run: usable from the upload thread
        self._requests: queue.Queue[int | None] = queue.Queue(maxsize=1)
        self._pending = False  # a checkpoint not yet in a completed push
        self._epoch: int | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="checkpoint-uploads", daemon=True)
        self.pushes = 0

    def __enter__(self) -> CheckpointUploads:
        if self.mirror is not None:
            self._thread.start()
        return self

    def on_checkpoint(self, epoch: int, path: Path) -> None:
        if self.mirror is None:
            return
        with self._lock:
            self._pending, self._epoch = True, epoch
        with contextlib.suppress(queue.Full):  # full: the push waiting there will see this checkpoint too
            self._requests.put_nowait(epoch)

    def _work(self) -> None:
        while self._requests.get() is not None:
            try:
                self._push()
            except Exception as error:  # the final push retries it; training goes on meanwhile
                self.logger.warning("checkpoint upload to %s failed (%s); retried at the end", self.mirror.uri, error)

    def _push(self) -> None:
        with self._lock:
            self._pending, epoch = False, self._epoch
        try:
            pushed = self.mirror.push(epoch)
        except BaseException:
            with self._lock:
                self._pending = True
            raise
        self.pushes += 1
        self.logger.info(
            "checkpoints after epoch %s uploaded to %s: %d files, %d new (%d bytes)",
            epoch, self.mirror.uri, pushed.files, pushed.uploaded, pushed.bytes_uploaded,
        )  # fmt: skip

    def __exit__(self, kind, error, traceback) -> None:
        if self.mirror is None:
            return
        self._requests.put(None)  # after any request still queued
        self._thread.join()
        if not self._pending:
            return
        try:
            self._push()
        except Exception as push_error:
            if error is None:
                raise
            self.logger.error("the last checkpoint was not uploaded to %s: %s", self.mirror.uri, push_error)


def restore_checkpoints(mirror: RunMirror, required: str | None = None) -> None:
    """Fetch the run's checkpoints from the artifact store when this host's run directory is behind the pushed
    copy (or lacks `required`); a copy as new or newer is kept, with nothing downloaded."""
    restored = mirror.restore(required)
    if restored is None:
        return
    if restored.fetched:
        get_run_logger().info(
            "restored %d checkpoint files (%d bytes, epoch %s) from %s into %s: %s",
            restored.files, restored.bytes, restored.progress.get("epoch"), mirror.uri, mirror.directory,
            restored.reason,
        )  # fmt: skip
    else:
        get_run_logger().info("checkpoints in %s kept, nothing fetched from %s: %s", mirror.directory, mirror.uri,
                              restored.reason)  # fmt: skip


# --- the exported model ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredModel:
    onnx_uri: str
    onnx_sha256: str
    checkpoint_uri: str
    download_url: str  # presigned: anyone holding it can download the ONNX until it expires
    expires_at: datetime | None  # None: a local store's file:// URL does not expire


def _expiry(url: str) -> datetime | None:
    query = parse_qs(urlparse(url).query)
    if "X-Amz-Expires" not in query:
        return None
    signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return signed + timedelta(seconds=int(query["X-Amz-Expires"][0]))


@task(retries=2, retry_delay_seconds=10)
def upload_model(request, result: TrainResult, exported: ExportedModel, run: str, run_id: str) -> StoredModel:
    """Upload the best checkpoint, then the ONNX model (then the experiment's latest-model pointer), with sha256s."""
    ensure_active(run_id)
    storage = storage_for(project_prefix(artifact_store(), request.experiment))
    best = result.best_checkpoint
    checkpoint_key = f"{run}/model/checkpoint/{best.name}"
    if best.is_dir():  # a Hugging Face checkpoint is a directory: its files
        for path in sorted(p for p in best.rglob("*") if p.is_file()):
            storage.upload_file(path, f"{checkpoint_key}/{path.relative_to(best).as_posix()}")
    else:
        storage.upload_file(best, checkpoint_key)
    onnx = storage.upload_file(exported.onnx_path, f"{run}/model/model.onnx", pointer=LATEST_MODEL)
    url = storage.presigned_url(onnx.key)
    checkpoint_uri = f"{storage.uri}/{checkpoint_key}"
    mlflow.set_tags({"onnx.uri": onnx.uri, "checkpoint.uri": checkpoint_uri})  # never the presigned URL
    get_run_logger().info("ONNX model uploaded to %s (sha256 %s)", onnx.uri, onnx.sha256)
    return StoredModel(onnx.uri, onnx.sha256, checkpoint_uri, url, _expiry(url))
