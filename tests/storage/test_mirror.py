"""A run directory mirrored to S3 (infra/storage/mirror.py) against the moto server: push, restore, clean-up."""

from __future__ import annotations

import json
import os

import pytest
import torch

from infra.storage import StorageError, s3_uri_problem, storage_for
from infra.storage.mirror import RunMirror
from trainers.checkpoints import CheckpointStore


def save(store: CheckpointStore, epoch: int, best: bool = False) -> None:
    state = {"epoch": epoch, "weights": torch.full((64,), float(epoch))}
    store.save(lambda handle: torch.save(state, handle), epoch, epoch * 10, best=best)


def keys(s3, bucket: str, prefix: str) -> set[str]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {obj["Key"][len(prefix) :] for obj in listed}


def test_push_then_restore_on_another_host_resumes_the_newest_checkpoint(s3, bucket, tmp_path):
    store = CheckpointStore(tmp_path / "host-a" / "run", keep_last=1)
    mirror = RunMirror(storage_for(f"s3://{bucket}/proj/run-1/checkpoints"), store.directory)
    save(store, 1, best=True)
    first = mirror.push(1)
    save(store, 2)
    second = mirror.push(2)

    # Retention dropped epoch 1's file locally (it is still best.pt): hard links travel as links, not as bytes.
    assert first.uploaded == 2 and second.uploaded == 2  # a checkpoint and checkpoints.json each time
    remote = keys(s3, bucket, "proj/run-1/checkpoints/")
    assert "latest.json" in remote and sum(k.startswith("manifests/") for k in remote) == 1  # the old one is gone
    pointer = json.loads(s3.get_object(Bucket=bucket, Key="proj/run-1/checkpoints/latest.json")["Body"].read())
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"proj/run-1/checkpoints/{pointer['key']}")["Body"].read())
    assert manifest["progress"] == {"epoch": 2, "step": 20}
    assert manifest["files"]["last.pt"]["link"] == "ckpt-e0002-s00000020.pt"
    for entry in manifest["files"].values():
        head = s3.head_object(Bucket=bucket, Key=f"proj/run-1/checkpoints/blobs/{entry['sha256']}")
        assert head["Metadata"]["sha256"] == entry["sha256"]

    other = CheckpointStore(tmp_path / "host-b" / "run")
    restored = RunMirror(storage_for(f"s3://{bucket}/proj/run-1/checkpoints"), other.directory).restore()

    assert restored is not None and restored.progress == {"epoch": 2, "step": 20}
    path, state = other.latest(lambda p: torch.load(p, weights_only=False))
    assert path.name == "ckpt-e0002-s00000020.pt" and state["epoch"] == 2
    assert os.path.samefile(other.directory / "last.pt", path)
    assert (other.directory / "best.pt").read_bytes() == (store.directory / "best.pt").read_bytes()


def test_restore_keeps_a_local_directory_that_is_as_new(s3, bucket, tmp_path):
    store = CheckpointStore(tmp_path / "run")
    mirror = RunMirror(storage_for(f"s3://{bucket}/p/checkpoints"), store.directory)
    save(store, 1)
    mirror.push(1)
    save(store, 2)  # not pushed yet: the local directory is ahead

    assert RunMirror(storage_for(f"s3://{bucket}/p/checkpoints"), store.directory).restore() is None
    assert CheckpointStore(store.directory).entries()[-1].epoch == 2


def test_restore_with_nothing_pushed_does_nothing(s3, bucket, tmp_path):
    assert RunMirror(storage_for(f"s3://{bucket}/none/checkpoints"), tmp_path / "run").restore() is None


def test_a_push_that_fails_leaves_the_previous_pointer(s3, bucket, tmp_path):
    store = CheckpointStore(tmp_path / "run")
    storage = storage_for(f"s3://{bucket}/p/checkpoints")
    mirror = RunMirror(storage, store.directory)
    save(store, 1)
    mirror.push(1)
    before = storage.read_pointer("latest.json")
    save(store, 2)
    storage.client.meta.events.register(
        "before-call.s3.PutObject", lambda params, **_: (_ for _ in ()).throw(ConnectionError("network down"))
    )

    with pytest.raises(ConnectionError):
        mirror.push(2)

    assert storage_for(f"s3://{bucket}/p/checkpoints").read_pointer("latest.json") == before


def test_a_missing_bucket_is_a_clear_error(s3_env, tmp_path):
    mirror = RunMirror(storage_for("s3://no-such-bucket-ty/p/checkpoints"), tmp_path / "run")
    with pytest.raises(StorageError, match="Bucket 'no-such-bucket-ty' does not exist"):
        mirror.restore()


def test_delete_removes_an_object_and_a_missing_one_is_fine(s3, bucket, tmp_path):
    storage = storage_for(f"s3://{bucket}/d")
    (tmp_path / "f").write_bytes(b"x")
    storage.upload_file(tmp_path / "f", "f")
    storage.delete("f")
    storage.delete("f")
    assert keys(s3, bucket, "d/") == set()


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("s3://ml-data/shapes", None),
        ("s3://ml-data", None),
        ("s3://ML-data/x", "is not an S3 bucket name"),
        ("s3://ab/x", "is not an S3 bucket name"),
        ("s3://a..b/x", "is not an S3 bucket name"),
        ("s3://10.0.0.1/x", "is not an S3 bucket name"),
        ("s3://ml-data//x", "empty, '.' or '..' segment"),
        ("s3://ml-data/a/../b", "empty, '.' or '..' segment"),
        ("gs://ml-data/x", "only s3:// URIs are synced, not gs://"),
    ],
)
def test_s3_uri_shape(uri, problem):
    found = s3_uri_problem(uri)
    assert found is None if problem is None else problem in found
