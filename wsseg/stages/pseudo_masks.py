"""Stage 3: maps -> binary pseudo-masks at each image's own size; blind references alike."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from wsseg.data.base import SegmentationDataset
from wsseg.data.io import write_mask_png
from wsseg.progress import ProgressFn, no_progress
from wsseg.stages.maps import load_map
from wsseg.stages.references import REFERENCE_PRODUCERS


def resize_map(activation: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize to (height, width), then min-max normalisation to [0, 1]."""
    resized = cv2.resize(activation.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    low, high = float(resized.min()), float(resized.max())
    return (resized - low) / (high - low) if high > low else np.zeros_like(resized)


def map_to_mask(activation: np.ndarray, height: int, width: int, threshold: float) -> np.ndarray:
    return resize_map(activation, height, width) >= threshold


def make_pseudo_masks(map_dir: Path, dataset: SegmentationDataset, out_dir: Path, threshold: float = 0.58,
                      progress: ProgressFn = no_progress) -> Path:
    """Threshold every map of `map_dir` into `out_dir/<stem>.png` (0/255, image-sized)."""
    map_dir, out_dir = Path(map_dir), Path(out_dir)
    for i in progress(range(len(dataset)), total=len(dataset), description=f"masks {map_dir.name}"):
        stem = dataset.records[i].stem
        height, width = dataset.image_size(i)
        write_mask_png(out_dir / f"{stem}.png", map_to_mask(load_map(map_dir / f"{stem}.npy"), height, width, threshold))
    return out_dir


def make_reference_masks(name: str, dataset: SegmentationDataset, out_dir: Path,
                         progress: ProgressFn = no_progress) -> Path:
    producer = REFERENCE_PRODUCERS.get(name)
    out_dir = Path(out_dir)
    for i in progress(range(len(dataset)), total=len(dataset), description=f"masks {name}"):
        write_mask_png(out_dir / f"{dataset.records[i].stem}.png", producer(*dataset.image_size(i)))
    return out_dir
