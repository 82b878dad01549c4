"""Decoded images kept inside a run folder (`image_cache: true`), so each image file is decoded once per size.

Training decodes every image again each epoch and each self-training round predicts every image again; with a
cache those become array reads. An entry is what `read_image(path, max_side)` returned, byte for byte, so a run
with the cache makes the same numbers as one without. It is keyed by the decode size and the file's identity
(resolved path, size, modification time): a changed image is decoded again. Full-size
decodes (refinements that need the original pixels, made once per mask) are not kept: they are the large ones.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np


def file_identity(path: Path) -> str:
    """What makes a cached decode of `path` stale when it changes: the file's resolved path, size and mtime."""
    stat = Path(path).stat()
    text = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ImageCache:
    """`folder/<max_side>/<file identity>.npy`: one decoded image per file version and decode size. An entry
    is named by the file, not the image's stem, so datasets read together never share one; an image changed in
    place gets a new entry (the old one stays until the run folder is removed)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def entry(self, path: Path, max_side: int) -> Path:
        return self.folder / str(max_side) / f"{file_identity(path)}.npy"

    def read(self, path: Path, max_side: Optional[int], decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The image `decode()` gives, from the cache when an entry for this file and size is there."""
        if max_side is None:
            return decode()
        entry = self.entry(path, max_side)
        try:
            image = np.load(entry)
            self.hits += 1
            return image
        except (OSError, ValueError, EOFError):  # no entry yet, or an unreadable one: decode (again)
            pass
        self.misses += 1
        image = decode()
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.stem}.{os.getpid()}.tmp.npy")  # data-loader workers write too
        np.save(tmp, image)
        os.replace(tmp, entry)
        return image


__all__ = ["ImageCache", "file_identity"]
