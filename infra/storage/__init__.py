"""One storage interface, two backends: a local directory and S3 (or any S3-compatible endpoint).

A storage is rooted at a URI (`s3://bucket/prefix`, `file:///path` or a plain path); keys are relative paths under
that root. Datasets sync into a local cache (`sync_to_cache`); checkpoints and exported models upload with a sha256
and, optionally, a pointer object written last, so an interrupted upload is never "the latest"
(`upload_file(..., pointer=...)`, `read_pointer`). Credentials come from the environment or a Prefect AwsCredentials
block, never from arguments (see docs/storage.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

__all__ = [
    "ChecksumError",
    "check_key",
    "sha256_file",
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


from infra.storage.objects import (
    ChecksumError,
    Storage,
    StorageError,
    StoredObject,
    SyncResult,
    check_key,
    sha256_file,
)
from trainers.data.uris import s3_uri_problem

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
