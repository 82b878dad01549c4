"""Candidate pseudo-mask producers scored on a few labelled images, for the `select` stage
(wsseg.pipeline.select): one method's maps at one size and TTA, computed once, then every refinement chain
and threshold rule on them; a calibrated threshold scored leave-one-out."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from wsseg.cams.tta import TTAMaps
from wsseg.config_schema import RecipeConfig, RefineStepConfig, TTAConfig
from wsseg.data.base import SegmentationDataset
from wsseg.metrics import dice
from wsseg.pipeline.context import RunContext
from wsseg.pipeline.masks import fit_images
from wsseg.stages.maps import fit_map_method, write_maps
from wsseg.stages.pseudo_masks import MaskRule

CRF_LEVEL = 0.5  # a dense CRF returns a marginal: its masks are taken at 0.5


@dataclass
class Candidate:
    method: str
    image_size: int
    tta: TTAConfig
    refine: List[RefineStepConfig] = field(default_factory=list)
    threshold_mode: str = "fixed"
    threshold: float = 0.5
    dice: float = 0.0
    per_image: List[float] = field(default_factory=list)
    # What one image costs this producer: its maps (a fitted method's fit excluded) and its refinement chain,
    # measured on the labelled images; None where unknown (rows cached before it was measured).
    seconds_per_image: Optional[float] = None

    @property
    def label(self) -> str:
        tta = "+flip" if self.tta.hflip else ""
        scales = "" if list(self.tta.scales) == [1.0] else "x" + "/".join(f"{s:g}" for s in self.tta.scales)
        chain = " > ".join(_step_label(s) for s in self.refine) or "map"
        rule = f"{self.threshold_mode} {self.threshold:.2f}" if self.threshold_mode != "otsu" else "otsu"
        return f"{self.method} {self.image_size}px{tta}{scales} | {chain} | {rule}"

    def row(self) -> Dict:
        loo = leave_one_out_means(self.per_image)
        return {"candidate": self.label, "method": self.method, "image_size": self.image_size,
                "tta": {"hflip": self.tta.hflip, "scales": list(self.tta.scales)},
                "refine": [{"name": s.name, "options": dict(s.options)} for s in self.refine],
                "threshold_mode": self.threshold_mode, "threshold": self.threshold, "dice": self.dice,
                "loo_low": min(loo), "loo_high": max(loo), "per_image": [float(v) for v in self.per_image],
                "seconds_per_image": self.seconds_per_image}


def _step_label(step: RefineStepConfig) -> str:
    options = ",".join(f"{k}={v}" for k, v in step.options.items())
    return f"{step.name}({options})" if options else step.name


def leave_one_out_means(values: Sequence[float]) -> List[float]:
    """The mean Dice without each image in turn: how much the choice hangs on any one labelled image."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return [float(values.mean())] if len(values) else [0.0]
    return [float((values.sum() - v) / (len(values) - 1)) for v in values]


def selection_estimate(rows: Sequence[Dict], prefer_faster_within: float = 0.0) -> Optional[float]:
    """The whole choice scored on images it did not see (nested leave-one-out): for each labelled image, the
    candidate the rule (`choose`) takes on the others, scored on that image. The winner's own mean Dice is
    optimistic, since it was picked as the best of many on those same images. None for rows without per-image
    scores."""
    if not rows or any(not r.get("per_image") for r in rows) or len(rows[0]["per_image"]) < 2:
        return None
    seconds = [r.get("seconds_per_image") for r in rows]
    per_image, _ = leave_one_out_choice(np.array([r["per_image"] for r in rows], dtype=np.float64),
                                        lambda means: choose(means, seconds, prefer_faster_within))
    return float(np.mean(per_image))


def choose(means: Sequence[float], seconds: Sequence[Optional[float]], prefer_faster_within: float = 0.0) -> int:
    """The index of the candidate the select stage takes: the best mean Dice (ties to the first); with
    `prefer_faster_within` > 0, the fastest candidate whose mean is at most that far below the best (candidates
    of unknown cost are not preferred)."""
    best = int(np.argmax(means))
    if prefer_faster_within <= 0:
        return best
    close = [j for j, (m, s) in enumerate(zip(means, seconds))
             if s is not None and m >= means[best] - prefer_faster_within]
    if seconds[best] is None or not close:
        return best
    return min(close, key=lambda j: (seconds[j], -means[j], j))


def labelled_sample(dataset: SegmentationDataset, n_images: int, seed: int) -> SegmentationDataset:
    """`n_images` images holding an object, drawn with `seed` (a view: the catalog's dataset is not changed)."""
    positives = [i for i in range(len(dataset)) if dataset.holds_object(i)]
    picks = sorted(int(i) for i in np.random.RandomState(seed).permutation(positives)[:n_images])
    view = copy.copy(dataset)
    view.records = [dataset.records[i] for i in picks]
    return view


def without_images(dataset: SegmentationDataset, held: SegmentationDataset) -> SegmentationDataset:
    """A view of `dataset` without the images of `held` (the same file, or the same stem for images without
    one): the labelled images kept out of the U-Net's training, so that scoring a U-Net on them tells how it
    does on images it has not learnt from."""
    from wsseg.data.base import ConcatDataset

    def identity(record):
        return str(record.image_path) if record.image_path is not None else record.stem

    if isinstance(dataset, ConcatDataset):
        return ConcatDataset([without_images(part, held) for part in dataset.parts])
    held_keys = {identity(r) for r in held.records}
    view = copy.copy(dataset)
    view.records = [r for r in dataset.records if identity(r) not in held_keys]
    return view


def labelled_set(context: RunContext) -> Tuple[SegmentationDataset, List[np.ndarray]]:
    """The `select` images of a run and their masks: what the producers and the rounds are scored on."""
    sel = context.config.select
    dataset = labelled_sample(context.dataset(sel.labelled, "select.labelled"), sel.n_images, context.config.seed)
    return dataset, [dataset.load_mask(i).astype(bool) for i in range(len(dataset))]


def grid(config: RecipeConfig) -> List[float]:
    from wsseg.config_schema import CalibrateConfig

    return list((config.pseudo_masks.calibrate or CalibrateConfig()).grid)


@dataclass
class MapSet:
    folder: Path
    seconds_per_image: float


def candidate_maps(context: RunContext, method: str, size: int, tta: TTAConfig, dataset: SegmentationDataset,
                   folder_name: str, group: str = "maps_select") -> MapSet:
    """One method's maps of the labelled images at one size and TTA (fitted methods on maps.fit_dataset), in
    the run's `group` folder, with what a map cost per image (the fit of a fitted method excluded: it is paid
    once per run)."""
    config = context.config
    producer = context.producers[method]
    out = context.layout.maps(folder_name, group)
    wanted = list(range(len(dataset)))
    with TTAMaps(producer.build(), tta.hflip, tta.scales) as maps:
        if maps.needs_fit:
            fit_set, fit_indices = fit_images(context, dataset, wanted)
            fit_map_method(maps, fit_set, fit_indices, size, producer.mean, producer.std, context.device,
                           config.maps.batch_size, config.maps.num_workers)
        start = time.perf_counter()
        write_maps(maps, dataset, out, size, producer.mean, producer.std, producer.targets(dataset), context.device,
                   config.maps.batch_size, config.maps.num_workers)
    return MapSet(out, (time.perf_counter() - start) / max(len(dataset), 1))


def _first_best(means: List[float]) -> int:
    return means.index(max(means))


def leave_one_out_choice(scores: np.ndarray,
                         pick: Callable[[List[float]], int] = _first_best) -> Tuple[List[float], int]:
    """`scores[j, i]`: image i's Dice under option j (a grid threshold, a candidate). Each image's Dice under the
    option `pick` takes from the means over the other images (by default the best, ties to the first, as
    `best_grid_threshold`), and the index of the option it takes from the means over all of them."""
    n_options, n_images = scores.shape
    per_image = []
    for i in range(n_images):
        others = [k for k in range(n_images) if k != i] or [i]
        means = [float(np.mean(scores[j, others])) for j in range(n_options)]
        per_image.append(float(scores[pick(means), i]))
    return per_image, pick([float(np.mean(scores[j])) for j in range(n_options)])


def score_rules(base: Candidate, dataset: SegmentationDataset, truths: List[np.ndarray], map_dir: Path,
                modes: Sequence[str], fixed_threshold: float, calibration_grid: Sequence[float]) -> List[Candidate]:
    """The candidate under each threshold rule, its refined maps computed once (their cost, with one mask per
    image, whose steps may cut a graph, is added to the base's `seconds_per_image`, the maps' own)."""
    uses_crf = any(s.name == "dense_crf" for s in base.refine)
    level = CRF_LEVEL if uses_crf else fixed_threshold
    rule = MaskRule(base.method, level, "fixed", base.refine)
    start = time.perf_counter()
    refined = [rule.refined(dataset, i, {base.method: map_dir}) for i in range(len(dataset))]
    masks = [rule.mask(r) for r in refined]
    if base.seconds_per_image is not None:
        base = replace(base, seconds_per_image=base.seconds_per_image
                       + (time.perf_counter() - start) / max(len(dataset), 1))
    out = []
    for mode in modes:
        if mode == "fixed":
            per_image = [dice(m, t) for m, t in zip(masks, truths)]
            threshold = level
        elif mode == "otsu":
            otsu = MaskRule(base.method, level, "otsu", base.refine)
            per_image = [dice(otsu.mask(r), t) for r, t in zip(refined, truths)]
            threshold = float("nan")
        else:  # calibrated: each image scored at the threshold the others choose
            # Every (threshold, image) mask is made once: with GrabCut in the chain a mask costs a graph cut, and
            # the leave-one-out choices only re-read these scores.
            scores = np.array([[dice(rule.mask(r, t), truth) for r, truth in zip(refined, truths)]
                               for t in calibration_grid], dtype=np.float64)
            per_image, best = leave_one_out_choice(scores)
            threshold = calibration_grid[best]
        out.append(replace(base, threshold_mode=mode, threshold=float(threshold), dice=float(np.mean(per_image)),
                           per_image=[float(v) for v in per_image]))
    return out


__all__ = ["CRF_LEVEL", "Candidate", "MapSet", "candidate_maps", "choose", "grid", "labelled_sample", "labelled_set",
           "leave_one_out_choice", "leave_one_out_means", "selection_estimate",
           "score_rules"]
