"""Mask and classification metrics, returned as plain data.

Empty-mask convention: a ratio whose denominator is zero scores 1.0 when the prediction and the
ground truth are both empty (nothing to find, nothing wrongly found) and 0.0 otherwise.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import numpy as np

METRIC_NAMES = ("dice", "iou", "precision", "recall", "accuracy")


def confusion(pred: np.ndarray, target: np.ndarray, ignore: Optional[np.ndarray] = None) -> Dict[str, int]:
    """Pixel counts of a predicted mask against the ground truth; pixels where `ignore` is set count nowhere
    (the Oxford-IIIT Pet trimap border, for users who leave it out of the score)."""
    pred, target = pred.astype(bool), target.astype(bool)
    if ignore is not None:
        kept = ~ignore.astype(bool)
        pred, target = pred[kept], target[kept]
    tp = int(np.count_nonzero(pred & target))
    fp = int(np.count_nonzero(pred & ~target))
    fn = int(np.count_nonzero(~pred & target))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": int(pred.size - tp - fp - fn)}


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


def scores(c: Dict[str, int]) -> Dict[str, float]:
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    both_empty = tp + fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, both_empty),
    }


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of one predicted mask against its truth (1 when both are empty)."""
    return scores(confusion(pred, target))["dice"]


def summarise(rows: Iterable[Dict[str, float]]) -> Dict[str, float]:
    """Per-image means of every metric, plus pooled (dataset-level) Dice and IoU from summed counts."""
    rows = list(rows)
    if not rows:
        return {"n_images": 0}
    out = {name: float(np.mean([r[name] for r in rows])) for name in METRIC_NAMES}
    total = {k: sum(r[k] for r in rows) for k in ("tp", "fp", "fn", "tn")}
    pooled = scores(total)
    out["pooled_dice"], out["pooled_iou"] = pooled["dice"], pooled["iou"]
    out["n_images"] = len(rows)
    return out


def roc_auc(labels: np.ndarray, scores_: np.ndarray) -> float:
    """Binary ROC AUC by the rank-sum formula (ties get average ranks); NaN with one class only."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores_, kind="mergesort")
    ranks = np.empty(len(scores_), dtype=np.float64)
    sorted_scores = np.asarray(scores_)[order]
    i = 0
    while i < len(sorted_scores):
        j = i
        while j + 1 < len(sorted_scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_image_rows(method: str, stems: List[str], confusions: List[Dict[str, int]]) -> List[Dict]:
    return [{"method": method, "stem": s, **c, **scores(c)} for s, c in zip(stems, confusions)]
