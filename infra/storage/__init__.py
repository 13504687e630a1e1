"""One storage interface, two backends: a local directory and S3 (or any S3-compatible endpoint).

A storage is rooted at a URI (`s3://bucket/prefix`, `file:///path` or a plain path); keys are relative paths under
that root. Datasets sync into a local cache (`sync_to_cache`); checkpoints and exported models upload with a sha256
and, optionally, a pointer object written last, so an interrupted upload is never "the latest"
(`upload_file(..., pointer=...)`, `read_pointer`). Credentials come from the environment or a Prefect AwsCredentials
block, never from arguments (see docs/storage.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

__all__ = [
    "ChecksumError",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StorageError",
    "StoredObject",
    "SyncResult",
    "project_prefix",
    "s3_uri_problem",
    "storage_for",
    "sync_to_cache",
]


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


S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def s3_uri_problem(uri: str) -> str | None:
    """What is wrong with the shape of `s3://bucket/prefix`, as the rule it breaks; None when nothing is.

    Looks at the text only (no request): a request is validated before anything connects.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        return f"only s3:// URIs are synced, not {parsed.scheme or 'this scheme'}://"
    if not uri.startswith("s3://"):
        return "an S3 URI starts with s3:// (lowercase) followed by the bucket"
    bucket, key = parsed.netloc, parsed.path.removeprefix("/").rstrip("/")
    if parsed.query or parsed.fragment or parsed.params:
        return "an S3 URI has no '?', ';' or '#' part"
    if not S3_BUCKET.match(bucket) or ".." in bucket or _IP.match(bucket):
        return (
            f"{bucket!r} is not an S3 bucket name (3-63 characters: lowercase letters, digits, '.' and '-', starting "
            "and ending with a letter or digit, no '..', not an IP address)"
        )
    parts = key.split("/") if key else []
    if "\\" in key or any(part in ("", ".", "..") for part in parts):
        return f"the prefix {key!r} has an empty, '.' or '..' segment (write s3://bucket/a/b)"
    return None


_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def project_prefix(bucket_prefix: str, experiment: str) -> str:
    """The storage URI of one experiment: `<bucket_prefix>/<experiment segment>`; experiments never share keys.

    A name that is already a safe path segment is used as is; any other (spaces, slashes) becomes a slug plus a
    short hash of the name, so two different names never map to the same prefix and nothing can climb out of it.
    """
    if not experiment.strip():
        raise StorageError("An experiment name is needed for its storage prefix; got an empty name.")
    segment = experiment
    if not _SEGMENT.match(experiment) or experiment.endswith("."):
        slug = re.sub(r"[^a-z0-9]+", "-", experiment.lower()).strip("-")[:60] or "experiment"
        segment = f"{slug}-{hashlib.sha256(experiment.encode()).hexdigest()[:8]}"
    return f"{bucket_prefix.rstrip('/')}/{segment}"


def _s3(uri: str) -> Storage:
    from infra.storage.s3 import S3Storage

    return S3Storage.from_uri(uri)


def _local(uri: str) -> Storage:
    from infra.storage.local import LocalStorage

    return LocalStorage.from_uri(uri)


# One mapping from URI scheme to backend; a new backend is one line here.
BACKENDS: dict[str, Callable[[str], Storage]] = {"s3": _s3, "file": _local, "": _local}


def storage_for(uri: str) -> Storage:
    """The storage for a URI: `s3://bucket/prefix`, `file:///path` or a plain local path."""
    scheme = urlparse(str(uri)).scheme if "://" in str(uri) else ""
    if scheme not in BACKENDS:
        raise StorageError(
            f"Unsupported storage URI {uri!r}: Trainyard stores to s3://bucket/prefix (AWS or any S3-compatible "
            "endpoint) or to a local path. Use one of those."
        )
    return BACKENDS[scheme](str(uri))


def sync_to_cache(uri: str, cache_root: Path) -> SyncResult:
    """Make the dataset at uri available locally (a local path is used in place)."""
    return storage_for(uri).sync_to_cache(Path(cache_root))


def __getattr__(name: str):  # the backends load on first use: a local run never imports boto3
    if name == "S3Storage":
        from infra.storage.s3 import S3Storage

        return S3Storage
    if name == "LocalStorage":
        from infra.storage.local import LocalStorage

        return LocalStorage
    raise AttributeError(name)
