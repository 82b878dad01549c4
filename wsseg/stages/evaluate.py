"""Stage 4: compare written PNG masks with the ground truth, per image and pooled."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Tuple

from wsseg.confidence import rank_correlation, read_confidence
from wsseg.data.base import SegmentationDataset
from wsseg.data.io import read_binary_mask
from wsseg.errors import DataError
from wsseg.metrics import confusion, per_image_rows, summarise
from wsseg.progress import ProgressFn, no_progress

CSV_FIELDS = ["method", "stem", "dice", "iou", "precision", "recall", "accuracy", "tp", "fp", "fn", "tn", "confidence"]


def evaluate_mask_dir(method: str, mask_dir: Path, dataset: SegmentationDataset,
                      progress: ProgressFn = no_progress) -> Tuple[List[Dict], Dict[str, float]]:
    """Read `mask_dir/<stem>.png` for every image (the files a user gets, not in-memory copies)."""
    if not dataset.has_masks:
        raise DataError(f"evaluate: {dataset.describe()} has no ground-truth masks")
    stems, confusions = [], []
    for i in progress(range(len(dataset)), total=len(dataset), description=f"evaluate {method}"):
        stem = dataset.records[i].stem
        pred = read_binary_mask(Path(mask_dir) / f"{stem}.png")
        target = dataset.load_mask(i)
        if pred.shape != target.shape:
            raise DataError(f"{Path(mask_dir) / (stem + '.png')}: mask is {pred.shape} but ground truth is {target.shape}")
        stems.append(stem)
        confusions.append(confusion(pred, target, dataset.load_ignore(i)))
    rows = per_image_rows(method, stems, confusions)
    summary = summarise(rows)
    confidence = read_confidence(mask_dir)  # how sure the writer was of each mask, when it said
    if confidence:
        for row in rows:
            row["confidence"] = confidence.get(row["stem"], "")
        summary["confidence_spearman"] = rank_correlation(confidence, {r["stem"]: r["dice"] for r in rows})
    return rows, summary


def write_per_image_csv(path: Path, rows: List[Dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
