"""How sure a mask is, without ground truth: one number per image, for ranking which masks a person
should look at first (`per_image.csv`'s `confidence`, the exports, the review page).

The score is the share of the mask's decided pixels among those near the threshold: `area / (area +
uncertain)`, where `uncertain` counts the pixels whose score lies in the band halfway from the threshold
to 0 and to 1. A mask whose map (or U-Net probability) drops steeply at its edge scores near 1; one whose
edge is a wide grey zone, or that was cut from a flat map, scores low. Chosen on Oxford-IIIT Pet
trainval among threshold stability, mean margin, flip agreement, mean probability inside the mask and
mask area (docs/experiments.md, "A confidence for every mask"): it ranked the per-image Dice best for
the CCAM maps (Spearman 0.57) and for the U-Net (0.71, tied with threshold stability at the calibrated
threshold, ahead of it at 0.5).

Each writer of masks records the confidence of what it wrote in `<mask folder>/confidence-<rank>.json`
(one file per torchrun rank, merged by `read_confidence`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np


def mask_confidence(score: np.ndarray, threshold: float) -> float:
    """Confidence in [0, 1] of the mask `score >= threshold` (`score`: a map or probability in [0, 1])."""
    low, high = threshold / 2, threshold + (1 - threshold) / 2
    area = int(np.count_nonzero(score >= threshold))
    uncertain = int(np.count_nonzero((score > low) & (score < high)))
    return 1.0 if area + uncertain == 0 else area / (area + uncertain)


class ConfidenceLog:
    """Collects {stem: confidence} while masks are written, then saves them beside the masks."""

    def __init__(self, mask_dir: Path):
        self.mask_dir = Path(mask_dir)
        self.values: Dict[str, float] = {}

    def add(self, stem: str, score: np.ndarray, threshold: float) -> None:
        self.values[stem] = mask_confidence(score, threshold)

    def save(self) -> None:
        from wsseg import distributed as dist

        path = self.mask_dir / f"confidence-{dist.rank()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.values, indent=0))
        os.replace(tmp, path)


def read_confidence(mask_dir: Path) -> Dict[str, float]:
    """{stem: confidence} of a mask folder; empty when its writer recorded none (references, ONNX masks)."""
    values: Dict[str, float] = {}
    for path in sorted(Path(mask_dir).glob("confidence-*.json")):
        values.update(json.loads(path.read_text()))
    return values


def rank_correlation(confidence: Dict[str, float], dice: Dict[str, float]) -> Optional[float]:
    """Spearman correlation of confidence with the true per-image Dice over the images that have both."""
    from scipy.stats import spearmanr

    stems = [s for s in dice if s in confidence]
    ours, truth = [confidence[s] for s in stems], [dice[s] for s in stems]
    if len(stems) < 3 or len(set(ours)) < 2 or len(set(truth)) < 2:
        return None  # undefined for a constant column
    return float(spearmanr(ours, truth)[0])
