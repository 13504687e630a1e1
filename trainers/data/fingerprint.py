"""The dataset version: a content hash over every file the dataset uses, plus its label names.

Each file contributes (its relative posix path, sha256 of its bytes), in sorted path order, so the same
content in another directory hashes the same and any changed, added, removed or renamed file changes it.
A YOLO data.yaml is left out (its `path` is absolute, so copies would differ); what it means enters
instead: the label names and the split directories relative to the root.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trainers.data.detect import scan_dataset
from trainers.data.images import WORKERS
from trainers.data.scan import Scan, relative

_CHUNK = 1 << 20


def file_digest(path: Path) -> bytes:
    """sha256 of a file's bytes, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
    return digest.digest()


def content_hash(scan: Scan, known: Mapping[Path, bytes] | None = None) -> str:
    """The version of a scanned dataset; `known` holds file digests already computed (while decoding)."""
    known = dict(known or {})
    missing = [p for p in scan.files if p not in known]
    with ThreadPoolExecutor(WORKERS) as pool:
        known.update(zip(missing, pool.map(file_digest, missing), strict=True))
    total = hashlib.sha256(b"trainyard-dataset-v1\0")
    for name, digest in sorted((relative(p, scan.root), known[p]) for p in scan.files):
        total.update(name.encode("utf-8") + b"\0" + digest)
    meaning = {
        "format": scan.format,
        "labels": scan.labels,
        "splits": {split: relative(d, scan.root) for split, d in scan.splits.items()},
    }
    total.update(json.dumps(meaning, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return f"sha256:{total.hexdigest()}"


def fingerprint(path: str | Path) -> str:
    """The dataset version without decoding any image: a cheap-to-trust cache key for validation and training.

    Raises DatasetError only when the layout cannot be made out at all (no dataset, unreadable data.yaml).
    """
    return content_hash(scan_dataset(path))
