"""Oxford-IIIT Pet in its official layout; the image label is the species (cat/dog), the mask the trimap."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from wsseg.data.base import Record, SegmentationDataset, require_dir
from wsseg.data.io import read_gray
from wsseg.errors import DataError

SPLIT_FILES = {"trainval": "trainval.txt", "train": "trainval.txt", "test": "test.txt", "val": "test.txt"}
TRIMAP_FOREGROUND, TRIMAP_BACKGROUND, TRIMAP_BORDER = 1, 2, 3
BORDER_MODES = ("foreground", "background", "ignore")


def download_oxford_pets(root: Path) -> None:
    """Fetch the official archives with torchvision (needs internet) into `root`."""
    from torchvision.datasets import OxfordIIITPet

    root = Path(root)
    if root.name != "oxford-iiit-pet":
        raise DataError(f"oxford_pets: to download, the root folder must be named oxford-iiit-pet, got {root}")
    try:
        OxfordIIITPet(str(root.parent), download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"oxford_pets: download into {root} failed ({exc}); offline, place the official "
                        "images/ and annotations/ folders there") from None


class OxfordPets(SegmentationDataset):
    """`border` decides what the trimap's uncertain border band becomes: foreground (default, the headline
    convention), background, or `ignore`: left out of every score and of supervised training."""

    name = "oxford_pets"

    def __init__(self, root: Path, split: Optional[str] = "test", border: str = "foreground", download: bool = False):
        root = Path(root)
        if download and not (root / "annotations" / "trimaps").is_dir():
            download_oxford_pets(root)
        self.root = require_dir(root, "oxford_pets")
        if border not in BORDER_MODES:
            raise DataError(f"oxford_pets: border must be one of {', '.join(BORDER_MODES)}, got '{border}'")
        self.border = border
        self.split = split or "trainval"
        if self.split not in SPLIT_FILES:
            raise DataError(f"oxford_pets: unknown split '{split}' (valid: {', '.join(SPLIT_FILES)})")
        list_file = self.root / "annotations" / SPLIT_FILES[self.split]
        if not list_file.is_file():
            raise DataError(f"oxford_pets: list file {list_file} does not exist")
        images_dir = require_dir(self.root / "images", "oxford_pets images")
        trimaps_dir = require_dir(self.root / "annotations" / "trimaps", "oxford_pets trimaps")
        records = []
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) < 3:
                raise DataError(f"{list_file}:{number}: expected 'name class species breed', got '{line}'")
            stem, species = parts[0], int(parts[2])
            image_path = images_dir / f"{stem}.jpg"
            if not image_path.is_file():
                raise DataError(f"{list_file}:{number}: image {image_path} does not exist")
            records.append(Record(stem, image_path, species - 1, trimaps_dir / f"{stem}.png"))
        # Both species are pets to segment: no class is object-free (the classifier's task is cat vs dog).
        super().__init__(records, ["cat", "dog"], positive_index=1, object_free=())

    def describe(self) -> str:
        return f"oxford_pets at {self.root}, split {self.split}"

    def read_mask_file(self, path: Path) -> np.ndarray:
        trimap = read_gray(path)
        mask = trimap == TRIMAP_FOREGROUND
        if self.border == "foreground":
            mask |= trimap == TRIMAP_BORDER
        return mask

    def load_ignore(self, index: int) -> Optional[np.ndarray]:
        if self.border != "ignore":
            return None
        return read_gray(self.records[index].mask_path) == TRIMAP_BORDER
