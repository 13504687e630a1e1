"""Checkpoint files a crash cannot corrupt: atomic writes, a manifest with checksums, retention, verified loads.

Layout in a run's output directory:

    ckpt-e0003-s00000120.pt   one file per checkpoint (epochs completed, global step)
    last.pt, best.pt          hard links to the newest and the best checkpoint (what evaluation and export read)
    checkpoints.json          the manifest: every kept checkpoint with its epoch, step, size and SHA-256

A checkpoint is written to a temporary file, fsynced and renamed; the manifest is replaced the same way after it.
A crash at any point leaves the previous manifest and the files it names intact. Resuming takes the newest
checkpoint whose checksum matches; a damaged one is skipped with a warning, and if none is usable the error says so
(never a silent restart from scratch). Retention keeps the last `keep_last` checkpoints and the best one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainers.base import TrainJob

log = logging.getLogger("trainers.checkpoints")
MANIFEST = "checkpoints.json"
DIR_MANIFEST = "trainyard-manifest.json"  # inside a checkpoint that is a directory (Hugging Face)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected: damaged, or from another run."""


@dataclass(frozen=True)
class Entry:
    file: str
    epoch: int  # epochs completed
    step: int  # optimizer steps completed
    bytes: int
    sha256: str
    written_at: float


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """`write(handle)` into a temporary file next to `path`, fsync, rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


RUN_RECORD = "trainyard.json"  # what a resume in a run directory must keep (check_or_record_run)
_RECORDED = {"dataset_version": "dataset version", "labels": "label map", "best_metric": "checkpoint.best_metric"}


def check_or_record_run(output_dir: Path, job: TrainJob, best_metric: str, resuming: bool) -> None:
    """Refuse to resume a training started with another dataset version, label map or best metric (as the attempt
    that started it recorded them in RUN_RECORD): its checkpoints, and the best so far, belong to those. Otherwise
    (re)write the record."""
    record = {"dataset_version": job.dataset.version, "labels": list(job.dataset.labels), "best_metric": best_metric}
    path = Path(output_dir) / RUN_RECORD
    if resuming and path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = [key for key, value in record.items() if key in before and before[key] != value]
        if changed:
            then_now = "; ".join(f"{_RECORDED[key]} {before[key]!r} then, {record[key]!r} now" for key in changed)
            raise CheckpointError(
                f"{output_dir} holds a training started with another {' and '.join(_RECORDED[k] for k in changed)} "
                f"({then_now}); a resume keeps what its training started with: resume with those, or use a new "
                "output directory"
            )
    write_atomic(path, lambda handle: handle.write(json.dumps(record, indent=2, ensure_ascii=False).encode()))


def copy_atomic(source: Path, target: Path) -> None:
    """Copy a file so that `target` is either its old content or the whole new one, never a partial file."""
    with open(source, "rb") as reader:
        write_atomic(Path(target), lambda handle: shutil.copyfileobj(reader, handle, 1 << 20))


def _link_atomic(target: Path, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:  # a filesystem without hard links: a copy
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)


def retained_files(manifest: dict, keep_last: int) -> set[str]:
    """The checkpoint files retention keeps: the newest `keep_last` of the manifest, the best and the last."""
    newest = {entry["file"] for entry in manifest["checkpoints"][-keep_last:]}
    return newest | {manifest.get("best"), manifest.get("last")} - {None}


class CheckpointStore:
    """The checkpoints of one run directory. `save` and `load` take serializer functions, so any library fits."""

    def __init__(self, directory: Path, keep_last: int = 1) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return {"checkpoints": [], "last": None, "best": None}

    def entries(self) -> list[Entry]:
        return [Entry(**entry) for entry in self.manifest()["checkpoints"]]

    def save(self, write: Callable[[Any], None], epoch: int, step: int, best: bool = False) -> Path:
        """Write one checkpoint with `write(handle)`, record it, point last.pt (and best.pt) at it, apply retention."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"ckpt-e{epoch:04d}-s{step:08d}.pt"
        write_atomic(path, write)
        entry = Entry(path.name, epoch, step, path.stat().st_size, sha256_of(path), time.time())
        manifest = self.manifest()
        kept = [e for e in manifest["checkpoints"] if e["file"] != path.name] + [asdict(entry)]
        manifest.update(checkpoints=kept, last=path.name)
        if best:
            manifest["best"] = path.name
        _link_atomic(path, self.directory / "last.pt")
        if best:
            _link_atomic(path, self.directory / "best.pt")
        self._write_manifest(self._retain(manifest))
        return path

    def _retain(self, manifest: dict) -> dict:
        keep = retained_files(manifest, self.keep_last)
        for entry in manifest["checkpoints"]:
            if entry["file"] not in keep:
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / entry["file"]).unlink()
        manifest["checkpoints"] = [e for e in manifest["checkpoints"] if e["file"] in keep]
        return manifest

    def _write_manifest(self, manifest: dict) -> None:
        write_atomic(self.manifest_path, lambda handle: handle.write(json.dumps(manifest, indent=1).encode()))

    def verified(self, entry: Entry) -> bool:
        path = self.directory / entry.file
        try:
            return path.stat().st_size == entry.bytes and sha256_of(path) == entry.sha256
        except FileNotFoundError:
            return False

    def latest(self, load: Callable[[Path], dict]) -> tuple[Path, dict] | None:
        """The newest checkpoint that verifies and loads, or None when this directory has none at all.

        Damaged ones are skipped with a warning; if every one is damaged, CheckpointError names them."""
        entries = self.entries()
        if not entries:
            legacy = self.directory / "last.pt"  # written before manifests existed: load it as it is
            return (legacy, load(legacy)) if legacy.is_file() else None
        damaged = []
        for entry in reversed(entries):
            path = self.directory / entry.file
            if not self.verified(entry):
                damaged.append(f"{entry.file} (size or SHA-256 differs from the manifest)")
                log.warning("checkpoint %s is damaged; trying the one before it", path)
                continue
            try:
                return path, load(path)
            except Exception as error:  # verified bytes that still do not load: treat as damaged
                damaged.append(f"{entry.file} ({type(error).__name__}: {error})")
                log.warning("checkpoint %s does not load (%s); trying the one before it", path, error)
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: {'; '.join(damaged)}. Training will not restart from "
            "scratch on its own: restore the files, or remove the directory (or use another output directory) "
            "to start over"
        )


@contextlib.contextmanager
def signals_held():
    """While the checkpoint on the way out of an interruption is written, a repeated SIGTERM or Ctrl-C (a cancel is
    often delivered twice: to the process and through its launcher) must not abort it; the caller re-raises the
    interruption afterwards anyway. Signal handlers belong to the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


def write_dir_manifest(directory: Path) -> Path:
    """Record the size and SHA-256 of every file of a checkpoint directory, in DIR_MANIFEST inside it (atomically)."""
    directory = Path(directory)
    files = {
        str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != DIR_MANIFEST
    }
    manifest = directory / DIR_MANIFEST
    write_atomic(manifest, lambda handle: handle.write(json.dumps({"files": files}, indent=1).encode()))
    return manifest


def dir_damage(directory: Path) -> str | None:
    """What is wrong with a checkpoint directory against its manifest, or None when it verifies (or has none)."""
    directory = Path(directory)
    try:
        files = json.loads((directory / DIR_MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return None  # written by the library alone (e.g. killed before the manifest): its own completeness rules
    except (ValueError, KeyError) as error:
        return f"{DIR_MANIFEST} is unreadable ({error})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"] or sha256_of(path) != expected["sha256"]:
            return f"{name} differs from the manifest (size or SHA-256)"
    return None


def record_file(path: Path) -> None:
    """Add one file's size and SHA-256 to the DIR_MANIFEST of its directory (for files a library wrote)."""
    path = Path(path)
    manifest = path.parent / DIR_MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (FileNotFoundError, ValueError, KeyError):
        files = {}
    files = {name: entry for name, entry in files.items() if (path.parent / name).exists()}  # rotated away
    files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    write_atomic(manifest, lambda handle: handle.write(json.dumps({"files": files}, indent=1).encode()))


def file_damage(path: Path) -> str | None:
    """What is wrong with a file against its directory's DIR_MANIFEST, or None when it verifies (or is not in it)."""
    path = Path(path)
    try:
        expected = json.loads((path.parent / DIR_MANIFEST).read_text())["files"].get(path.name)
    except (FileNotFoundError, ValueError, KeyError):
        return None
    if expected is None:
        return None
    if not path.is_file():
        return f"{path.name} is missing"
    if path.stat().st_size != expected["bytes"] or sha256_of(path) != expected["sha256"]:
        return f"{path.name} differs from the manifest (size or SHA-256)"
    return None
