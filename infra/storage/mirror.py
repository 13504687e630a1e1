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

Each push and restore leaves a record in the directory (`.trainyard-mirror.json`, hidden, so never pushed): the
manifest it matches and that manifest's progress. A restore compares it (or, fresher, torch's `checkpoints.json`)
with the pushed manifest and fetches only when the pushed copy is newer, or when the directory lacks a file the
caller needs; what it fetches replaces the directory, files the manifest does not name included.
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
RECORD = ".trainyard-mirror.json"  # this directory's last push or restore: hidden, so never pushed itself


@dataclass(frozen=True)
class PushResult:
    files: int  # listed in the manifest
    uploaded: int  # blobs uploaded by this push
    bytes_uploaded: int
    deleted: int  # blobs the previous manifest named and this one does not
    manifest: str  # its key


@dataclass(frozen=True)
class RestoreResult:
    fetched: bool  # False: the directory was kept as it is
    reason: str  # why it was fetched or kept, for the log
    files: int = 0
    bytes: int = 0
    progress: dict | None = None  # of the pushed manifest


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


def describe(progress: dict) -> str:
    """`epoch 2`, `epoch 2, step 20`, or `no recorded progress`."""
    shown = ", ".join(f"{name} {progress[name]}" for name in ("epoch", "step") if name in progress)
    return shown or "no recorded progress"


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
        self._write_record(key, progress)
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

    # --- the record of what the directory holds --------------------------------------------------------------

    def _write_record(self, key: str, progress: dict) -> None:
        record = self.directory / RECORD
        tmp = record.with_name(f"{RECORD}.tmp")
        tmp.write_text(json.dumps({"manifest": key, "progress": progress}))
        os.replace(tmp, record)

    def _local_progress(self) -> tuple[str | None, dict]:
        """The manifest this directory last matched (None: unknown) and its progress; CheckpointStore's own
        manifest, when there is one, is fresher than the record (checkpoints saved since the last push)."""
        try:
            record = json.loads((self.directory / RECORD).read_text())
        except (OSError, ValueError):
            record = {}
        checkpoints = _progress_of(self.directory / CHECKPOINT_MANIFEST)
        return record.get("manifest"), checkpoints or record.get("progress") or {}

    def _why_fetch(self, key: str, pushed: dict, required: str | None) -> tuple[bool, str]:
        """Whether to replace the directory with the pushed manifest `key`, and why (for the log)."""
        if not (self.directory.is_dir() and any(self._files())):
            return True, "this host holds none of them"
        if required and not (self.directory / required).exists():
            return True, f"this host's copy lacks {required}"
        matched, local = self._local_progress()
        if matched != key and not local:
            return True, "this host's copy records no progress"
        if matched != key and _newer(pushed, local):
            return True, f"the pushed copy ({describe(pushed)}) is newer than this host's ({describe(local)})"
        if _newer(local, pushed):
            return False, f"this host's copy ({describe(local)}) is newer than the pushed one ({describe(pushed)})"
        if matched == key:
            return False, f"this host's copy is the pushed one ({describe(pushed)})"
        return False, f"this host's copy ({describe(local)}) is as new as the pushed one ({describe(pushed)})"

    # --- restore ---------------------------------------------------------------------------------------------

    def restore(self, required: str | None = None) -> RestoreResult | None:
        """Make the directory the newest pushed copy when it is behind; None when nothing was ever pushed.

        Fetched when the directory holds no files, lacks `required` (a path in it), records no progress, or is
        behind the pushed manifest's progress; a copy as new or newer is kept and nothing is downloaded. Every
        file is verified against its sha256 before it is put in place; CheckpointStore's manifest goes last, and
        files the pushed manifest does not name are removed (an older copy's stale checkpoints).
        """
        with self._lock:
            self._current = current = self._read_current()
            if current is None:
                return None
            key, manifest = current
            fetch, reason = self._why_fetch(key, manifest["progress"], required)
            if not fetch:
                log.info("%s kept, nothing fetched: %s", self.directory, reason)
                return RestoreResult(False, reason, progress=manifest["progress"])
            self.directory.mkdir(parents=True, exist_ok=True)
            staging = f".{self.directory.name}.restore-"
            with tempfile.TemporaryDirectory(prefix=staging, dir=self.directory.parent) as tmp:
                files, size = self._restore(Path(tmp), manifest)
            self._write_record(key, manifest["progress"])
            log.info("restored %d checkpoint files (%d bytes) from %s into %s: %s", files, size, self.uri,
                     self.directory, reason)  # fmt: skip
            return RestoreResult(True, reason, files, size, manifest["progress"])

    def _restore(self, staging: Path, manifest: dict) -> tuple[int, int]:
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
        self._remove_unlisted(files)
        return len(files), sum(entry["bytes"] for entry in files.values() if "link" not in entry)

    def _remove_unlisted(self, files: dict[str, dict]) -> None:
        """Remove what an older copy holds beyond the manifest (checkpoints the pushed run has rotated away):
        a trainer resuming from the directory must see the pushed run only, with no stale or empty folder."""
        for path in self._files():
            if path.relative_to(self.directory).as_posix() not in files:
                path.unlink()
        for dirpath, _, _ in os.walk(self.directory, topdown=False):  # the deepest first
            rel = Path(dirpath).relative_to(self.directory)
            kept = not rel.parts or rel.parts[0] in EXCLUDED_DIRS or any(p.startswith(".") for p in rel.parts)
            if not kept and not any(Path(dirpath).iterdir()):
                Path(dirpath).rmdir()
