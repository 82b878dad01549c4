"""The stages that turn map methods into masks of the evaluation images: maps, mask rules (thresholds
calibrated on labelled training images when asked), pseudo-masks and the blind references."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List

from wsseg import distributed as dist
from wsseg.cams.tta import TTAMaps
from wsseg.data.base import SegmentationDataset
from wsseg.errors import ConfigError
from wsseg.parallel import cpu_workers
from wsseg.pipeline.context import MapProducer, RunContext, Stage
from wsseg.pipeline.executor import fingerprint
from wsseg.stages.maps import fit_map_method, write_maps
from wsseg.stages.pseudo_masks import MaskRule, calibrate_threshold, make_reference_masks, write_rule_masks

log = logging.getLogger("wsseg")


def maps_digest(context: RunContext, producer: MapProducer, dataset_config) -> str:
    """Everything a producer's maps of one dataset depend on (what the stage cache and the U-Net key on)."""
    maps = context.config.maps
    return fingerprint(producer.fingerprint, dataset_config, maps.image_size, maps.tta, context.config.on_bad_image,
                       maps.fit_dataset)


def rule_digest(context: RunContext, rule: MaskRule, dataset_config) -> str:
    """What one rule's masks of a dataset depend on: the rule as applied (a calibrated threshold included)
    and the digests of the maps it reads."""
    return fingerprint([maps_digest(context, context.producers[m], dataset_config) for m in rule.maps_needed],
                       rule.threshold, rule.threshold_mode, rule.steps)


def maps_for(context: RunContext, name: str, dataset: SegmentationDataset, folder: str, dataset_config,
             only_positives: bool = False) -> Path:
    """Maps of one producer on one dataset, sharded across ranks, cached by fingerprint. With
    `only_positives`, images of object-free classes get no map (their pseudo-mask is empty anyway)."""
    producer = context.producers[name]
    out = context.layout.maps(name, folder)
    maps = context.config.maps
    wanted = [i for i in range(len(dataset)) if not only_positives or dataset.holds_object(i)]

    def compute(done):
        todo = [i for i in wanted if dataset.records[i].stem not in done]
        if not todo:  # every map was written before an interruption
            return
        log.info("maps: %s on %d images", name, len(todo))
        with TTAMaps(producer.build(), maps.tta.hflip, maps.tta.scales) as method:
            if method.needs_fit:  # on the same images as before an interruption: the same fitted method
                fit_set, fit_indices = fit_images(context, dataset, wanted)
                fit_map_method(method, fit_set, fit_indices, maps.image_size, producer.mean, producer.std,
                               context.device, maps.batch_size, maps.num_workers)
            write_maps(method, dataset, out, maps.image_size, producer.mean, producer.std, producer.targets(dataset),
                       context.device, maps.batch_size, maps.num_workers, context.progress,
                       description=f"maps {name}", indices=dist.shard(todo))

    return context.executor.cached_folder(f"{folder}_{name}", maps_digest(context, producer, dataset_config), out,
                                          compute)


def fit_images(context: RunContext, dataset: SegmentationDataset, wanted: List[int]):
    """What fitted map methods learn from: `maps.fit_dataset`'s positive images, or the images being mapped.
    A fixed set such as the training images gives every mapped set the same concepts (on Kvasir-SEG
    better ones than the 120 val images alone gave)."""
    if context.config.maps.fit_dataset is None:
        return dataset, wanted
    fit_set = context.dataset(context.config.maps.fit_dataset, "maps.fit_dataset")
    positives = [i for i in range(len(fit_set)) if fit_set.holds_object(i)]
    if not positives:
        raise ConfigError(f"maps.fit_dataset: {fit_set.describe()} has no images with objects to fit on")
    return fit_set, positives


class MapsStage(Stage):
    """Every producer's maps of the evaluation images."""

    name = "maps"
    reads = ("producers", "eval_set")
    writes = ("map_dirs",)

    def run(self, context: RunContext) -> None:
        with context.timer("maps"):
            context.map_dirs = {name: maps_for(context, name, context.eval_set, "maps", context.config.maps.dataset)
                                for name in context.producers}


class MaskRulesStage(Stage):
    """One rule per map method (plain threshold) and per refined variant, its threshold calibrated on the
    `pseudo_masks.calibrate` images when asked."""

    name = "mask_rules"
    reads = ("producers", "config.pseudo_masks")
    writes = ("rules", "metrics.calibration")

    def run(self, context: RunContext) -> None:
        pm = context.config.pseudo_masks
        rules: Dict[str, MaskRule] = {name: MaskRule(name, pm.threshold) for name in context.producers}
        for variant in pm.variants:
            rule = MaskRule(variant.source, variant.threshold if variant.threshold is not None else pm.threshold,
                            "otsu" if variant.threshold_mode == "otsu" else "fixed", variant.refine)
            if variant.threshold_mode == "calibrated":
                with context.timer("calibrate"):
                    rule.threshold = self.calibrate(context, variant.name, rule)
            rules[variant.name] = rule
        context.rules = rules

    @staticmethod
    def calibrate(context: RunContext, name: str, rule: MaskRule) -> float:
        calib = context.config.pseudo_masks.calibrate
        dataset = context.calibration_images()
        map_dirs = {m: maps_for(context, m, dataset, "maps_calibrate", (calib.dataset, calib.n_images))
                    for m in rule.maps_needed}
        threshold, curve = calibrate_threshold(rule, dataset, map_dirs, calib.grid)
        context.record_calibration(name, threshold, len(dataset), curve)
        return threshold


class PseudoMasksStage(Stage):
    """Every rule's masks of the evaluation images, then the blind references (`evaluate.references`)."""

    name = "pseudo_masks"
    reads = ("rules", "map_dirs", "eval_set")
    writes = ("mask_dirs",)

    def run(self, context: RunContext) -> None:
        eval_set, config = context.eval_set, context.config
        with context.timer("pseudo_masks"):
            for name, rule in context.rules.items():
                def write(name=name, rule=rule):
                    out = write_rule_masks(rule, eval_set, context.map_dirs, context.layout.masks(name),
                                           context.progress, f"masks {name}", indices=dist.shard(range(len(eval_set))),
                                           workers=cpu_workers(config.workers))
                    dist.barrier()
                    return str(out)

                digest = rule_digest(context, rule, config.maps.dataset)
                context.mask_dirs[name] = Path(context.cached(f"masks_{name}", digest, write, lambda r: [Path(r)]))
            if dist.is_main():
                for name in config.evaluate.references:
                    context.mask_dirs[name] = make_reference_masks(name, eval_set, context.layout.masks(name),
                                                                   context.progress)
            dist.barrier()
