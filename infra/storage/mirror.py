"""A run's checkpoint directory mirrored to a storage, so that an attempt on another host resumes from it.

Remote layout under the mirror's root (e.g. `s3://bucket/trainyard/<experiment>/<run>/checkpoints`):

    blobs/<sha256>              each distinct file's bytes, named by their sha256 (stored with it, verified on fetch)
    manifests/<sha256>.json     one per push: relative path -> sha256, size (and hard links), the training progress
    latest.json                 the pointer to the newest complete manifest, written last

A push uploads the blobs it lacks first, then the manifest, then the pointer: a push cut short leaves the previous
pointer, whose blobs are all there. Blobs are named by content, so a file rewritten in place never overwrites bytes
an older manifest names. Only after the pointer moves are the blobs and manifest it no longer names deleted.

Hashes are computed once per file (by inode, size and mtime); a file listed in the torch CheckpointStore's
`checkpoints.json` with that size takes the sha256 recorded there. Files are staged as hard links before they are
read, so a checkpoint replaced (renamed over) while it uploads is still read whole; one the storage lacks is
uploaded from a copy, so a file rewritten in place cannot change under the upload (its changed mtime then keeps it
out of the manifest until the next push).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from infra.storage import Storage, sha256_file

log = logging.getLogger(__name__)

POINTER = "latest.json"
CHECKPOINT_MANIFEST = "checkpoints.json"  # trainers.checkpoints.MANIFEST: staged first, restored last
EXCLUDED_DIRS = ("export",)  # the export stage writes there after training: not needed to resume


@dataclass(frozen=True)
class PushResult:
    files: int  # listed in the manifest
    uploaded: int  # blobs uploaded by this push
    bytes_uploaded: int
    deleted: int  # blobs the previous manifest named and this one does not
    manifest: str  # its key


@dataclass(frozen=True)
class RestoreResult:
    files: int
    bytes: int
    progress: dict


def _progress_of(checkpoints_json: Path) -> dict:
    """Epoch and step of the newest checkpoint a CheckpointStore manifest lists ({} when there is none)."""
    try:
        manifest = json.loads(checkpoints_json.read_text())
    except (OSError, ValueError):
        return {}
    entries = {e["file"]: e for e in manifest.get("checkpoints", [])}
    last = entries.get(manifest.get("last") or "")
    return {"epoch": last["epoch"], "step": last["step"]} if last else {}


def _newer(remote: dict, local: dict) -> bool:
    return (remote.get("epoch", -1), remote.get("step", -1)) > (local.get("epoch", -1), local.get("step", -1))


class RunMirror:
    """The checkpoints of one run directory on a storage. Thread-safe: one push or restore at a time."""

    def __init__(self, storage: Storage, directory: Path) -> None:
        self.storage, self.directory = storage, Path(directory)
        self._hashes: dict[tuple[int, int, int, int], str] = {}  # (dev, inode, size, mtime_ns) -> sha256
        self._stored: set[str] = set()  # blobs known to be in the storage
        self._current: tuple[str, dict] | None = None  # the manifest the pointer names: key, content
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return self.storage.uri

    # --- push ------------------------------------------------------------------------------------------------

    def _files(self) -> list[Path]:
        """Every file to mirror, CheckpointStore's manifest first (every checkpoint it names was complete then)."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.directory):
            top = Path(dirpath) == self.directory
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (top and d in EXCLUDED_DIRS))
            found += [Path(dirpath) / name for name in sorted(filenames) if not name.startswith(".")]
        return sorted(found, key=lambda path: path != self.directory / CHECKPOINT_MANIFEST)

    def push(self, epoch: int | None = None) -> PushResult:
        """Upload what the storage lacks, then a manifest of the whole directory, then the pointer to it."""
        with self._lock:
            if self._current is None:
                self._current = self._read_current()
            staging = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.push-", dir=self.directory.parent))
            try:
                return self._push(staging, epoch)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _push(self, staging: Path, epoch: int | None) -> PushResult:
        files: dict[str, dict] = {}
        inodes: dict[tuple[int, int], str] = {}  # hard links (last.pt, best.pt) are stored once, linked back
        known: dict[str, tuple[int, str]] = {}  # from checkpoints.json: file -> (size, sha256)
        progress: dict = {}
        uploaded = bytes_uploaded = 0
        for number, path in enumerate(self._files()):
            rel = path.relative_to(self.directory).as_posix()
            staged = staging / str(number)
            try:
                os.link(path, staged)
            except FileNotFoundError:
                continue  # removed (checkpoint retention) since it was listed
            except OSError:
                shutil.copy2(path, staged)  # a filesystem without hard links
            before = os.stat(staged)
            first = inodes.get((before.st_dev, before.st_ino))
            if first is not None:  # another name of a file already listed
                files[rel] = {**files[first], "link": first}
                continue
            if rel == CHECKPOINT_MANIFEST:
                progress = _progress_of(staged)
                with contextlib.suppress(OSError, ValueError, KeyError):
                    entries = json.loads(staged.read_text())["checkpoints"]
                    known = {e["file"]: (e["bytes"], e["sha256"]) for e in entries}
            sha = self._sha(staged, before, known.get(rel))
            if sha not in self._stored:
                # Uploaded from a private copy: a file written in place (Ultralytics' last.pt, every epoch) would
                # change length under a multipart upload, whose part then never reaches its Content-Length.
                frozen = staging / f"{number}.upload"
                shutil.copyfile(staged, frozen)
                self.storage.upload_file(frozen, f"blobs/{sha}", sha256=sha)
                frozen.unlink()
                uploaded, bytes_uploaded = uploaded + 1, bytes_uploaded + before.st_size
            after = os.stat(staged)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                # Written in place while it was read: its bytes may not be the hash; the next push takes it.
                self.storage.delete(f"blobs/{sha}")
                self._stored.discard(sha)
                continue
            self._stored.add(sha)
            files[rel] = {"sha256": sha, "bytes": before.st_size}
            inodes[before.st_dev, before.st_ino] = rel
        if not progress and epoch is not None:
            progress = {"epoch": epoch}
        elif not progress and self._current is not None:
            # A push naming no epoch (the training step's last one, after training) adds no checkpoint: the
            # progress stays what the previous manifest says, so a restore can still tell which epoch it brings.
            progress = self._current[1].get("progress", {})
        manifest = {"version": 1, "files": files, "progress": progress}
        manifest_path = staging / "manifest.json"
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        digest = sha256_file(manifest_path)
        key = f"manifests/{digest}.json"
        self.storage.upload_file(manifest_path, key, pointer=POINTER, sha256=digest)
        deleted = self._collect(key, manifest)
        log.info(
            "checkpoints of %s pushed to %s: %d files, %d uploaded (%d bytes), %d deleted",
            self.directory.name, self.storage.uri, len(files), uploaded, bytes_uploaded, deleted,
        )  # fmt: skip
        return PushResult(len(files), uploaded, bytes_uploaded, deleted, key)

    def _sha(self, staged: Path, stat: os.stat_result, known: tuple[int, str] | None) -> str:
        if known and known[0] == stat.st_size:
            return known[1]  # CheckpointStore hashed it when it wrote it
        identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if identity not in self._hashes:
            self._hashes[identity] = sha256_file(staged)
        return self._hashes[identity]

    def _collect(self, key: str, manifest: dict) -> int:
        """Delete what the previous manifest named and the new one does not (the pointer has moved already)."""
        previous, self._current = self._current, (key, manifest)
        if previous is None or previous[0] == key:
            return 0
        keep = {entry["sha256"] for entry in manifest["files"].values()}
        gone = {entry["sha256"] for entry in previous[1]["files"].values()} - keep
        for sha in gone:
            self.storage.delete(f"blobs/{sha}")
            self._stored.discard(sha)
        self.storage.delete(previous[0])
        return len(gone)

    def _read_current(self) -> tuple[str, dict] | None:
        """The manifest the pointer names now (left by an earlier attempt), so its blobs are not uploaded again."""
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        pointer = self.storage.read_pointer(POINTER)
        if pointer is None:
            return None
        with tempfile.TemporaryDirectory(dir=self.directory.parent) as tmp:
            path = self.storage.download_file(pointer.key, Path(tmp) / "manifest.json", sha256=pointer.sha256)
            manifest = json.loads(path.read_text())
        self._stored |= {entry["sha256"] for entry in manifest["files"].values()}
        return pointer.key, manifest

    # --- restore ---------------------------------------------------------------------------------------------

    def restore(self) -> RestoreResult | None:
        """Fetch the newest pushed checkpoints into the directory when it lacks them; None when nothing was fetched.

        Fetched when the directory holds no files, or when its CheckpointStore manifest is behind the pushed one.
        Every file is verified against its sha256 before it is put in place; CheckpointStore's manifest goes last.
        """
        with self._lock:
            self._current = current = self._read_current()
            if current is None:
                return None
            key, manifest = current
            local = self.directory / CHECKPOINT_MANIFEST
            has_files = self.directory.is_dir() and any(self._files())
            if has_files and not (local.exists() and _newer(manifest["progress"], _progress_of(local))):
                log.info("%s already holds its checkpoints (as new as %s): nothing fetched", self.directory, key)
                return None
            self.directory.mkdir(parents=True, exist_ok=True)
            staging = f".{self.directory.name}.restore-"
            with tempfile.TemporaryDirectory(prefix=staging, dir=self.directory.parent) as tmp:
                return self._restore(Path(tmp), manifest)

    def _restore(self, staging: Path, manifest: dict) -> RestoreResult:
        files: dict[str, dict] = manifest["files"]
        for sha in {entry["sha256"] for entry in files.values()}:
            self.storage.download_file(f"blobs/{sha}", staging / sha, sha256=sha)  # verified, or it raises
        # Plain files first, then hard links to them; CheckpointStore's manifest, which names the others, last.
        order = sorted(files, key=lambda rel: (rel == CHECKPOINT_MANIFEST, "link" in files[rel], rel))
        for rel in order:
            entry, dest = files[rel], self.directory / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.restore")
            tmp.unlink(missing_ok=True)
            if "link" in entry:
                os.link(self.directory / entry["link"], tmp)
            else:
                shutil.copyfile(staging / entry["sha256"], tmp)  # a copy each: in-place writes never spread
            os.replace(tmp, dest)
        size = sum(entry["bytes"] for entry in files.values() if "link" not in entry)
        log.info("restored %d checkpoint files (%d bytes) from %s into %s", len(files), size, self.uri, self.directory)
        return RestoreResult(len(files), size, manifest["progress"])
