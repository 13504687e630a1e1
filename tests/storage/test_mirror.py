"""A run directory mirrored to S3 (infra/storage/mirror.py) against the moto server: push, restore, clean-up."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from infra.storage import StorageError, storage_for
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

    assert restored.fetched and restored.progress == {"epoch": 2, "step": 20}
    assert restored.reason == "this host holds none of them"
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

    kept = RunMirror(storage_for(f"s3://{bucket}/p/checkpoints"), store.directory).restore()
    assert not kept.fetched and kept.reason == (
        "this host's copy (epoch 2, step 20) is newer than the pushed one (epoch 1, step 10)"
    )
    assert CheckpointStore(store.directory).entries()[-1].epoch == 2


def write(directory, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)


def tree(directory) -> dict[str, bytes]:
    """Every file a trainer would see (the mirror's hidden record aside)."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def blob_downloads(mirror: RunMirror) -> list[str]:
    """The checkpoint files this mirror's storage client downloads from now on."""
    fetched: list[str] = []
    mirror.storage.client.meta.events.register(
        "before-parameter-build.s3.GetObject",
        lambda params, **_: fetched.append(params["Key"]) if "/blobs/" in params["Key"] else None,
    )
    return fetched


def test_an_older_copy_without_checkpoints_json_is_replaced_by_the_newer_push(s3, bucket, tmp_path):
    """hf-image and yolo directories have no checkpoints.json: what the copy holds is told by the mirror's record."""
    host_a, host_b = tmp_path / "host-a" / "run", tmp_path / "host-b" / "run"
    uri = f"s3://{bucket}/older/checkpoints"
    write(host_a, {"checkpoint-8/model.bin": b"epoch 1", "checkpoint-8/state.json": b"{}"})
    RunMirror(storage_for(uri), host_a).push(1)
    shutil.copytree(host_a, host_b)  # host B keeps this copy (epoch 1)
    mirror_a = RunMirror(storage_for(uri), host_a)
    write(host_a, {"checkpoint-16/model.bin": b"epoch 2", "checkpoint-16/state.json": b"{}"})
    shutil.rmtree(host_a / "checkpoint-8")  # rotated away
    mirror_a.push(2)

    restored = RunMirror(storage_for(uri), host_b).restore()

    assert restored.fetched and restored.progress == {"epoch": 2}
    assert restored.reason == "the pushed copy (epoch 2) is newer than this host's (epoch 1)"
    assert tree(host_b) == tree(host_a)  # checkpoint-8, which the pushed run no longer has, is gone with its folder
    assert not (host_b / "checkpoint-8").exists()


def test_a_copy_that_is_the_pushed_one_or_newer_downloads_nothing(s3, bucket, tmp_path):
    run = tmp_path / "run"
    uri = f"s3://{bucket}/same/checkpoints"
    write(run, {"weights/last.pt": b"epoch 2"})
    RunMirror(storage_for(uri), run).push(2)

    mirror = RunMirror(storage_for(uri), run)
    downloads = blob_downloads(mirror)
    kept = mirror.restore()
    write(run, {"weights/last.pt": b"epoch 3, not pushed yet"})
    kept_again = mirror.restore()

    assert (kept.fetched, kept.reason) == (False, "this host's copy is the pushed one (epoch 2)")
    assert not kept_again.fetched and downloads == []
    assert (run / "weights" / "last.pt").read_bytes() == b"epoch 3, not pushed yet"


def test_a_copy_that_lacks_a_required_file_is_fetched_even_when_as_new(s3, bucket, tmp_path):
    host_a, host_b = tmp_path / "host-a" / "run", tmp_path / "host-b" / "run"
    uri = f"s3://{bucket}/required/checkpoints"
    write(host_a, {"weights/best.pt": b"best"})
    RunMirror(storage_for(uri), host_a).push(2)
    shutil.copytree(host_a, host_b)
    write(host_a, {"train-result.json": b"{}"})  # written after training, pushed with the same progress
    RunMirror(storage_for(uri), host_a).push()

    mirror = RunMirror(storage_for(uri), host_b)
    downloads = blob_downloads(mirror)
    assert not mirror.restore().fetched and downloads == []  # as new: kept
    restored = mirror.restore(required="train-result.json")

    assert restored.fetched and restored.reason == "this host's copy lacks train-result.json"
    assert len(downloads) == 2  # best.pt and train-result.json, each verified
    assert tree(host_b) == tree(host_a)


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
