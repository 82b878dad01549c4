"""The dataset contract every registered dataset follows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from wsseg.data.io import image_size, read_binary_mask, read_image
from wsseg.errors import DataError


@dataclass(frozen=True)
class Record:
    """One image: its unique stem (used for output file names), files and image-level label."""

    stem: str
    image_path: Optional[Path]
    label: int
    mask_path: Optional[Path] = None


class SegmentationDataset:
    """A list of records with an image-level label each and, where the dataset has them, masks.

    Subclasses fill `records` and `classes`; datasets without files (synthetic) override
    `load_image` and `load_mask`.

    An image's class and whether it holds an object are two facts: `object_free` lists the classes whose
    images show nothing to segment (polyp datasets: "non-polyp"; the default is every class but
    `positive_index`). Their masks are empty whatever a map shows. Oxford-IIIT Pet has none: a cat photo
    holds a pet as much as a dog photo does.
    """

    name = "base"

    def __init__(self, records: List[Record], classes: List[str], positive_index: int = 1,
                 object_free: Optional[Sequence[int]] = None):
        if not records:
            raise DataError(f"{self.name}: no images found ({self.describe()})")
        self.records = records
        self.classes = classes
        self.positive_index = positive_index
        self.object_free = frozenset(
            (i for i in range(len(classes)) if i != positive_index) if object_free is None else object_free)
        stems = [r.stem for r in records]
        if len(set(stems)) != len(stems):
            dup = sorted({s for s in stems if stems.count(s) > 1})[:5]
            raise DataError(f"{self.name}: image stems are not unique, e.g. {dup}")

    def describe(self) -> str:
        return self.name

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_masks(self) -> bool:
        return all(r.mask_path is not None for r in self.records)

    def image_name(self, index: int) -> str:
        """The image's file (or stem, for generated images): what an error message names."""
        record = self.records[index]
        return str(record.image_path) if record.image_path is not None else record.stem

    def holds_object(self, index: int) -> bool:
        """Whether image `index` may show an object (its class is not an object-free one)."""
        return self.records[index].label not in self.object_free

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    #: Decoded images kept across epochs and stages (wsseg.data.image_cache), set by a run's DatasetCatalog.
    image_cache = None

    def load_image(self, index: int, max_side: Optional[int] = None) -> np.ndarray:
        """HxWx3 uint8 RGB. With `max_side`, a large image may come back smaller (never below max_side)."""
        path = self.records[index].image_path
        if self.image_cache is None:
            return read_image(path, max_side)
        return self.image_cache.read(path, max_side, lambda: read_image(path, max_side))

    def image_size(self, index: int) -> tuple:
        return image_size(self.records[index].image_path)

    def load_mask(self, index: int) -> Optional[np.ndarray]:
        """Boolean HxW mask of the same size as the image, or None when the dataset has none."""
        record = self.records[index]
        if record.mask_path is None:
            return None
        mask = self.read_mask_file(record.mask_path)
        expected = self.image_size(index)
        if mask.shape != tuple(expected):
            raise DataError(
                f"{record.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{record.image_path} is {expected[1]}x{expected[0]}"
            )
        return mask

    def read_mask_file(self, path: Path) -> np.ndarray:
        return read_binary_mask(path)

    def load_ignore(self, index: int) -> Optional[np.ndarray]:
        """Boolean HxW of pixels left out of scores and of supervised training (None: none are)."""
        return None

    def spread(self, n: int) -> List[int]:
        """`n` image indices spread evenly from the first image to the last (all of them if there are fewer):
        the fixed sample that calibration, benches and report grids take."""
        return np.linspace(0, len(self) - 1, min(n, len(self))).astype(int).tolist()

    def subset(self, limit: Optional[int]) -> "SegmentationDataset":
        """Keep the first `limit` records, spread over the classes (for quick runs)."""
        if limit is None or limit >= len(self.records):
            return self
        by_class = {}
        for r in self.records:
            by_class.setdefault(r.label, []).append(r)
        picked, i = [], 0
        while len(picked) < limit:
            for rs in by_class.values():
                if i < len(rs) and len(picked) < limit:
                    picked.append(rs[i])
            i += 1
        order = {r.stem: k for k, r in enumerate(self.records)}
        self.records = sorted(picked, key=lambda r: order[r.stem])
        return self


class ConcatDataset(SegmentationDataset):
    """Several datasets read as one (e.g. CCAM or U-Net training on two image sources)."""

    name = "concat"

    def __init__(self, parts: List[SegmentationDataset]):
        self.parts = parts
        self.index = [(p, i) for p in parts for i in range(len(p))]
        seen: Dict[str, SegmentationDataset] = {}
        for part in parts:
            for record in part.records:
                first = seen.setdefault(record.stem, part)
                if first is not part:
                    raise DataError(f"{first.describe()} and {part.describe()} both have an image named "
                                    f"'{record.stem}': maps and masks are saved by file stem, so the stems of "
                                    "datasets read together must differ")
        super().__init__([p.records[i] for p, i in self.index], parts[0].classes, parts[0].positive_index,
                         parts[0].object_free)

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.parts)

    @property
    def has_masks(self) -> bool:
        return all(p.has_masks for p in self.parts)

    def load_image(self, index: int, max_side: Optional[int] = None) -> np.ndarray:
        part, i = self.index[index]
        return part.load_image(i, max_side)

    def load_mask(self, index: int):
        part, i = self.index[index]
        return part.load_mask(i)

    def load_ignore(self, index: int):
        part, i = self.index[index]
        return part.load_ignore(i)

    def image_size(self, index: int) -> tuple:
        part, i = self.index[index]
        return part.image_size(i)


def concat_datasets(parts: List[SegmentationDataset]) -> SegmentationDataset:
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what}: folder {path} does not exist (set --data-root or WSSEG_DATA, or fix the recipe's root)")
    return path


def list_images(folder: Path) -> List[Path]:
    from wsseg.data.io import IMAGE_EXTENSIONS

    return sorted(
        (p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: _natural_key(p.name),
    )


def _natural_key(name: str):
    import re

    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]
