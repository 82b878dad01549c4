"""Choosing a map method on a few labelled images: which method, layer, input size and threshold rule.

`score_map_methods` computes each candidate's maps for a fixed random sample of a labelled dataset
(use training images, never the images a table reports on) and scores their masks at several fixed
thresholds, at each image's Otsu threshold, and at the best threshold per image (an "oracle" that
shows how much any threshold rule could still gain from these maps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from wsseg.cams import create_map_method
from wsseg.cams.tta import TTAMaps
from wsseg.data.base import SegmentationDataset
from wsseg.errors import DataError
from wsseg.metrics import dice
from wsseg.models.classifier import load_classifier
from wsseg.progress import ProgressFn, no_progress
from wsseg.refine import otsu_threshold
from wsseg.stages.common import eval_loader
from wsseg.stages.maps import fit_map_method
from wsseg.stages.pseudo_masks import resize_map

TTA_SCALES = (0.7, 1.0)
ORACLE_GRID = np.round(np.linspace(0.05, 0.95, 19), 2)


@dataclass
class MapCandidate:
    method: str
    layer: str = "auto"
    image_size: int = 224
    tta: bool = False  # horizontal flip and `tta_scales`, averaged
    tta_scales: Tuple[float, ...] = TTA_SCALES

    @property
    def label(self) -> str:
        tta = f" tta {'/'.join(f'{s:g}' for s in self.tta_scales)}" if self.tta else ""
        return f"{self.method}@{self.layer} {self.image_size}px{tta}"


@dataclass
class MapScore:
    candidate: MapCandidate
    dice: Dict[str, float] = field(default_factory=dict)  # rule ("0.30", "otsu", "oracle") -> mean Dice
    seconds: float = 0.0

    @property
    def best_rule(self) -> str:
        return max((k for k in self.dice if k != "oracle"), key=self.dice.get)


def sample_indices(dataset: SegmentationDataset, n_images: int, seed: int = 0) -> List[int]:
    """A fixed random sample of the dataset's images (all of them need masks)."""
    if not dataset.has_masks:
        raise DataError(f"{dataset.describe()}: has no masks to score maps against; use a labelled dataset")
    return sorted(int(i) for i in np.random.RandomState(seed).permutation(len(dataset))[:n_images])


def score_maps(maps: Dict[int, np.ndarray], truths: Dict[int, np.ndarray],
               thresholds: Sequence[float]) -> Dict[str, float]:
    """Mean Dice per threshold rule for maps already computed (index -> map, any size)."""
    per_rule: Dict[str, List[float]] = {f"{t:.2f}": [] for t in thresholds}
    per_rule["otsu"], per_rule["oracle"] = [], []
    for index, truth in truths.items():
        activation = resize_map(maps[index], *truth.shape)
        for t in thresholds:
            per_rule[f"{t:.2f}"].append(dice(activation >= t, truth))
        level = round(otsu_threshold(activation) * 255)
        per_rule["otsu"].append(dice((activation * 255).astype(np.uint8) > level, truth))
        per_rule["oracle"].append(max(dice(activation >= t, truth) for t in ORACLE_GRID))
    return {rule: float(np.mean(values)) for rule, values in per_rule.items()}


def score_map_methods(classifier: Path, dataset: SegmentationDataset, candidates: Sequence[MapCandidate],
                      n_images: int = 60, seed: int = 0, thresholds: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.58),
                      batch_size: int = 8, device: str = "cpu",
                      progress: ProgressFn = no_progress) -> List[MapScore]:
    """Score every candidate on the same `n_images` images of `dataset`; best first."""
    model, meta = load_classifier(classifier, map_location=device)
    model.to(device)
    indices = sample_indices(dataset, n_images, seed)
    truths = {i: dataset.load_mask(i).astype(bool) for i in indices}

    def targets(batch_indices):
        """The positive class, or each image's own where every class holds an object (cat and dog)."""
        if dataset.object_free:
            return [meta.positive_index] * len(batch_indices)
        return [dataset.records[i].label for i in batch_indices]
    results = []
    for candidate in progress(candidates, total=len(candidates), description="map candidates"):
        start = time.perf_counter()
        method = create_map_method(candidate.method, model=model, target_layer=candidate.layer)
        if candidate.tta:
            method = TTAMaps(method, hflip=True, scales=candidate.tta_scales)
        maps: Dict[int, np.ndarray] = {}
        with method:
            fit_map_method(method, dataset, indices, candidate.image_size, meta.mean, meta.std, device, batch_size)
            for batch in eval_loader(dataset, candidate.image_size, meta.mean, meta.std, batch_size, indices):
                batch_indices = batch["index"].tolist()
                computed = method.compute(batch["image"].to(device), targets(batch_indices))
                maps.update(zip(batch_indices, computed))
        results.append(MapScore(candidate, score_maps(maps, truths, thresholds), time.perf_counter() - start))
    return sorted(results, key=lambda r: -r.dice[r.best_rule])


__all__ = ["MapCandidate", "MapScore", "sample_indices", "score_map_methods", "score_maps"]
