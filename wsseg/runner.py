"""Wire the stages of a recipe together into one run directory."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from wsseg.cams import requires_classifier
from wsseg.cams.ccam import CCAMMaps
from wsseg.cams.gradcam_family import GradCamFamily
from wsseg.config import to_yaml
from wsseg.config_schema import RecipeConfig
from wsseg.data import create_dataset
from wsseg.device import resolve_device, seed_everything
from wsseg.errors import ConfigError, WssegError
from wsseg.models.classifier import load_classifier
from wsseg.progress import ProgressFn, no_progress
from wsseg.report import bar_chart, markdown_report
from wsseg.stages.classifier import predict_probabilities, train_classifier
from wsseg.stages.common import write_json
from wsseg.stages.evaluate import evaluate_mask_dir, write_per_image_csv
from wsseg.stages.ccam import load_ccam, train_ccam
from wsseg.stages.maps import choose_targets, generate_maps, write_maps
from wsseg.stages.pseudo_masks import make_pseudo_masks, make_reference_masks

log = logging.getLogger("wsseg")


@dataclass
class RunResult:
    out_dir: Path
    metrics: Dict[str, Dict] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)


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
        return _run(config, out_dir, data_root, progress)


def _run(config: RecipeConfig, out_dir: Path, data_root, progress: ProgressFn) -> RunResult:
    seed_everything(config.seed)
    device = resolve_device(config.device)
    log.info("recipe %s on %s", config.name, device)
    timer = StageTimer()
    metrics: Dict[str, Dict] = {}
    eval_set = create_dataset(config.maps.dataset, data_root, key="maps.dataset")
    ccam_configs = [c for c in config.ccam if c.name in config.maps.methods]
    cam_methods = [m for m in config.maps.methods if m not in {c.name for c in config.ccam} and requires_classifier(m)]
    needs_classifier = bool(cam_methods) or any(c.init == "classifier" for c in ccam_configs)

    classifier_ckpt = None
    if needs_classifier:
        if config.classifier is None:
            raise ConfigError(f"maps.methods {config.maps.methods} need a classifier section")
        with timer("classifier"):
            result = train_classifier(config.classifier, config.backbone, out_dir / "checkpoints", device,
                                      data_root, config.seed, progress)
        classifier_ckpt = result.checkpoint
        metrics["classifier"] = result.metrics

    map_dirs: Dict[str, Path] = {}
    if cam_methods:
        with timer("maps"):
            model, meta = load_classifier(classifier_ckpt)
            model = model.to(device)
            predicted = None
            if config.maps.target == "predicted":
                predicted = predict_probabilities(model, eval_set, meta, device, config.maps.batch_size,
                                                  progress).argmax(1)
            targets = choose_targets(config.maps.target, eval_set, meta.positive_index, predicted)
            map_dirs.update(generate_maps(cam_methods, model, eval_set, out_dir / "maps", config.maps.image_size,
                                          meta.mean, meta.std, targets, device, config.maps.batch_size,
                                          config.maps.target_layer, config.maps.num_workers, progress))

    for ccam_config in ccam_configs:
        with timer(ccam_config.name):
            map_dirs[ccam_config.name], metrics[f"{ccam_config.name}_training"] = _run_ccam(
                ccam_config, config, classifier_ckpt, eval_set, out_dir, device, data_root, progress)

    mask_dirs: Dict[str, Path] = {}
    with timer("pseudo_masks"):
        for name, map_dir in map_dirs.items():
            mask_dirs[name] = make_pseudo_masks(map_dir, eval_set, out_dir / "masks" / name,
                                                config.pseudo_masks.threshold, progress)
        for name in config.evaluate.references:
            mask_dirs[name] = make_reference_masks(name, eval_set, out_dir / "masks" / name, progress)

    all_rows = []
    if eval_set.has_masks:
        with timer("evaluate"):
            for name, mask_dir in mask_dirs.items():
                rows, summary = evaluate_mask_dir(name, mask_dir, eval_set, progress)
                all_rows.extend(rows)
                metrics[name] = summary
                log.info("%s: dice %.4f iou %.4f", name, summary["dice"], summary["iou"])
        write_per_image_csv(out_dir / "per_image.csv", all_rows)
    else:
        log.warning("maps.dataset %s has no masks: pseudo-masks written, nothing to evaluate", eval_set.describe())

    return finish_run(config.name, out_dir, metrics, timer.timings)


def _run_ccam(ccam_config, config: RecipeConfig, classifier_ckpt, eval_set, out_dir: Path, device, data_root,
              progress: ProgressFn):
    """Train one CCAM variant (polarity checked against the classifier's Grad-CAM when there is one)."""
    reference = None
    if classifier_ckpt is not None and ccam_config.polarity in ("auto", "classifier"):
        classifier, meta = load_classifier(classifier_ckpt)
        gradcam = GradCamFamily("gradcam", classifier.to(device).eval())

        def reference(images):
            return gradcam.compute(images, [meta.positive_index] * len(images))

    result = train_ccam(ccam_config, config.backbone, out_dir / "checkpoints", device, data_root, config.seed,
                        classifier_ckpt, reference, progress)
    model, meta = load_ccam(result.checkpoint)
    targets = np.zeros(len(eval_set), dtype=np.int64)  # class-agnostic
    with CCAMMaps(model.to(device), ccam_config.tta.hflip, ccam_config.tta.scales) as method:
        map_dir = write_maps(method, eval_set, out_dir / "maps" / ccam_config.name, config.maps.image_size,
                             meta["mean"], meta["std"], targets, device, config.maps.batch_size,
                             config.maps.num_workers, progress, description=f"maps {ccam_config.name}")
    return map_dir, result.metrics


def finish_run(name: str, out_dir: Path, metrics: Dict[str, Dict], timings: Dict[str, float]) -> RunResult:
    write_json(out_dir / "metrics.json", {**metrics, "timings_s": timings})
    (out_dir / "report.md").write_text(markdown_report(name, metrics, timings))
    if any(isinstance(v, dict) and "dice" in v for v in metrics.values()):
        bar_chart(out_dir / "plots" / "methods.png", metrics, f"{name}: pseudo-mask quality")
    return RunResult(out_dir, metrics, timings)
