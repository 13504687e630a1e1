"""The local side of a dataset sync: a directory mirroring a prefix, and its manifest.

The manifest (`.trainyard-sync.json`) records, per file, the ETag and size of the object it was downloaded from and
the local mtime_ns after the download. A file is unchanged when the listing still shows that ETag and size and the
local file still has that size and mtime: deciding needs one stat per file, never a hash or a request. A lock file
keeps two syncs of the same directory (two runs on one host) from interleaving.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = ".trainyard-sync.json"
LOCK = ".trainyard-sync.lock"
TMP = ".trainyard-tmp"  # downloads land here first, then are renamed into place
RESERVED = (MANIFEST, LOCK, TMP)


@dataclass
class SyncPlan:
    changed: dict[str, tuple[str, int]] = field(default_factory=dict)  # to download: rel -> (etag, size)
    removed: list[str] = field(default_factory=list)  # gone from the bucket: delete locally
    unchanged: list[str] = field(default_factory=list)


class SyncCache:
    def __init__(self, root: Path, source: str, files: dict[str, list]) -> None:
        self.root, self.source, self.files = root, source, files  # files: rel -> [etag, size, mtime_ns]
        self.dirty = not files  # a cache hit leaves the manifest as it is: nothing to write

    @staticmethod
    def reserved(rel: str) -> bool:
        return rel.split("/", 1)[0] in RESERVED

    @classmethod
    @contextmanager
    def open(cls, root: Path, source: str) -> Iterator[SyncCache]:
        """Lock root, load its manifest (empty if it mirrored another source), save it on the way out, always."""
        root.mkdir(parents=True, exist_ok=True)
        with open(root / LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            shutil.rmtree(root / TMP, ignore_errors=True)  # leftovers of a killed sync
            (root / TMP).mkdir()
            cache = cls(root, source, cls._load(root / MANIFEST, source))
            try:
                yield cache
            finally:
                if cache.dirty:
                    cache._save()
                shutil.rmtree(root / TMP, ignore_errors=True)

    @staticmethod
    def _load(path: Path, source: str) -> dict[str, list]:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return manifest.get("files", {}) if manifest.get("source") == source else {}

    def _save(self) -> None:
        tmp = self.root / TMP / "manifest.json"
        tmp.write_text(json.dumps({"version": 1, "source": self.source, "files": self.files}))
        os.replace(tmp, self.root / MANIFEST)

    def plan(self, remote: dict[str, tuple[str, int]]) -> SyncPlan:
        plan = SyncPlan(removed=[rel for rel in self.files if rel not in remote])
        root = str(self.root)
        for rel, (etag, size) in remote.items():
            entry = self.files.get(rel)
            if entry is not None and entry[0] == etag and entry[1] == size:
                try:
                    stat = os.stat(os.path.join(root, rel))
                except OSError:
                    stat = None
                if stat is not None and stat.st_size == size and stat.st_mtime_ns == entry[2]:
                    plan.unchanged.append(rel)
                    continue
            plan.changed[rel] = (etag, size)
            self.files.pop(rel, None)  # until it is downloaded again, the manifest must not vouch for it
            self.dirty = True
        return plan

    def remove(self, rels: list[str]) -> None:
        for rel in rels:
            path = self.root / rel
            path.unlink(missing_ok=True)
            self.files.pop(rel, None)
            self.dirty = True
            for parent in path.parents:  # prune directories the deletion emptied
                if parent == self.root or not parent.is_relative_to(self.root):
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break

    def record(self, rel: str, etag: str, size: int, mtime_ns: int) -> None:
        self.files[rel] = [etag, size, mtime_ns]

    def temp_path(self) -> Path:
        return self.root / TMP / secrets.token_hex(8)
