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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("trainers.checkpoints")
MANIFEST = "checkpoints.json"


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


def _link_atomic(target: Path, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:  # a filesystem without hard links: a copy
        import shutil

        shutil.copyfile(target, tmp)
    os.replace(tmp, link)


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
        newest = {e["file"] for e in manifest["checkpoints"][-self.keep_last :]}
        keep = newest | {manifest["best"], manifest["last"]} - {None}
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
