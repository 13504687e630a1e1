"""What every storage backend shares: its errors, its records and the interface (imported by the backends, which the
package's storage_for picks by URI scheme)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol


class StorageError(RuntimeError):
    """A storage operation failed; the message names the thing, the rule and the fix, and never a secret."""


class ChecksumError(StorageError):
    """Downloaded bytes do not match the checksum the object was stored with; nothing was written."""


@dataclass(frozen=True)
class StoredObject:
    """An object as stored: what a pointer object holds, and what an upload returns."""

    key: str  # relative to the storage root
    size: int
    sha256: str
    uri: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StoredObject:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class SyncResult:
    """Where a dataset lies locally and what the sync had to do to get it there."""

    path: Path
    downloaded: int = 0
    removed: int = 0
    unchanged: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0


class Storage(Protocol):
    uri: str

    def upload_file(
        self, path: Path, key: str, *, pointer: str | None = None, sha256: str | None = None
    ) -> StoredObject:
        """Store the file at key with its sha256 (computed unless given); then write the pointer naming it."""
        ...

    def download_file(self, key: str, dest: Path, *, sha256: str | None = None) -> Path:
        """Fetch key to dest atomically, refusing bytes that fail their checksum."""
        ...

    def read_pointer(self, pointer: str) -> StoredObject | None:
        """The object a pointer names (None when there is no pointer yet)."""
        ...

    def presigned_url(self, key: str, expires_s: int | None = None) -> str:
        """A URL that downloads key without credentials until it expires."""
        ...

    def sync_to_cache(self, cache_root: Path) -> SyncResult:
        """Make the whole root available as a local directory, fetching only what changed."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object at key (nothing happens when there is none)."""
        ...


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_key(key: str) -> str:
    """A key is a relative path inside the root: no leading '/', no '..', no empty segment."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise StorageError(
            f"Storage key {key!r} is not a relative path inside the storage root: keys are 'a/b/c' with no leading "
            "'/', no '.' or '..' segment and no empty segment. Use a path relative to the run's prefix."
        )
    return key
