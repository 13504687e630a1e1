"""A directory as storage: the same operations as S3, for one machine or a shared filesystem.

The sha256 of each stored file lies beside it in `<name>.sha256` (`sha256sum -c` format); writes go to a temporary
name in the same directory and are renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from urllib.parse import unquote, urlparse

from infra.storage.objects import ChecksumError, StorageError, StoredObject, SyncResult, check_key

CHUNK = 8 * 1024 * 1024


def _copy(src: Path, dest: Path) -> tuple[str, Path]:
    """Copy src to a temporary name beside dest; return the sha256 of the bytes copied and the temporary path."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    digest = hashlib.sha256()
    try:
        with open(src, "rb") as reader, open(tmp, "wb") as writer:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                writer.write(chunk)
        return digest.hexdigest(), tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    tmp.write_text(text)
    os.replace(tmp, path)


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    @classmethod
    def from_uri(cls, uri: str) -> LocalStorage:
        return cls(Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri))

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def upload_file(
        self, path: Path, key: str, *, pointer: str | None = None, sha256: str | None = None
    ) -> StoredObject:
        dest = self._path(key)
        digest, tmp = _copy(Path(path), dest)  # the copy hashes anyway: a given sha256 is checked, not trusted
        if sha256 and digest != sha256:
            tmp.unlink(missing_ok=True)
            raise ChecksumError(f"{path} does not have the sha256 given ({sha256}); it has {digest}. Nothing stored.")
        os.replace(tmp, dest)
        _write_atomic(dest.with_name(dest.name + ".sha256"), f"{digest}  {dest.name}\n")
        stored = StoredObject(key, dest.stat().st_size, digest, dest.as_uri())
        if pointer:
            _write_atomic(self._path(pointer), stored.to_json())
        return stored

    def download_file(self, key: str, dest: Path, *, sha256: str | None = None) -> Path:
        src, dest = self._path(key), Path(dest)
        if not src.is_file():
            raise StorageError(f"No file at {src.as_uri()}: check the key, or upload it first.")
        sidecar = src.with_name(src.name + ".sha256")
        expected = sha256 or (sidecar.read_text().split()[0] if sidecar.exists() else None)
        digest, tmp = _copy(src, dest)
        if expected and digest != expected:
            tmp.unlink(missing_ok=True)
            raise ChecksumError(
                f"{src.as_uri()} does not match its sha256 (expected {expected}, read {digest}); nothing was written "
                f"to {dest}. The stored file is corrupt or was changed: upload it again."
            )
        os.replace(tmp, dest)
        return dest

    def read_pointer(self, pointer: str) -> StoredObject | None:
        path = self._path(pointer)
        return StoredObject.from_json(path.read_text()) if path.exists() else None

    def presigned_url(self, key: str, expires_s: int | None = None) -> str:
        """A file:// URL: a local path needs no signature and does not expire."""
        return self._path(key).as_uri()

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)

    def sync_to_cache(self, cache_root: Path) -> SyncResult:
        """A local dataset is used where it is: nothing is copied."""
        if not self.root.is_dir():
            raise StorageError(f"Dataset directory {self.root} does not exist: check the path or the URI.")
        return SyncResult(path=self.root)
