"""The hand-labelling the review loop saves, simulated: a person corrects a share of a finished run's training
masks (their real mask replaces the pseudo-mask), chosen least confident first or at random, and the recipe's
U-Net is trained again for each share (`wsseg bench corrections RUN_DIR`).

Each point is a run folder of its own under the bench's output, its files hard-linked from the finished run:
the executor's cache reuses every stage before the U-Net (classifier, maps, pseudo-masks, train labels),
and the U-Net, keyed on the corrections, trains again. A stopped bench continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from wsseg.config import load_recipe
from wsseg.config_schema import RecipeConfig
from wsseg.data import DatasetCatalog
from wsseg.data.base import SegmentationDataset
from wsseg.errors import WssegError
from wsseg.pipeline.layout import RunLayout
from wsseg.progress import ProgressFn, no_progress
from wsseg.stages.common import write_json

log = logging.getLogger("wsseg")

CHOICES = ("confidence", "random")
#: What each point's folder shares with the finished run (hard links): the caches of the stages before the U-Net.
SHARED = ("stages", "checkpoints", "maps", "maps_train", "maps_calibrate", "train_masks", "masks")


@dataclass
class CorrectionPoint:
    choose: str
    fraction: float
    n_corrected: int
    dice: float
    iou: float
    run_dir: str
    repeat: int = 0  # repeat r trains with the U-Net seed `seed + r` (and draws the random images with it)


def summarise(points: Sequence[CorrectionPoint]) -> List[Dict]:
    """One row per (choice, share): mean Dice and IoU over the repeats, with the Dice range."""
    groups: Dict = {}
    for p in points:
        groups.setdefault((p.choose, p.fraction, p.n_corrected), []).append(p)
    return [{"choose": choose, "fraction": fraction, "n_corrected": count, "repeats": len(group),
             "dice": float(np.mean([p.dice for p in group])), "dice_low": min(p.dice for p in group),
             "dice_high": max(p.dice for p in group), "iou": float(np.mean([p.iou for p in group]))}
            for (choose, fraction, count), group in groups.items()]


def train_label_confidence(config: RecipeConfig, point_dir: Path, data_root=None,
                           progress: ProgressFn = no_progress) -> Dict[str, float]:
    """{stem: confidence} of the pseudo-mask each training image's U-Net learnt from (`segment.masks` applied
    to the training maps), as `wsseg.confidence` scores any mask; object-free images score 1. The stages
    before the U-Net run in `point_dir` (a linked copy of the finished run: all of them come from its cache)."""
    from wsseg import distributed as dist
    from wsseg.confidence import mask_confidence
    from wsseg.pipeline import RunContext, StageExecutor
    from wsseg.pipeline.map_methods import ClassifierStage, MapMethodsStage
    from wsseg.pipeline.masks import MaskRulesStage, maps_for
    from wsseg.pipeline.select import SelectStage
    from wsseg.refine import otsu_threshold

    layout = RunLayout(point_dir)
    context = RunContext(config, layout, StageExecutor(layout, resume=True), DatasetCatalog(data_root, config.on_bad_image),
                         dist.local_device(config.device), progress)
    for stage in (ClassifierStage(), MapMethodsStage(), SelectStage(), MaskRulesStage()):
        if stage.enabled(config):
            stage.run(context)
    seg = context.config.segment  # as the select stage left it, when the recipe has one
    train_set = context.catalog.concat(seg.train, "segment.train")
    rule = context.rules[seg.masks]
    map_dirs = {m: maps_for(context, m, train_set, "maps_train", seg.train, only_positives=True)
                for m in rule.maps_needed}
    values = {}
    for i in progress(range(len(train_set)), total=len(train_set), description="confidence of the train masks"):
        stem = train_set.records[i].stem
        if not train_set.holds_object(i):
            values[stem] = 1.0
            continue
        refined = rule.refined(train_set, i, map_dirs)
        level = otsu_threshold(refined.activation) if rule.threshold_mode == "otsu" else rule.threshold
        values[stem] = mask_confidence(refined.activation, level)
    return values


def choose_images(stems: Sequence[str], count: int, choose: str, confidence: Dict[str, float],
                  seed: int = 0) -> List[str]:
    """The `count` images a person corrects: the least confident first (ties by name), or a seeded random draw."""
    if choose == "confidence":
        return sorted(stems, key=lambda s: (confidence[s], s))[:count]
    if choose == "random":
        return sorted(random.Random(seed).sample(sorted(stems), count))
    raise WssegError(f"bench corrections: --choose must be one of {', '.join(CHOICES)}, got '{choose}'")


def write_corrections(train_set: SegmentationDataset, stems: Sequence[str], out_dir: Path) -> Path:
    """The chosen images' real masks as `<stem>.png`, what `segment.corrected_masks` reads."""
    from wsseg.data.io import write_mask_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {r.stem: i for i, r in enumerate(train_set.records)}
    for stem in stems:
        target = out_dir / f"{stem}.png"
        if not target.is_file():
            write_mask_png(target, train_set.load_mask(index[stem]))
    return out_dir


def link_run(source: Path, target: Path) -> None:
    """`target` as a copy of the finished run's caches, files hard-linked (copied where links fail). Every
    writer replaces files atomically, so a point never writes through into the finished run."""
    for name in SHARED:
        folder = source / name
        if not folder.exists():
            continue
        for path in folder.rglob("*"):
            if path.is_file():
                dest = target / path.relative_to(source)
                if dest.exists():
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, dest)
                except OSError:
                    shutil.copy2(path, dest)
    shutil.copy2(source / "config.yaml", target / "config.yaml")


def bench_corrections(run_dir: Path, fractions: Sequence[float], choices: Sequence[str] = CHOICES,
                      out_dir: Optional[Path] = None, overrides: Sequence[str] = (), data_root=None, seed: int = 0,
                      progress: ProgressFn = no_progress, repeats: int = 1) -> List[CorrectionPoint]:
    """Val Dice of the recipe's U-Net for each share of corrected training masks and way of choosing them.
    `overrides` (key=value) apply to every point, e.g. `segment.self_training_rounds=0` for a cheaper curve.
    With `repeats` > 1 every point is trained again with other U-Net seeds (and other random draws), so that a
    difference between points can be read against what retraining alone moves."""
    from wsseg.runner import run_recipe

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    if not layout.config.is_file():
        raise WssegError(f"bench corrections: {run_dir} holds no config.yaml (a finished `wsseg recipe run`)")
    config = load_recipe(str(layout.config), overrides)
    if config.segment is None:
        raise WssegError(f"bench corrections: the recipe of {run_dir} trains no U-Net (no segment section)")
    if config.segment.masks == "ground_truth":
        raise WssegError(f"bench corrections: {run_dir} trained on the real masks already")
    if repeats < 1:
        raise WssegError(f"bench corrections: --repeats must be at least 1, got {repeats}")
    bad = [f for f in fractions if not 0 <= f <= 1]
    if bad:
        raise WssegError(f"bench corrections: fractions must lie in [0, 1], got {bad}")
    catalog = DatasetCatalog(data_root, config.on_bad_image)
    train_set = catalog.concat(config.segment.train, "segment.train")
    if not train_set.has_masks:
        raise WssegError(f"bench corrections: segment.train ({train_set.describe()}) has no masks to correct with")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "corrections"
    baseline = out_dir / "none"
    baseline.mkdir(parents=True, exist_ok=True)
    link_run(run_dir, baseline)
    confidence_file = out_dir / "train_confidence.json"
    if confidence_file.is_file():
        confidence = json.loads(confidence_file.read_text())
    else:
        confidence = train_label_confidence(config, baseline, data_root, progress)
        write_json(confidence_file, confidence)
    stems = [r.stem for r in train_set.records]
    points = []
    for repeat in range(repeats):
        for choose in choices:
            for fraction in fractions:
                count = int(round(fraction * len(stems)))
                if count == 0 and choose != choices[0]:
                    continue  # nothing corrected: the same point whatever the choice
                name = ("none" if count == 0 else f"{choose}-{fraction:g}") + (f"-r{repeat}" if repeat else "")
                point_dir = out_dir / name
                point = replace(config, export=None)
                if repeat:  # repeat 0 is the run's own U-Net seed: its uncorrected point is the run's U-Net
                    point = replace(point, segment=replace(point.segment, seed=config.seed + repeat))
                if count:
                    chosen = choose_images(stems, count, choose, confidence, seed + repeat)
                    folder = write_corrections(train_set, chosen, out_dir / "masks" / name)
                    point = replace(point, segment=replace(point.segment, corrected_masks=str(folder)))
                if point_dir != baseline:  # the baseline was linked before the confidence was read from it
                    point_dir.mkdir(parents=True, exist_ok=True)
                    link_run(run_dir, point_dir)
                log.info("bench corrections: %s (%d of %d training masks corrected)", name, count, len(stems))
                result = run_recipe(point, point_dir, data_root, progress, resume=True)
                unet = result.metrics.get("unet", {})
                points.append(CorrectionPoint("none" if count == 0 else choose, fraction, count,
                                              float(unet.get("dice", float("nan"))),
                                              float(unet.get("iou", float("nan"))), str(point_dir), repeat))
    return points


def write_curve(points: Sequence[CorrectionPoint], out_dir: Path, supervised: Optional[float] = None,
                title: str = "") -> Dict[str, Path]:
    """corrections.json and corrections.png (val Dice against hand-drawn masks, one line per way of choosing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(points)
    data = {"points": [p.__dict__ for p in points], "summary": rows, "supervised_dice": supervised}
    write_json(out_dir / "corrections.json", data)
    fig, ax = plt.subplots(figsize=(6, 4))
    base = [r for r in rows if r["choose"] == "none"]
    for choose in CHOICES:
        line = sorted(base + [r for r in rows if r["choose"] == choose], key=lambda r: r["n_corrected"])
        if len(line) > len(base):
            spread = [[r["dice"] - r["dice_low"] for r in line], [r["dice_high"] - r["dice"] for r in line]]
            ax.errorbar([r["n_corrected"] for r in line], [r["dice"] for r in line], yerr=spread, marker="o",
                        capsize=3, label=f"chosen by {choose}")
    if supervised is not None:
        ax.axhline(supervised, color="grey", linestyle="--", label="fully supervised U-Net")
    ax.set_xlabel("hand-corrected training masks")
    ax.set_ylabel("U-Net Dice (evaluation images)")
    ax.set_title(title or "Dice against hand-labelling")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "corrections.png", dpi=120)
    plt.close(fig)
    return {"json": out_dir / "corrections.json", "plot": out_dir / "corrections.png"}


__all__ = ["CHOICES", "CorrectionPoint", "bench_corrections", "choose_images", "summarise",
           "train_label_confidence", "write_corrections", "write_curve"]
