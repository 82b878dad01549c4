"""Wire the stages of a recipe together into one run directory."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from wsseg.cams import create_map_method, requires_classifier
from wsseg.cams.base import MapMethod
from wsseg.cams.ccam import CCAMMaps
from wsseg.cams.tta import TTAMaps
from wsseg.config import to_yaml
from wsseg.config_schema import RecipeConfig
from wsseg.data import create_dataset
from wsseg.data.base import SegmentationDataset, concat_datasets
from wsseg.device import resolve_device, seed_everything
from wsseg.errors import ConfigError, WssegError
from wsseg.models.classifier import load_classifier
from wsseg.progress import ProgressFn, no_progress
from wsseg.report import bar_chart, markdown_report
from wsseg.stages.ccam import load_ccam, train_ccam
from wsseg.stages.classifier import predict_probabilities, train_classifier
from wsseg.stages.common import write_json
from wsseg.stages.evaluate import evaluate_mask_dir, write_per_image_csv
from wsseg.stages.maps import choose_targets, write_maps
from wsseg.stages.pseudo_masks import MaskRule, calibrate_threshold, make_reference_masks, write_rule_masks

log = logging.getLogger("wsseg")


@dataclass
class RunResult:
    out_dir: Path
    metrics: Dict[str, Dict] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    artifacts: Dict[str, Path] = field(default_factory=dict)


@dataclass
class MapProducer:
    """A trained map method ready to run on any dataset: how to build it, normalise for it, target it."""

    build: Callable[[], MapMethod]
    mean: tuple
    std: tuple
    targets: Callable[[SegmentationDataset], np.ndarray]


class StageTimer:
    """Collects wall time per stage for the benchmark table."""

    def __init__(self):
        self.timings: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        log.info("stage %s: start", stage)
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
            log.info("stage %s: %.1f s", stage, self.timings[stage])


def prepare_run_dir(out_dir: Path, overwrite: bool = False) -> Path:
    """Create the run folder; an existing non-empty one is an error unless `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise WssegError(f"run directory {out_dir} already exists and is not empty; "
                             "choose another --out or pass --overwrite")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


@contextlib.contextmanager
def run_log(path: Path):
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    previous = log.level
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(previous)


def run_recipe(config: RecipeConfig, out_dir: Path, data_root: Optional[Path] = None,
               progress: ProgressFn = no_progress, overwrite: bool = False) -> RunResult:
    """Run every stage the recipe enables; returns metrics per mask producer and stage timings."""
    out_dir = prepare_run_dir(out_dir, overwrite)
    (out_dir / "config.yaml").write_text(to_yaml(config))
    with run_log(out_dir / "run.log"):
        return RecipeRun(config, out_dir, data_root, progress).run()


class RecipeRun:
    """One run of a recipe: holds the device, timer and metrics while the stages execute in order."""

    def __init__(self, config: RecipeConfig, out_dir: Path, data_root, progress: ProgressFn):
        self.config, self.out_dir, self.data_root, self.progress = config, out_dir, data_root, progress
        self.device = resolve_device(config.device)
        self.timer = StageTimer()
        self.metrics: Dict[str, Dict] = {}
        self.artifacts: Dict[str, Path] = {}
        self.classifier_ckpt: Optional[Path] = None

    def run(self) -> RunResult:
        config = self.config
        seed_everything(config.seed)
        log.info("recipe %s on %s", config.name, self.device)
        eval_set = create_dataset(config.maps.dataset, self.data_root, key="maps.dataset")
        producers = self.train_map_producers()
        with self.timer("maps"):
            map_dirs = {name: self.write_maps(name, producer, eval_set, self.out_dir / "maps" / name)
                        for name, producer in producers.items()}
        self.rules = self.mask_rules(producers)
        mask_dirs: Dict[str, Path] = {}
        with self.timer("pseudo_masks"):
            for name, rule in self.rules.items():
                mask_dirs[name] = write_rule_masks(rule, eval_set, map_dirs, self.out_dir / "masks" / name,
                                                   self.progress, f"masks {name}")
            for name in config.evaluate.references:
                mask_dirs[name] = make_reference_masks(name, eval_set, self.out_dir / "masks" / name, self.progress)
        if config.segment is not None:
            mask_dirs.update(self.segment(producers, eval_set))
        self.evaluate(mask_dirs, eval_set)
        if config.export is not None and config.export.enabled:
            self.export(producers)
        return finish_run(config.name, self.out_dir, self.metrics, self.timer.timings, self.artifacts)

    # ------------------------------------------------------------------ stages

    def train_map_producers(self) -> Dict[str, MapProducer]:
        config = self.config
        ccam_configs = {c.name: c for c in config.ccam if c.name in config.maps.methods}
        cam_methods = [m for m in config.maps.methods if m not in ccam_configs and requires_classifier(m)]
        if cam_methods or any(c.init == "classifier" for c in ccam_configs.values()):
            if config.classifier is None:
                raise ConfigError(f"maps.methods {config.maps.methods} need a classifier section")
            with self.timer("classifier"):
                result = train_classifier(config.classifier, config.backbone, self.out_dir / "checkpoints",
                                          self.device, self.data_root, config.seed, self.progress)
            self.classifier_ckpt = result.checkpoint
            self.metrics["classifier"] = result.metrics
        producers: Dict[str, MapProducer] = {}
        if cam_methods:
            model, meta = load_classifier(self.classifier_ckpt)
            model = model.to(self.device)

            def targets(dataset, meta=meta, model=model):
                predicted = None
                if config.maps.target == "predicted":
                    predicted = predict_probabilities(model, dataset, meta, self.device, config.maps.batch_size,
                                                      self.progress).argmax(1)
                return choose_targets(config.maps.target, dataset, meta.positive_index, predicted)

            for name in cam_methods:
                producers[name] = MapProducer(
                    lambda name=name: create_map_method(name, model=model, target_layer=config.maps.target_layer),
                    meta.mean, meta.std, targets)
        for name, ccam_config in ccam_configs.items():
            with self.timer(name):
                producers[name] = self.train_ccam(ccam_config)
        return {m: producers[m] for m in config.maps.methods}

    def train_ccam(self, ccam_config) -> MapProducer:
        """Train one CCAM variant (polarity checked against the classifier's Grad-CAM when there is one)."""
        reference = None
        if self.classifier_ckpt is not None and ccam_config.polarity in ("auto", "classifier"):
            classifier, meta = load_classifier(self.classifier_ckpt)
            gradcam = create_map_method("gradcam", model=classifier.to(self.device).eval())

            def reference(images):
                return gradcam.compute(images, [meta.positive_index] * len(images))

        result = train_ccam(ccam_config, self.config.backbone, self.out_dir / "checkpoints", self.device,
                            self.data_root, self.config.seed, self.classifier_ckpt, reference, self.progress)
        if reference is not None:
            gradcam.close()
        self.metrics[f"{ccam_config.name}_training"] = result.metrics
        self.artifacts[ccam_config.name] = result.checkpoint
        model, meta = load_ccam(result.checkpoint)
        model = model.to(self.device)
        return MapProducer(lambda: CCAMMaps(model),
                           tuple(meta["mean"]), tuple(meta["std"]),
                           lambda dataset: np.zeros(len(dataset), dtype=np.int64))

    def mask_rules(self, producers: Dict[str, MapProducer]) -> Dict[str, MaskRule]:
        """One rule per map method (plain threshold) and per refined variant (calibrated if asked)."""
        pm = self.config.pseudo_masks
        rules = {name: MaskRule(name, pm.threshold) for name in producers}
        for variant in pm.variants:
            rule = MaskRule(variant.source, variant.threshold if variant.threshold is not None else pm.threshold,
                            "otsu" if variant.threshold_mode == "otsu" else "fixed", variant.refine)
            if variant.threshold_mode == "calibrated":
                with self.timer("calibrate"):
                    rule.threshold = self.calibrate(variant.name, rule, producers)
            rules[variant.name] = rule
        return rules

    def calibrate(self, name: str, rule: MaskRule, producers: Dict[str, MapProducer]) -> float:
        calib = self.config.pseudo_masks.calibrate
        dataset = create_dataset(calib.dataset, self.data_root, key="pseudo_masks.calibrate.dataset")
        dataset = dataset.subset(calib.n_images)
        map_dirs = {}
        for m in rule.maps_needed:  # variants sharing a source share its calibration maps
            folder = self.out_dir / "maps_calibrate" / m
            map_dirs[m] = folder if folder.is_dir() else self.write_maps(m, producers[m], dataset, folder)
        threshold, curve = calibrate_threshold(rule, dataset, map_dirs, calib.grid)
        self.metrics.setdefault("calibration", {})[name] = {"threshold": threshold, "n_images": len(dataset),
                                                             "dice_by_threshold": curve}
        log.info("%s: calibrated threshold %.2f on %d labelled images", name, threshold, len(dataset))
        return threshold

    def write_maps(self, name: str, producer: MapProducer, dataset: SegmentationDataset, out: Path) -> Path:
        log.info("maps: %s on %d images", name, len(dataset))
        tta = self.config.maps.tta
        with TTAMaps(producer.build(), tta.hflip, tta.scales) as method:
            return write_maps(method, dataset, out, self.config.maps.image_size, producer.mean, producer.std,
                              producer.targets(dataset), self.device, self.config.maps.batch_size,
                              self.config.maps.num_workers, self.progress, description=f"maps {name}")

    def segment(self, producers: Dict[str, MapProducer], eval_set: SegmentationDataset) -> Dict[str, Path]:
        """Train the U-Net on pseudo-masks (or real masks), then optional self-training rounds.
        Returns {"unet": mask folder} plus one entry per earlier round."""
        from wsseg.stages.segment import (confident_mask_source, load_segmenter, predict_masks, pseudo_mask_source,
                                          train_segmenter)

        seg = self.config.segment
        parts = [create_dataset(d, self.data_root, key=f"segment.train.{i}") for i, d in enumerate(seg.train)]
        train_set = concat_datasets(parts)
        rule, map_dirs = None, None
        if seg.masks != "ground_truth":
            rule = self.rules[seg.masks]
            with self.timer("maps_train"):
                map_dirs = {m: self.write_maps(m, producers[m], train_set, self.out_dir / "maps_train" / m)
                            for m in rule.maps_needed}
        source = pseudo_mask_source(train_set, rule, map_dirs, seg.ignore_band)
        out: Dict[str, Path] = {}
        rounds = seg.self_training_rounds
        for round_index in range(rounds + 1):
            name = "unet" if round_index == rounds else f"unet_round{round_index}"
            with self.timer("unet"):
                result = train_segmenter(seg, self.config.backbone, train_set, source, self.out_dir / "checkpoints",
                                         self.device, self.config.seed + round_index, self.progress, name=name)
                self.metrics[f"{name}_training"] = result.metrics
                model, meta = load_segmenter(result.checkpoint)
                out[name] = self.out_dir / "masks" / name
                predict_masks(model, meta, eval_set, out[name], self.device, seg.batch_size, self.progress)
                if round_index < rounds:  # the next round learns from this model's confident pixels
                    probabilities = predict_masks(model, meta, train_set, None, self.device, seg.batch_size,
                                                  self.progress, keep_probabilities=True)
                    source = confident_mask_source(train_set, probabilities, seg.confident_band)
        self.artifacts["unet"] = self.out_dir / "checkpoints" / "unet.pth"
        return out

    def evaluate(self, mask_dirs: Dict[str, Path], eval_set: SegmentationDataset) -> None:
        if not eval_set.has_masks:
            log.warning("maps.dataset %s has no masks: masks written, nothing to evaluate", eval_set.describe())
            return
        all_rows = []
        with self.timer("evaluate"):
            for name, mask_dir in mask_dirs.items():
                rows, summary = evaluate_mask_dir(name, mask_dir, eval_set, self.progress)
                all_rows.extend(rows)
                self.metrics[name] = summary
                log.info("%s: dice %.4f iou %.4f", name, summary["dice"], summary["iou"])
        write_per_image_csv(self.out_dir / "per_image.csv", all_rows)
        with self.timer("report"):
            from wsseg.report_grid import write_run_grids

            write_run_grids(self.out_dir, eval_set, all_rows, [m for m in mask_dirs if (self.out_dir / "maps" / m).is_dir()])

    def export(self, producers: Dict[str, MapProducer]) -> None:
        from wsseg.deploy.onnx_export import export_run_models

        with self.timer("export"):
            self.metrics["export"] = export_run_models(self.out_dir, self.config.export, self.artifacts,
                                                       self.data_root)


def finish_run(name: str, out_dir: Path, metrics: Dict[str, Dict], timings: Dict[str, float],
               artifacts: Optional[Dict[str, Path]] = None) -> RunResult:
    write_json(out_dir / "metrics.json", {**metrics, "timings_s": timings})
    (out_dir / "report.md").write_text(markdown_report(name, metrics, timings))
    if any(isinstance(v, dict) and "dice" in v for v in metrics.values()):
        bar_chart(out_dir / "plots" / "methods.png", metrics, f"{name}: mask quality")
    return RunResult(out_dir, metrics, timings, dict(artifacts or {}))
