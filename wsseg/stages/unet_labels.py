"""What each U-Net learns from: pseudo-masks made from maps, the real masks (the supervised upper bound),
or, in a self-training round, the previous U-Net's refined predictions. Labels are uint8 masks, 0/1 with
IGNORE for pixels left out of the loss; refinements that need the full-size image are cached per mask."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np

from wsseg.data.base import SegmentationDataset
from wsseg.errors import about
from wsseg.progress import ProgressFn, no_progress
from wsseg.refine import needs_image, refine_map, threshold_and_clean
from wsseg.stages.pseudo_masks import MaskRule

IGNORE = 255


def pseudo_mask_source(dataset: SegmentationDataset, rule: Optional[MaskRule] = None,
                       map_dirs: Optional[Dict[str, Path]] = None,
                       ignore_band: Optional[List[float]] = None,
                       cache_dir: Optional[Path] = None) -> Callable[[int], np.ndarray]:
    """index -> uint8 mask (0/1, 255 = ignored) from saved maps through `rule`, or the real masks when
    `rule` is None. Images of an object-free class get an empty mask whatever their map shows.

    With `cache_dir`, each mask is computed once and kept as `<stem>.png`: refinements such as the dense
    CRF need the full-size image and would otherwise run again every epoch. The folder must be specific
    to the rule (the runner names it by the rule's fingerprint).
    """
    def from_ground_truth(index: int) -> np.ndarray:
        mask = dataset.load_mask(index).astype(np.uint8)
        ignore = dataset.load_ignore(index)
        if ignore is not None:
            mask[ignore] = IGNORE
        return mask

    def compute(index: int) -> np.ndarray:
        if not dataset.holds_object(index):
            return np.zeros(dataset.image_size(index), np.uint8)
        refined, mask = rule.apply(dataset, index, map_dirs)
        mask = mask.astype(np.uint8)
        if ignore_band is not None:
            activation = refined.activation
            mask[(activation >= ignore_band[0]) & (activation < ignore_band[1])] = IGNORE
        return mask

    return from_ground_truth if rule is None else cached_masks(compute, cache_dir, dataset)


def cached_masks(compute: Callable[[int], np.ndarray], cache_dir: Optional[Path],
                 dataset: SegmentationDataset) -> Callable[[int], np.ndarray]:
    """`compute` with each mask kept as `cache_dir/<image stem>.png` after its first call (none kept without
    `cache_dir`). The folder must be specific to what `compute` does: the runner names it by a fingerprint.
    The returned source carries `cached_path(index)`, so `fill_label_cache` can compute its masks ahead, in parallel."""
    if cache_dir is None:
        return compute

    def source(index: int) -> np.ndarray:
        cached = cached_path(index)
        if cached.is_file():
            mask = cv2.imread(str(cached), cv2.IMREAD_UNCHANGED)
            if mask is not None:
                return mask
        mask = compute(index)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.stem}.{os.getpid()}.tmp.png")  # data-loader workers write too
        cv2.imwrite(str(tmp), mask)
        os.replace(tmp, cached)
        return mask

    def cached_path(index: int) -> Path:
        return Path(cache_dir) / f"{dataset.records[index].stem}.png"

    source.cached_path = cached_path
    return source


def fill_label_cache(labels: Callable[[int], np.ndarray], indices: Sequence[int], workers: int,
                     progress: ProgressFn = no_progress) -> int:
    """Compute the not yet cached masks of `indices` in `workers` processes (wsseg.parallel) before training
    reads them: the dense CRF and GrabCut of the labels are single-threaded, and would otherwise run one image
    at a time inside the first epoch. Each worker writes its masks' cache files as the first read would. A
    source without a cache has nothing to compute ahead. Returns how many masks were computed."""
    from wsseg.parallel import process_map

    cached_path = getattr(labels, "cached_path", None)
    if cached_path is None or workers <= 1:
        return 0
    todo = [i for i in indices if not cached_path(i).is_file()]
    process_map(lambda index: labels(index) is None, todo, workers, progress, "labels")
    return len(todo)


def confident_mask_source(dataset: SegmentationDataset, prob_dir: Path, band: List[float],
                          refine: Sequence = (), cache_dir: Optional[Path] = None,
                          threshold: float = 0.5) -> Callable[[int], np.ndarray]:
    """Self-training labels from saved U-Net probabilities: thresholded at `threshold` after the `refine`
    steps (wsseg.refine; GrabCut sees the probability as its source map), pixels whose probability lies
    inside `band` ignored."""
    def compute(index: int) -> np.ndarray:
        height, width = dataset.image_size(index)
        if not dataset.holds_object(index):
            return np.zeros((height, width), np.uint8)
        saved = np.load(Path(prob_dir) / f"{dataset.records[index].stem}.npy").astype(np.float32)
        prob = cv2.resize(saved, (width, height), interpolation=cv2.INTER_LINEAR)
        mask = refined_mask(prob, dataset, index, refine, threshold).astype(np.uint8)
        mask[(prob > band[0]) & (prob < band[1])] = IGNORE
        return mask

    return cached_masks(compute, cache_dir, dataset)


def refined_mask(prob: np.ndarray, dataset: SegmentationDataset, index: int, refine: Sequence = (),
                 threshold: float = 0.5) -> np.ndarray:
    """A U-Net probability (at the image's size) through `refine` steps and `threshold`: a boolean mask."""
    if not refine:
        return prob >= threshold
    with about(image=lambda: dataset.image_name(index)):
        image = dataset.load_image(index) if needs_image(refine) else None
        return threshold_and_clean(refine_map(prob, image, refine), refine, threshold, "fixed", image, prob) > 0


def corrected_mask_files(folder: Path) -> Dict[str, Path]:
    """{image stem: mask file} of a folder of corrected masks (`<stem>.png`)."""
    from wsseg.errors import WssegError

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise WssegError(f"segment.corrected_masks: folder {folder} does not exist")
    return {p.stem: p for p in sorted(folder.glob("*.png"))}


def corrections_digest(files: Dict[str, Path]) -> str:
    """What the corrections are, for the U-Net's fingerprint: a changed, added or removed mask retrains."""
    import hashlib

    digest = hashlib.sha256()
    for stem, path in sorted(files.items()):
        digest.update(stem.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


def with_corrections(source: Callable[[int], np.ndarray], dataset: SegmentationDataset,
                     files: Dict[str, Path]) -> Callable[[int], np.ndarray]:
    """`source` with the corrected mask (0/1, nothing ignored) for every image that has one. A correction
    must have its image's size: it is a person's answer for that image, never resized."""
    from wsseg.data.io import read_binary_mask
    from wsseg.errors import DataError

    if not files:
        return source

    def labels(index: int) -> np.ndarray:
        path = files.get(dataset.records[index].stem)
        if path is None:
            return source(index)
        mask = read_binary_mask(path)
        if mask.shape != tuple(dataset.image_size(index)):
            raise DataError(f"{path}: corrected mask is {mask.shape[1]}x{mask.shape[0]}, its image "
                            f"{dataset.image_name(index)} is {dataset.image_size(index)[1]}x{dataset.image_size(index)[0]}")
        return mask.astype(np.uint8)

    if hasattr(source, "cached_path"):  # a corrected image's cached pseudo-mask is never read: none to fill
        labels.cached_path = lambda index: (Path(files[dataset.records[index].stem])
                                            if dataset.records[index].stem in files else source.cached_path(index))
    return labels


__all__ = ["IGNORE", "cached_masks", "confident_mask_source", "corrected_mask_files", "corrections_digest",
           "fill_label_cache", "pseudo_mask_source", "refined_mask", "with_corrections"]
