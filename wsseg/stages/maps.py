"""Stage 2: activation maps for every image of a dataset, in batches, saved per method."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from wsseg.cams import MapMethod
from wsseg.data.base import SegmentationDataset
from wsseg.progress import ProgressFn, no_progress
from wsseg.stages.common import eval_loader

log = logging.getLogger("wsseg")


def save_map(path: Path, activation: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npy")
    np.save(tmp, activation.astype(np.float16))
    tmp.replace(path)


def load_map(path: Path) -> np.ndarray:
    return np.load(path).astype(np.float32)


def resolve_target(mode: str, dataset: SegmentationDataset) -> str:
    """`auto`: the positive class when some classes are object-free, else each image's own label."""
    if mode != "auto":
        return mode
    return "positive" if dataset.object_free else "label"


def choose_targets(mode: str, dataset: SegmentationDataset, positive_index: int,
                   predicted: np.ndarray = None) -> np.ndarray:
    """Class each map explains: the positive class, each image's own label, or the predicted class."""
    mode = resolve_target(mode, dataset)
    if mode == "positive":
        return np.full(len(dataset), positive_index, dtype=np.int64)
    if mode == "label":
        return dataset.labels
    if mode == "predicted":
        if predicted is None:
            raise ValueError("maps.target=predicted needs the classifier's predictions")
        return np.asarray(predicted, dtype=np.int64)
    raise ValueError(f"maps.target: unknown mode '{mode}' (valid: positive, label, predicted, auto)")


#: Images a fitted map method (feature factorisation) learns from: a fixed sample beyond this many.
FIT_IMAGES = 256


def fit_map_method(method: MapMethod, dataset: SegmentationDataset, indices: Sequence[int], image_size: int,
                   mean: Sequence[float], std: Sequence[float], device: torch.device, batch_size: int = 16,
                   num_workers: int = 0, max_images: int = FIT_IMAGES) -> MapMethod:
    """Fit `method` on the images it will map (a fixed sample of at most `max_images`), if it learns at all.

    Every rank passes the same `indices` (not its shard), so all ranks fit the same model."""
    if not method.needs_fit:
        return method
    indices = list(indices)
    if len(indices) > max_images:
        indices = sorted(int(i) for i in np.random.RandomState(0).choice(indices, max_images, replace=False))
    loader = eval_loader(dataset, image_size, mean, std, batch_size, indices, num_workers)
    return method.fit(batch["image"].to(device) for batch in loader)


def write_maps(method: MapMethod, dataset: SegmentationDataset, out_dir: Path, image_size: int,
               mean: Sequence[float], std: Sequence[float], targets: np.ndarray, device: torch.device,
               batch_size: int = 16, num_workers: int = 0, progress: ProgressFn = no_progress,
               description: str = "maps", indices: Optional[Sequence[int]] = None) -> Path:
    """Run `method` over `dataset` (or its `indices`, e.g. this rank's shard) in batches and save
    `out_dir/<stem>.npy` (float16, image_size^2)."""
    out_dir = Path(out_dir)
    loader = eval_loader(dataset, image_size, mean, std, batch_size, indices, num_workers)
    for batch in progress(loader, total=len(loader), description=description):
        batch_indices = batch["index"].tolist()
        maps = method.compute(batch["image"].to(device), [int(targets[i]) for i in batch_indices])
        for i, activation in zip(batch_indices, maps):
            save_map(out_dir / f"{dataset.records[i].stem}.npy", activation)
    return out_dir
