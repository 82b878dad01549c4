"""Kvasir-SEG in its official layout: images/*.jpg, masks/*.jpg, optional splits/<split>.txt."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from wsseg.data.base import Record, SegmentationDataset, list_images, require_dir
from wsseg.data.io import read_binary_mask
from wsseg.errors import DataError


class KvasirSeg(SegmentationDataset):
    """Every Kvasir-SEG image shows a polyp, so every label is positive; masks are JPEG (binarised at 127)."""

    name = "kvasir_seg"

    def __init__(self, root: Path, split: Optional[str] = None, mask_threshold: int = 127):
        self.root = require_dir(root, "kvasir_seg")
        self.split = split
        self.mask_threshold = mask_threshold
        images_dir = require_dir(self.root / "images", "kvasir_seg images")
        masks_dir = require_dir(self.root / "masks", "kvasir_seg masks")
        by_stem = {p.stem: p for p in list_images(images_dir)}
        if split is not None:
            split_file = self.root / "splits" / f"{split}.txt"
            if not split_file.is_file():
                raise DataError(f"kvasir_seg: split file {split_file} does not exist")
            stems = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
            missing = [s for s in stems if s not in by_stem]
            if missing:
                raise DataError(f"{split_file}: names {len(missing)} images missing from {images_dir}, e.g. {missing[:3]}")
        else:
            stems = list(by_stem)
        records = []
        for stem in stems:
            image_path = by_stem[stem]
            mask_path = next((m for m in (masks_dir / f"{stem}{ext}" for ext in (".jpg", ".png", image_path.suffix)) if m.is_file()), None)
            if mask_path is None:
                raise DataError(f"kvasir_seg: no mask for {image_path} in {masks_dir}")
            records.append(Record(stem, image_path, 1, mask_path))
        super().__init__(records, ["non-polyp", "polyp"], positive_index=1)

    def describe(self) -> str:
        return f"kvasir_seg at {self.root}, split {self.split}"

    def read_mask_file(self, path: Path):
        return read_binary_mask(path, self.mask_threshold)
