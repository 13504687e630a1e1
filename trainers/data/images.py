"""Finding image files and checking that each one fully decodes."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from trainers.data.scan import relative

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# Files that operating systems drop into folders; they are not part of a dataset.
_OS_LITTER = frozenset({"thumbs.db", "desktop.ini"})
_IN_MEMORY_LIMIT = 64 << 20  # larger files are decoded from disk and hashed in a second, streamed read
WORKERS = min(16, 2 * (os.cpu_count() or 1))  # Pillow and hashlib release the GIL while they work


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def is_ignorable(name: str) -> bool:
    """Hidden files and folders (.DS_Store, .ipynb_checkpoints, ._forks) and OS litter are skipped."""
    return name.startswith(".") or name.lower() in _OS_LITTER


def walk_files(directory: Path) -> list[Path]:
    """Every non-ignorable file under directory, recursively, in a stable order."""
    found: list[Path] = []
    for parent, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not is_ignorable(d))
        found.extend(Path(parent, f) for f in sorted(files) if not is_ignorable(f))
    return found


def inspect_image(path: Path, root: Path) -> tuple[str | None, bytes | None]:
    """(defect or None, sha256 of the file): one read of the bytes serves both the decode and the version."""
    name = relative(path, root)
    try:
        size = path.stat().st_size
        data = path.read_bytes() if 0 < size <= _IN_MEMORY_LIMIT else None
    except OSError as exc:  # a broken link, no permission, an I/O error: the file itself, not its contents
        return (
            f"{name}: cannot be read ({exc.strerror or type(exc).__name__}); fix the file or its permissions "
            "(a link must point at an image), or remove it",
            None,
        )
    if size == 0:
        return f"{name}: empty file (0 bytes); re-export the image or remove it", None
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: catches truncated and corrupt files that open() alone accepts
    # UnidentifiedImageError's text names an in-memory buffer, not the file. ModuleNotFoundError: Pillow's own
    # formats did not match, and an opener another library registered lacks its module (Ultralytics' HEIF one,
    # without pi_heif): these bytes are in no format this machine reads either way.
    except (UnidentifiedImageError, ModuleNotFoundError):
        return (
            f"{name}: cannot be decoded as an image (its bytes are in no image format Pillow reads); re-export it "
            "or remove it",
            None,
        )
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError...) for bad files
        return (
            f"{name}: cannot be decoded as an image ({type(exc).__name__}: {exc}); re-export it or remove it",
            None,
        )
    return None, None if data is None else hashlib.sha256(data).digest()


def inspect_images(paths: Sequence[Path], root: Path) -> tuple[list[str], dict[Path, bytes]]:
    """Decode every image; return the defects and the digests already computed on the way."""
    defects: list[str] = []
    digests: dict[Path, bytes] = {}
    with ThreadPoolExecutor(WORKERS) as pool:
        for path, (defect, digest) in zip(paths, pool.map(lambda p: inspect_image(p, root), paths), strict=True):
            if defect:
                defects.append(defect)
            elif digest is not None:
                digests[path] = digest
    return defects, digests
