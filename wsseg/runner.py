"""Wire the stages of a recipe together into one run directory.

Each stage is cached by a fingerprint of its configuration and inputs (`stages/<key>.json`), so
`--resume` skips what is finished and continues what is not; training stages resume mid-way from
their per-epoch state. Under torchrun every rank runs this code: training is data-parallel, maps
and masks are sharded, evaluation and export happen on rank 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from wsseg import distributed as dist
from wsseg.cams import create_map_method, requires_classifier
from wsseg.cams.base import MapMethod
from wsseg.cams.ccam import CCAMMaps, CCAMOnnxMaps
from wsseg.cams.tta import TTAMaps
from wsseg.config import to_yaml
from wsseg.config_schema import CLASSIFIER_WEIGHTS, RecipeConfig, SegmentConfig
from wsseg.data import DatasetCatalog
from wsseg.data.base import SegmentationDataset
from wsseg.environment import describe as describe_environment, environment_report
from wsseg.errors import ConfigError, StageFailure, WssegError, about
from wsseg.models.classifier import load_classifier
from wsseg.progress import ProgressFn, no_progress
from wsseg.report import bar_chart, markdown_report
from wsseg.stages.ccam import load_ccam, train_ccam
from wsseg.stages.classifier import predict_probabilities, train_classifier
from wsseg.stages.common import write_json
from wsseg.stages.evaluate import evaluate_mask_dir, write_per_image_csv
from wsseg.stages.maps import choose_targets, fit_map_method, write_maps
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
    fingerprint: str


class StageTimer:
    """Collects wall time per stage for the benchmark table."""

    def __init__(self):
        self.timings: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        log.info("stage %s: start", stage)
        try:
            with about(stage):
                yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
            log.info("stage %s: %.1f s", stage, self.timings[stage])


def fingerprint(*parts: Any) -> str:
    """Hash of a stage's inputs. Config fields left at their defaults are left out, so that a wsseg
    version adding an option (with a default that keeps the old behaviour) still resumes older runs."""
    text = json.dumps([_without_defaults(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _without_defaults(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        kept = {}
        for f in fields(value):
            item = getattr(value, f.name)
            if f.default is not MISSING and item == f.default:
                continue
            if f.default_factory is not MISSING and item == f.default_factory():
                continue
            kept[f.name] = _without_defaults(item)
        return kept
    if isinstance(value, (list, tuple)):
        return [_without_defaults(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _without_defaults(v) for k, v in value.items()}
    return value


def prepare_run_dir(out_dir: Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run folder. An existing non-empty one is an error unless `overwrite` (replace it) or
    `resume` (continue it). Rank 0 decides; every rank gets the same answer."""
    out_dir = Path(out_dir)
    problem = None
    if dist.is_main():
        try:
            if out_dir.exists() and any(out_dir.iterdir()) and not resume:
                if not overwrite:
                    raise WssegError(f"run directory {out_dir} already exists and is not empty; choose another "
                                     "--out, pass --resume to continue it or --overwrite to replace it")
                shutil.rmtree(out_dir)
            if resume and not (out_dir / "config.yaml").is_file():
                raise WssegError(f"cannot resume {out_dir}: it holds no config.yaml")
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except WssegError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"cannot write to run directory {out_dir}: {exc.strerror or exc}"
    problem = dist.broadcast_object(problem)
    if problem:
        raise WssegError(problem)
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
               progress: ProgressFn = no_progress, overwrite: bool = False, resume: bool = False) -> RunResult:
    """Run every stage the recipe enables; returns metrics per mask producer and stage timings."""
    dist.init_from_env(config.device)
    out_dir = prepare_run_dir(out_dir, overwrite, resume)
    if dist.is_main():
        (out_dir / "config.yaml").write_text(to_yaml(config))
    log_name = "run.log" if dist.is_main() else f"run.rank{dist.rank()}.log"
    with run_log(out_dir / log_name):
        environment = environment_report()
        log.info("environment: %s", describe_environment(environment))
        if dist.is_main():
            write_json(out_dir / "environment.json", environment)
        try:
            return RecipeRun(config, out_dir, data_root, progress, resume).run()
        except (WssegError, KeyboardInterrupt):
            raise  # errors wsseg raises on purpose already name the file or key at fault
        except Exception as exc:
            # The full traceback goes to run.log (INFO: the console shows it with -v only).
            log.info("run stopped by an unexpected error", exc_info=True)
            raise StageFailure(exc, getattr(exc, "wsseg_stage", ""), getattr(exc, "wsseg_image", ""),
                               out_dir / log_name, resume_command(out_dir, data_root)) from exc


def resume_command(out_dir: Path, data_root: Optional[Path] = None) -> str:
    """The command that continues a stopped run from its last finished stage."""
    import shlex

    root = f" --data-root {shlex.quote(str(data_root))}" if data_root is not None else ""
    return f"wsseg recipe run --resume {shlex.quote(str(out_dir))}{root}"


class RecipeRun:
    """One run of a recipe: holds the device, timer, metrics and stage cache while the stages execute."""

    def __init__(self, config: RecipeConfig, out_dir: Path, data_root, progress: ProgressFn, resume: bool = False):
        self.config, self.out_dir, self.data_root, self.progress = config, out_dir, data_root, progress
        self.resume = resume
        self.device = dist.local_device(config.device)
        self.timer = StageTimer()
        self.metrics: Dict[str, Any] = {}
        self.artifacts: Dict[str, Path] = {}
        self.classifier_ckpt: Optional[Path] = None
        self.classifier_fp: Optional[str] = None
        self.skipped_stages: List[str] = []
        self.catalog = DatasetCatalog(data_root, config.on_bad_image)  # every dataset of the run, built once
        self.metrics["skipped_images"] = self.catalog.skipped

    def dataset(self, config, key: str) -> SegmentationDataset:
        return self.catalog.get(config, key)

    # ------------------------------------------------------------------ stage cache

    def finished_stage(self, key: str, digest: str) -> Optional[Any]:
        """The saved result of stage `key` when resuming and it finished with this fingerprint, else None."""
        marker = self.out_dir / "stages" / f"{key}.json"
        if not (self.resume and marker.is_file()):
            return None
        saved = self._from_stored(json.loads(marker.read_text()))
        if saved.get("fingerprint") != digest or not all(Path(p).exists() for p in saved.get("outputs", [])):
            return None
        return saved["result"]

    # Paths inside the run folder are stored relative to it, so that a run still resumes when it is
    # moved or copied, or resumed from another working directory.
    RUN_PREFIX = "{run}/"

    def _to_stored(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._to_stored(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._to_stored(v) for v in value]
        if isinstance(value, str) and value and Path(value).exists():
            try:
                inside = Path(value).resolve().relative_to(self.out_dir.resolve())
            except (ValueError, OSError):
                return value
            return self.RUN_PREFIX + inside.as_posix()
        return value

    def _from_stored(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._from_stored(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._from_stored(v) for v in value]
        if isinstance(value, str) and value.startswith(self.RUN_PREFIX):
            return str(self.out_dir / value[len(self.RUN_PREFIX):])
        return value

    def cached(self, key: str, digest: str, fn: Callable[[], Any], outputs: Callable[[Any], List[Path]] = None):
        """Run `fn` unless a finished stage with the same fingerprint and existing outputs is on disk."""
        saved = self.finished_stage(key, digest)
        if saved is not None:
            log.info("stage %s: finished in an earlier run, skipped", key)
            self.skipped_stages.append(key)
            return saved
        result = fn()
        if dist.is_main():
            outputs_list = [str(p) for p in (outputs(result) if outputs else [])]
            write_json(self.out_dir / "stages" / f"{key}.json",
                       {"fingerprint": digest, "result": self._to_stored(result),
                        "outputs": self._to_stored(outputs_list)})
        dist.barrier()
        return result

    # ------------------------------------------------------------------ the run

    def run(self) -> RunResult:
        config = self.config
        log.info("recipe %s on %s (rank %d of %d)", config.name, self.device, dist.rank(), dist.world_size())
        eval_set = self.dataset(config.maps.dataset, "maps.dataset")
        producers = self.train_map_producers()
        with self.timer("maps"):
            map_dirs = {name: self.maps_for(name, producer, eval_set, "maps", config.maps.dataset)
                        for name, producer in producers.items()}
        self.rules = self.mask_rules(producers)
        mask_dirs: Dict[str, Path] = {}
        with self.timer("pseudo_masks"):
            for name, rule in self.rules.items():
                def write(name=name, rule=rule):
                    out = write_rule_masks(rule, eval_set, map_dirs, self.out_dir / "masks" / name, self.progress,
                                           f"masks {name}", indices=dist.shard(range(len(eval_set))))
                    dist.barrier()
                    return str(out)

                mask_dirs[name] = Path(self.cached(f"masks_{name}", self.rule_digest(rule, producers,
                                                                                    config.maps.dataset),
                                                   write, lambda r: [Path(r)]))
            if dist.is_main():
                for name in config.evaluate.references:
                    mask_dirs[name] = make_reference_masks(name, eval_set, self.out_dir / "masks" / name,
                                                           self.progress)
            dist.barrier()
        if config.segment is not None:
            mask_dirs.update(self.segment(producers, eval_set))
        if dist.is_main():
            if config.export is not None and config.export.enabled:
                mask_dirs.update(self.export(eval_set))
            self.evaluate(mask_dirs, eval_set)
        dist.barrier()
        if self.skipped_stages:
            self.metrics["resumed_skipped_stages"] = self.skipped_stages
        return finish_run(config.name, self.out_dir, self.metrics, self.timer.timings, self.artifacts)

    def train_map_producers(self) -> Dict[str, MapProducer]:
        config = self.config
        ccam_configs = {c.name: c for c in config.ccam if c.name in config.maps.methods}
        cam_methods = [m for m in config.maps.methods if m not in ccam_configs and requires_classifier(m)]
        classifier_fp = None
        unet_from_classifier = config.segment is not None and config.segment.encoder_weights == CLASSIFIER_WEIGHTS
        if cam_methods or unet_from_classifier or any(c.init == "classifier" for c in ccam_configs.values()):
            if config.classifier is None:
                raise ConfigError(f"maps.methods {config.maps.methods} need a classifier section")
            classifier_fp = fingerprint(config.classifier, config.backbone, config.seed, config.on_bad_image)

            def train():
                result = train_classifier(config.classifier, config.backbone, self.out_dir / "checkpoints",
                                          self.device, self.catalog, config.seed, self.progress, classifier_fp)
                return {"checkpoint": str(result.checkpoint), "metrics": result.metrics}

            with self.timer("classifier"):
                result = self.cached("classifier", classifier_fp, train, lambda r: [Path(r["checkpoint"])])
            self.classifier_ckpt, self.classifier_fp = Path(result["checkpoint"]), classifier_fp
            self.metrics["classifier"] = result["metrics"]
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
                options = config.maps.method_options.get(name) or {}
                producers[name] = MapProducer(
                    lambda name=name, options=options: create_map_method(
                        name, model=model, target_layer=config.maps.target_layer, **options),
                    meta.mean, meta.std, targets, fingerprint(classifier_fp, name, config.maps.target,
                                                              config.maps.target_layer, *([options] if options else [])))
        for name, ccam_config in ccam_configs.items():
            with self.timer(name):
                producers[name] = self.train_ccam(ccam_config, classifier_fp)
        return {m: producers[m] for m in config.maps.methods}

    def train_ccam(self, ccam_config, classifier_fp: Optional[str]) -> MapProducer:
        """Train one CCAM variant (polarity checked against the classifier's Grad-CAM when there is one)."""
        digest = fingerprint(ccam_config, self.config.backbone, self.config.seed, self.config.on_bad_image,
                             classifier_fp if ccam_config.init == "classifier" or ccam_config.polarity != "border"
                             else None)

        def train():
            reference, gradcam = None, None
            if self.classifier_ckpt is not None and ccam_config.polarity in ("auto", "classifier"):
                classifier, meta = load_classifier(self.classifier_ckpt)
                gradcam = create_map_method("gradcam", model=classifier.to(self.device).eval())

                def reference(images):
                    # The class the maps explain: the positive one, or (maps.target label / predicted: pets,
                    # where both classes hold an object) the class the classifier sees in each image.
                    if self.config.maps.target == "positive":
                        targets = [meta.positive_index] * len(images)
                    else:
                        with torch.no_grad():
                            targets = classifier(images).argmax(1).tolist()
                    return gradcam.compute(images, targets)

            index = self.config.ccam.index(ccam_config)
            train_set = self.catalog.concat(ccam_config.train, f"ccam.{index}.train")
            result = train_ccam(ccam_config, self.config.backbone, self.out_dir / "checkpoints", self.device,
                                train_set, self.config.seed, self.classifier_ckpt, reference, self.progress,
                                digest)
            if gradcam is not None:
                gradcam.close()
            return {"checkpoint": str(result.checkpoint), "metrics": result.metrics}

        result = self.cached(f"ccam_{ccam_config.name}", digest, train, lambda r: [Path(r["checkpoint"])])
        self.metrics[f"{ccam_config.name}_training"] = result["metrics"]
        self.artifacts[ccam_config.name] = Path(result["checkpoint"])
        model, meta = load_ccam(Path(result["checkpoint"]))
        model = model.to(self.device)
        build: Callable[[], MapMethod] = lambda: CCAMMaps(model)  # noqa: E731
        if ccam_config.inference_backend == "onnx":  # exported once, then labelled by ONNX Runtime
            from wsseg.deploy.onnx_export import export_ccam

            onnx_path = self.out_dir / "checkpoints" / f"{ccam_config.name}.maps.onnx"
            if dist.is_main() and not onnx_path.is_file():
                export_ccam(Path(result["checkpoint"]), onnx_path)
            dist.barrier()
            build = lambda: CCAMOnnxMaps(onnx_path, device=self.config.device)  # noqa: E731
        return MapProducer(build, tuple(meta["mean"]), tuple(meta["std"]),
                           lambda dataset: np.zeros(len(dataset), dtype=np.int64),
                           fingerprint(digest, ccam_config.inference_backend))

    def maps_for(self, name: str, producer: MapProducer, dataset: SegmentationDataset, folder: str,
                 dataset_config, only_positives: bool = False) -> Path:
        """Maps of one producer on one dataset, sharded across ranks, cached by fingerprint. With
        `only_positives`, images of object-free classes get no map (their pseudo-mask is empty anyway)."""
        out = self.out_dir / folder / name
        maps = self.config.maps
        digest = self.maps_digest(producer, dataset_config)
        wanted = [i for i in range(len(dataset))
                  if not only_positives or dataset.holds_object(i)]

        def compute():
            log.info("maps: %s on %d images", name, len(wanted))
            with TTAMaps(producer.build(), maps.tta.hflip, maps.tta.scales) as method:
                if method.needs_fit:
                    fit_set, fit_indices = self.fit_images(dataset, wanted)
                    fit_map_method(method, fit_set, fit_indices, maps.image_size, producer.mean, producer.std,
                                   self.device, maps.batch_size, maps.num_workers)
                write_maps(method, dataset, out, maps.image_size, producer.mean, producer.std,
                           producer.targets(dataset), self.device, maps.batch_size, maps.num_workers, self.progress,
                           description=f"maps {name}", indices=dist.shard(wanted))
            return str(out)

        return Path(self.cached(f"{folder}_{name}", digest, compute, lambda r: [Path(r)]))

    def maps_digest(self, producer: MapProducer, dataset_config) -> str:
        """Everything a producer's maps of one dataset depend on (what the stage cache and the U-Net key on)."""
        maps = self.config.maps
        fit_part = [] if maps.fit_dataset is None else [maps.fit_dataset]  # unset: fingerprints as before
        return fingerprint(producer.fingerprint, dataset_config, maps.image_size, maps.tta, self.config.on_bad_image,
                           *fit_part)

    def rule_digest(self, rule: MaskRule, producers: Dict[str, MapProducer], dataset_config) -> str:
        """What one rule's masks of a dataset depend on: the rule as applied (a calibrated threshold
        included) and the digests of the maps it reads."""
        return fingerprint([self.maps_digest(producers[m], dataset_config) for m in rule.maps_needed],
                           rule.threshold, rule.threshold_mode, rule.steps)

    def fit_images(self, dataset: SegmentationDataset, wanted: List[int]):
        """What fitted map methods learn from: `maps.fit_dataset`'s positive images, or the images being mapped.
        A fixed set such as the training images gives every mapped set the same concepts (on Kvasir-SEG
        better ones than the 120 val images alone gave)."""
        if self.config.maps.fit_dataset is None:
            return dataset, wanted
        fit_set = self.dataset(self.config.maps.fit_dataset, "maps.fit_dataset")
        positives = [i for i in range(len(fit_set)) if fit_set.holds_object(i)]
        if not positives:
            raise ConfigError(f"maps.fit_dataset: {fit_set.describe()} has no images with objects to fit on")
        return fit_set, positives

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
        dataset = self.calibration_images()
        map_dirs = {m: self.maps_for(m, producers[m], dataset, "maps_calibrate", (calib.dataset, calib.n_images))
                    for m in rule.maps_needed}
        threshold, curve = calibrate_threshold(rule, dataset, map_dirs, calib.grid)
        self.record_calibration(name, threshold, len(dataset), curve)
        return threshold

    def calibration_images(self) -> SegmentationDataset:
        """The few labelled images thresholds are calibrated on (`pseudo_masks.calibrate`), never the evaluation
        images."""
        calib = self.config.pseudo_masks.calibrate
        return self.dataset(calib.dataset, "pseudo_masks.calibrate.dataset").subset(calib.n_images)

    def record_calibration(self, name: str, threshold: float, n_images: int, curve: Dict[float, float]) -> None:
        self.metrics.setdefault("calibration", {})[name] = {"threshold": threshold, "n_images": n_images,
                                                             "dice_by_threshold": curve}
        log.info("%s: calibrated threshold %.2f on %d labelled images", name, threshold, n_images)

    def segment(self, producers: Dict[str, MapProducer], eval_set: SegmentationDataset) -> Dict[str, Path]:
        """Train the U-Net on pseudo-masks (or real masks), then optional self-training rounds.
        Returns {"unet": mask folder} plus one entry per earlier round."""
        from wsseg.models.segmenter import with_prediction
        from wsseg.stages.segment import load_segmenter, train_segmenter, write_masks, write_probabilities
        from wsseg.stages.unet_labels import confident_mask_source, pseudo_mask_source

        # How U-Nets make the probabilities of the next round's labels shapes those labels; how they make their
        # masks otherwise (`predict`, unless `self_training_predict` differs), and at which threshold, does not.
        probabilities_predict = replace(self.config.segment.self_training_predict or self.config.segment.predict,
                                        threshold=None, threshold_mode="fixed")

        seg = self.config.segment
        train_set = self.catalog.concat(seg.train, "segment.train")
        rule, map_dirs = None, None
        upstream = "ground_truth"
        if seg.masks != "ground_truth":
            rule = self.rules[seg.masks]
            with self.timer("maps_train"):
                map_dirs = {m: self.maps_for(m, producers[m], train_set, "maps_train", seg.train,
                                             only_positives=True)
                            for m in rule.maps_needed}
            # The maps' own digests: a change of size, TTA or fit set must retrain the U-Net, not just remap.
            upstream = self.rule_digest(rule, producers, seg.train)
        source = pseudo_mask_source(train_set, rule, map_dirs, seg.ignore_band,
                                    cache_dir=None if rule is None else
                                    self.out_dir / "train_masks" / f"{seg.masks}-{fingerprint(upstream, seg.ignore_band)}")
        encoder_from = []  # only when set, so that other runs keep their U-Net digests
        if seg.encoder_weights == CLASSIFIER_WEIGHTS:
            seg = replace(seg, encoder_weights=str(self.classifier_ckpt))
            encoder_from = [self.classifier_fp]
        out: Dict[str, Path] = {}
        rounds = seg.self_training_rounds
        previous_checkpoint = None
        for round_index in range(rounds + 1):
            name = "unet" if round_index == rounds else f"unet_round{round_index}"
            # Not the number of rounds: round k of a run with more rounds is the final U-Net of one with k.
            # Round 0 learns from the pseudo-masks: how later rounds make their labels (the threshold, and how
            # U-Nets predict, `predict`, which shapes those labels) is not its input.
            defaults = SegmentConfig()
            own = replace(self.config.segment, self_training_rounds=0, predict=probabilities_predict,
                          self_training_predict=None)
            if not round_index:
                own = replace(own, self_training_refine=[], confident_band=defaults.confident_band,
                              self_training_init=defaults.self_training_init, threshold=defaults.threshold,
                              self_training_epochs=defaults.self_training_epochs, predict=defaults.predict)
            digest = fingerprint(own, self.config.backbone, self.config.seed, upstream, round_index, *encoder_from)
            round_config = replace(seg, epochs=seg.self_training_epochs or seg.epochs) if round_index else seg
            start_from = previous_checkpoint if round_index and seg.self_training_init == "previous" else None

            def train(name=name, source=source, digest=digest, round_index=round_index, round_config=round_config,
                      start_from=start_from):
                earlier = self.finished_stage("unet", digest) if name != "unet" else None
                if earlier is not None:  # rounds added to a finished run: its last U-Net is this round
                    checkpoint = self.out_dir / "checkpoints" / f"{name}.pth"
                    if dist.is_main():
                        shutil.copyfile(earlier["checkpoint"], checkpoint)
                    dist.barrier()
                    log.info("stage %s: the U-Net of an earlier run with fewer rounds, reused", name)
                    self.skipped_stages.append(name)
                    return {"checkpoint": str(checkpoint), "metrics": earlier["metrics"]}
                result = train_segmenter(round_config, self.config.backbone, train_set, source,
                                         self.out_dir / "checkpoints", self.device, self.config.seed + round_index,
                                         self.progress, name=name, state_tag=digest, start_from=start_from)
                return {"checkpoint": str(result.checkpoint), "metrics": result.metrics}

            with self.timer("unet"):
                result = self.cached(name, digest, train, lambda r: [Path(r["checkpoint"])])
                self.metrics[f"{name}_training"] = result["metrics"]
                previous_checkpoint = Path(result["checkpoint"])
                model, meta = load_segmenter(previous_checkpoint)
                meta = self.predicting_as_configured(name, previous_checkpoint, model, meta)
                label_meta = with_prediction(replace(meta, threshold=seg.threshold), probabilities_predict)
                out[name] = self.out_dir / "masks" / name
                passes = [(meta, {out[name]: ((), meta.threshold)})]  # one prediction pass per way of predicting
                if round_index < rounds and seg.self_training_refine:  # the next round's labels, on val too
                    out[f"{name}_refined"] = self.out_dir / "masks" / f"{name}_refined"
                    labels = {out[f"{name}_refined"]: (seg.self_training_refine, seg.threshold)}
                    if (label_meta.input_size, label_meta.flips) == (meta.input_size, meta.flips):
                        passes[0][1].update(labels)
                    else:
                        passes.append((label_meta, labels))
                for pass_meta, mask_sets in passes:
                    write_masks(model, pass_meta, eval_set, mask_sets, self.device, seg.batch_size, self.progress,
                                indices=dist.shard(range(len(eval_set))))
                if round_index < rounds:  # the next round learns from this model's confident pixels
                    predict_part = [probabilities_predict] if probabilities_predict != SegmentConfig().predict else []

                    def probabilities(model=model, meta=label_meta, name=name):
                        prob_dir = self.out_dir / "maps_train" / name
                        write_probabilities(model, meta, train_set, prob_dir, self.device, seg.batch_size,
                                            self.progress, indices=dist.shard(range(len(train_set))))
                        dist.barrier()
                        return str(prob_dir)

                    prob_dir = Path(self.cached(f"{name}_probabilities", fingerprint(digest, *predict_part),
                                                probabilities, lambda r: [Path(r)]))
                    labels_fp = fingerprint(digest, seg.confident_band, seg.self_training_refine, *predict_part)
                    source = confident_mask_source(train_set, prob_dir, seg.confident_band, seg.self_training_refine,
                                                   cache_dir=self.out_dir / "train_masks" / f"{name}-{labels_fp}",
                                                   threshold=seg.threshold)
                    upstream = digest
            dist.barrier()
        self.artifacts["unet"] = self.out_dir / "checkpoints" / "unet.pth"
        return out

    def predicting_as_configured(self, name: str, checkpoint: Path, model, meta):
        """The U-Net's meta as `segment.predict` says, its threshold calibrated if asked. A U-Net reused from a
        run with other settings (they are not part of its fingerprint) has them updated in its checkpoint, so
        that export and `wsseg predict` follow the recipe."""
        from wsseg.models.segmenter import rewrite_meta, with_prediction
        from wsseg.stages.segment import calibrate_unet_threshold

        seg = self.config.segment
        wanted = with_prediction(replace(meta, threshold=seg.threshold), seg.predict)
        if seg.predict.threshold_mode == "calibrated":
            dataset = self.calibration_images()
            with self.timer("unet_threshold"):
                threshold, curve = calibrate_unet_threshold(model, wanted, dataset,
                                                            self.config.pseudo_masks.calibrate.grid, self.device,
                                                            seg.batch_size)
            threshold = dist.broadcast_object(threshold)  # every rank thresholds its shard as rank 0 does
            wanted = replace(wanted, threshold=threshold)
            self.record_calibration(name, threshold, len(dataset), curve)
        if wanted != meta and dist.is_main():
            rewrite_meta(checkpoint, wanted)
            log.info("%s: now predicts at %d px, flips %s, threshold %.2f (segment.predict)", checkpoint.name,
                     wanted.input_size, wanted.flips or "none", wanted.threshold)
        dist.barrier()
        return wanted

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

            write_run_grids(self.out_dir, eval_set, all_rows,
                            [m for m in mask_dirs if (self.out_dir / "maps" / m).is_dir()])

    def export(self, eval_set: SegmentationDataset) -> Dict[str, Path]:
        """Export, then segment the evaluation images with the deployed ONNX models themselves, so the
        table shows what export (and INT8) costs in Dice."""
        from wsseg.deploy.onnx_export import export_run_models
        from wsseg.deploy.predict_onnx import write_onnx_masks

        with self.timer("export"):
            calibration_set = None
            if self.config.segment is not None and self.config.export.int8:
                calibration_set = self.catalog.concat(self.config.segment.train, "segment.train")
            self.metrics["export"] = export_run_models(self.out_dir, self.config.export, self.artifacts,
                                                       calibration_set)
        out = {}
        for name, filename in (("unet_onnx", "model.onnx"), ("unet_onnx_int8", "model.int8.onnx")):
            if (self.out_dir / filename).is_file():
                out[name] = write_onnx_masks(self.out_dir / filename, eval_set, self.out_dir / "masks" / name)
        return out


def finish_run(name: str, out_dir: Path, metrics: Dict[str, Any], timings: Dict[str, float],
               artifacts: Optional[Dict[str, Path]] = None) -> RunResult:
    skipped = metrics.get("skipped_images") or {}
    if not skipped:
        metrics.pop("skipped_images", None)
    if dist.is_main():
        write_json(out_dir / "metrics.json", {**metrics, "timings_s": timings})
        (out_dir / "report.md").write_text(markdown_report(name, metrics, timings))
        if any(isinstance(v, dict) and "dice" in v for v in metrics.values()):
            bar_chart(out_dir / "plots" / "methods.png", metrics, f"{name}: mask quality")
    return RunResult(out_dir, metrics, timings, dict(artifacts or {}))
