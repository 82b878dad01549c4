"""Stage 3: maps -> binary pseudo-masks at each image's own size; refined variants; blind references."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from wsseg.data.base import SegmentationDataset
from wsseg.data.io import write_mask_png
from wsseg.errors import about
from wsseg.metrics import dice
from wsseg.progress import ProgressFn, no_progress
from wsseg.refine import needs_image, needs_source_map, refine_map, threshold_and_clean
from wsseg.stages.maps import load_map
from wsseg.stages.references import REFERENCE_PRODUCERS


def resize_map(activation: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize to (height, width), then min-max normalisation to [0, 1]."""
    resized = cv2.resize(activation.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    low, high = float(resized.min()), float(resized.max())
    return (resized - low) / (high - low) if high > low else np.zeros_like(resized)


def map_to_mask(activation: np.ndarray, height: int, width: int, threshold: float) -> np.ndarray:
    return resize_map(activation, height, width) >= threshold


@dataclass
class RefinedMap:
    """A rule's refined map (image-sized, before the threshold), with the image and the unrefined source
    map when its mask steps use them (GrabCut)."""

    activation: np.ndarray
    image: Optional[np.ndarray] = None
    source_map: Optional[np.ndarray] = None


@dataclass
class MaskRule:
    """How one producer's masks come from saved maps: source map, refinement steps, threshold rule."""

    source: str
    threshold: float = 0.58
    threshold_mode: str = "fixed"
    steps: Sequence = field(default_factory=list)

    @property
    def maps_needed(self) -> List[str]:
        return [self.source] + [s.other for s in self.steps if getattr(s, "other", None)]

    def refined(self, dataset: SegmentationDataset, index: int, map_dirs: Dict[str, Path]) -> RefinedMap:
        """The refined map at the image's size, before thresholding, with what the mask steps need."""
        with about(image=lambda: dataset.image_name(index)):
            return self._refined(dataset, index, map_dirs)

    def apply(self, dataset: SegmentationDataset, index: int, map_dirs: Dict[str, Path]) -> Tuple[RefinedMap, np.ndarray]:
        """The refined map and the mask of one image; an error on the way names the image."""
        with about(image=lambda: dataset.image_name(index)):
            refined = self.refined(dataset, index, map_dirs)
            return refined, self.mask(refined)

    def _refined(self, dataset: SegmentationDataset, index: int, map_dirs: Dict[str, Path]) -> RefinedMap:
        stem = dataset.records[index].stem
        height, width = dataset.image_size(index)
        maps = {name: resize_map(load_map(Path(map_dirs[name]) / f"{stem}.npy"), height, width)
                for name in self.maps_needed}
        image = dataset.load_image(index) if needs_image(self.steps) else None
        activation = refine_map(maps[self.source], image, self.steps, maps)
        return RefinedMap(activation, image, maps[self.source] if needs_source_map(self.steps) else None)

    def mask(self, refined: Union[RefinedMap, np.ndarray], threshold: Optional[float] = None) -> np.ndarray:
        if not isinstance(refined, RefinedMap):
            refined = RefinedMap(refined)
        return threshold_and_clean(refined.activation, self.steps, self.threshold if threshold is None else threshold,
                                   self.threshold_mode, refined.image, refined.source_map)


def write_rule_masks(rule: MaskRule, dataset: SegmentationDataset, map_dirs: Dict[str, Path], out_dir: Path,
                     progress: ProgressFn = no_progress, description: str = "masks",
                     indices: Optional[Sequence[int]] = None, workers: int = 1) -> Path:
    """Apply `rule` to every image (or `indices`) and write `out_dir/<stem>.png` (0/255, image-sized), the
    images shared among `workers` processes (wsseg.parallel: the same masks, sooner when the rule refines)."""
    from wsseg.confidence import ConfidenceLog, mask_confidence
    from wsseg.parallel import process_map
    from wsseg.refine import otsu_threshold

    out_dir = Path(out_dir)
    indices = list(range(len(dataset))) if indices is None else list(indices)

    def write(i: int) -> Tuple[str, float]:
        stem = dataset.records[i].stem
        refined, mask = rule.apply(dataset, i, map_dirs)
        write_mask_png(out_dir / f"{stem}.png", mask)
        level = otsu_threshold(refined.activation) if rule.threshold_mode == "otsu" else rule.threshold
        return stem, mask_confidence(refined.activation, level)

    confidence = ConfidenceLog(out_dir)
    confidence.values.update(process_map(write, indices, workers if rule.steps else 1, progress, description))
    confidence.save()
    return out_dir


def calibrate_threshold(rule: MaskRule, dataset: SegmentationDataset, map_dirs: Dict[str, Path],
                        grid: Sequence[float]) -> Tuple[float, Dict[float, float]]:
    """The grid threshold with the best mean Dice on `dataset` (a few labelled images, not the test set)."""
    refined = [rule.refined(dataset, i, map_dirs) for i in range(len(dataset))]
    truths = [dataset.load_mask(i) for i in range(len(dataset))]
    fixed = MaskRule(rule.source, rule.threshold, "fixed", rule.steps)
    return best_grid_threshold(grid, truths, lambda t: [fixed.mask(a, t) for a in refined])


def best_grid_threshold(grid: Sequence[float], truths: Sequence[np.ndarray],
                        masks_at: Callable[[float], Sequence[np.ndarray]]) -> Tuple[float, Dict[float, float]]:
    """The `grid` value whose masks (`masks_at(t)`, one per truth) have the best mean Dice against `truths`
    (ties go to the first), and the mean Dice of every grid value."""
    curve = {float(t): float(np.mean([dice(mask, truth) for mask, truth in zip(masks_at(t), truths)])) for t in grid}
    return max(curve, key=curve.get), curve


def make_reference_masks(name: str, dataset: SegmentationDataset, out_dir: Path,
                         progress: ProgressFn = no_progress) -> Path:
    producer = REFERENCE_PRODUCERS.get(name)
    out_dir = Path(out_dir)
    for i in progress(range(len(dataset)), total=len(dataset), description=f"masks {name}"):
        write_mask_png(out_dir / f"{dataset.records[i].stem}.png", producer(*dataset.image_size(i)))
    return out_dir
