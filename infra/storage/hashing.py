"""A download target that hashes its bytes while they arrive, so verifying a download costs little extra time.

s3transfer fetches a large object as concurrent ranged GETs and writes each piece at its offset (seek + write from
its IO thread), out of order across ranges. This file tracks how far the bytes are complete from offset 0; a
background thread hashes that prefix as it grows, reading it back from the page cache (hashlib releases the GIL,
so the hashing runs beside the transfer). When the transfer ends only the tail is left to hash.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

CHUNK = 1 << 20


class HashingFile:
    def __init__(self, path: Path, algorithm: str | None) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._digest = hashlib.new(algorithm) if algorithm else None
        self._position = 0
        self._complete = 0  # bytes [0, _complete) are written and final
        self._pieces: dict[int, int] = {}  # written pieces past a gap: start -> end
        self._done = False
        self._changed = threading.Condition()
        self._hasher = threading.Thread(target=self._hash, name="trainyard-hash", daemon=True)
        if self._digest:
            self._hasher.start()

    # --- the file interface s3transfer uses ---------------------------------------------------------------------

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise ValueError("HashingFile seeks to absolute offsets only")
        self._position = offset
        return offset

    def tell(self) -> int:
        return self._position

    def write(self, data: bytes) -> int:
        start, view = self._position, memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, self._position)
            view, self._position = view[written:], self._position + written
        with self._changed:
            if start <= self._complete:
                self._complete = max(self._complete, self._position)
                while (end := self._pieces.pop(self._complete, None)) is not None:
                    self._complete = max(self._complete, end)
                self._changed.notify()
            else:  # a retried range writes the same bytes again: keep the longest piece
                self._pieces[start] = max(self._pieces.get(start, 0), self._position)
        return len(data)

    # --- hashing ------------------------------------------------------------------------------------------------

    def _hash(self) -> None:
        hashed = 0
        while True:
            with self._changed:
                while hashed == self._complete and not self._done:
                    self._changed.wait()
                end, done = self._complete, self._done
            while hashed < end:
                chunk = os.pread(self._fd, min(CHUNK, end - hashed), hashed)
                if not chunk:  # shorter than promised: the digest comes out wrong and verification says so
                    return
                self._digest.update(chunk)
                hashed += len(chunk)
            if done and hashed >= end:
                return

    def finish(self, transferred: bool) -> str | None:
        """Close the file; the hex digest of all its bytes when the transfer completed, else None."""
        with self._changed:
            self._done = True
            if transferred:  # every byte is in place now, gaps or not
                self._complete = max(self._complete, os.fstat(self._fd).st_size)
            self._changed.notify()
        if self._digest:
            self._hasher.join()
        os.close(self._fd)
        return self._digest.hexdigest() if self._digest and transferred else None
