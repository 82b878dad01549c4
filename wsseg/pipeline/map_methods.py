"""The stages that make map methods: the classifier (for the CAM family, and a U-Net encoder), then every
method of `maps.methods` as a MapProducer, CCAM variants trained here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from wsseg import distributed as dist
from wsseg.cams import create_map_method, requires_classifier
from wsseg.cams.base import MapMethod
from wsseg.cams.ccam import CCAMMaps, CCAMOnnxMaps
from wsseg.config_schema import CLASSIFIER_WEIGHTS, RecipeConfig
from wsseg.errors import ConfigError
from wsseg.models.classifier import load_classifier
from wsseg.pipeline.context import MapProducer, RunContext, Stage
from wsseg.pipeline.executor import fingerprint
from wsseg.stages.ccam import load_ccam, train_ccam
from wsseg.stages.classifier import predict_probabilities, train_classifier
from wsseg.stages.maps import choose_targets

log = logging.getLogger("wsseg")


def _ccam_configs(config: RecipeConfig):
    return {c.name: c for c in config.ccam if c.name in config.maps.methods}


def _cam_methods(config: RecipeConfig):
    ccam = _ccam_configs(config)
    return [m for m in config.maps.methods if m not in ccam and requires_classifier(m)]


def _model_free_methods(config: RecipeConfig):
    ccam = _ccam_configs(config)
    return [m for m in config.maps.methods if m not in ccam and not requires_classifier(m)]


#: How images are normalised for a map method that brings no model of its own (ImageNet statistics).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ClassifierStage(Stage):
    """Train the image classifier when a CAM method, a classifier-initialised CCAM or the U-Net needs it."""

    name = "classifier"
    reads = ("config.classifier", "config.backbone")
    writes = ("classifier", "metrics.classifier")

    def enabled(self, config: RecipeConfig) -> bool:
        unet_from_classifier = config.segment is not None and config.segment.encoder_weights == CLASSIFIER_WEIGHTS
        needed = bool(_cam_methods(config)) or unet_from_classifier or \
            any(c.init == "classifier" for c in _ccam_configs(config).values())
        if needed and config.classifier is None:
            raise ConfigError(f"maps.methods {config.maps.methods} need a classifier section")
        return needed

    def run(self, context: RunContext) -> None:
        config = context.config
        digest = fingerprint(config.classifier, config.backbone, config.seed, config.on_bad_image)

        def train():
            result = train_classifier(config.classifier, config.backbone, context.layout.checkpoints, context.device,
                                      context.catalog, config.seed, context.progress, digest)
            return {"checkpoint": str(result.checkpoint), "metrics": result.metrics}

        with context.timer("classifier"):
            result = context.cached("classifier", digest, train, lambda r: [Path(r["checkpoint"])])
        context.classifier = (Path(result["checkpoint"]), digest)
        context.metrics["classifier"] = result["metrics"]


class MapMethodsStage(Stage):
    """One MapProducer per `maps.methods` entry: CAM methods on the classifier, CCAM variants trained."""

    name = "map_methods"
    reads = ("classifier", "config.maps", "config.ccam")
    writes = ("producers", "artifacts")

    def run(self, context: RunContext) -> None:
        config = context.config
        producers = {}
        cam_methods = _cam_methods(config)
        if cam_methods:
            producers.update(self.cam_producers(context, cam_methods))
        for name in _model_free_methods(config):  # registered methods that need no classifier (plug-ins)
            options = config.maps.method_options.get(name) or {}
            producers[name] = MapProducer(
                lambda name=name, options=options: create_map_method(name, model=None, **options),
                IMAGENET_MEAN, IMAGENET_STD, lambda dataset: np.zeros(len(dataset), dtype=np.int64),
                fingerprint(name, options))
        for name, ccam_config in _ccam_configs(config).items():
            with context.timer(name):
                producers[name] = self.train_ccam(context, ccam_config)
        context.producers = {m: producers[m] for m in config.maps.methods}

    @staticmethod
    def cam_producers(context: RunContext, names):
        config, device = context.config, context.device
        model, meta = load_classifier(context.classifier_checkpoint)
        model = model.to(device)

        def targets(dataset):
            predicted = None
            if config.maps.target == "predicted":
                predicted = predict_probabilities(model, dataset, meta, device, config.maps.batch_size,
                                                  context.progress).argmax(1)
            return choose_targets(config.maps.target, dataset, meta.positive_index, predicted)

        producers = {}
        for name in names:
            options = config.maps.method_options.get(name) or {}
            producers[name] = MapProducer(
                lambda name=name, options=options: create_map_method(
                    name, model=model, target_layer=config.maps.target_layer, **options),
                meta.mean, meta.std, targets,
                fingerprint(context.classifier_fingerprint, name, config.maps.target, config.maps.target_layer,
                            options))
        return producers

    @staticmethod
    def train_ccam(context: RunContext, ccam_config) -> MapProducer:
        """Train one CCAM variant (polarity checked against the classifier's Grad-CAM when there is one)."""
        config, device = context.config, context.device
        uses_classifier = ccam_config.init == "classifier" or ccam_config.polarity != "border"
        digest = fingerprint(ccam_config, config.backbone, config.seed, config.on_bad_image,
                             context.classifier_fingerprint if uses_classifier else None)

        def train():
            reference, gradcam = None, None
            if context.classifier is not None and ccam_config.polarity in ("auto", "classifier"):
                classifier, meta = load_classifier(context.classifier_checkpoint)
                gradcam = create_map_method("gradcam", model=classifier.to(device).eval())

                def reference(images):
                    # The class the maps explain: the positive one, or (maps.target label / predicted: pets,
                    # where both classes hold an object) the class the classifier sees in each image.
                    if config.maps.target == "positive":
                        targets = [meta.positive_index] * len(images)
                    else:
                        with torch.no_grad():
                            targets = classifier(images).argmax(1).tolist()
                    return gradcam.compute(images, targets)

            index = config.ccam.index(ccam_config)
            train_set = context.catalog.concat(ccam_config.train, f"ccam.{index}.train")
            result = train_ccam(ccam_config, config.backbone, context.layout.checkpoints, device, train_set,
                                config.seed, context.classifier_checkpoint, reference, context.progress, digest)
            if gradcam is not None:
                gradcam.close()
            return {"checkpoint": str(result.checkpoint), "metrics": result.metrics}

        result = context.cached(f"ccam_{ccam_config.name}", digest, train, lambda r: [Path(r["checkpoint"])])
        context.metrics[f"{ccam_config.name}_training"] = result["metrics"]
        checkpoint = Path(result["checkpoint"])
        context.artifacts[ccam_config.name] = checkpoint
        model, meta = load_ccam(checkpoint)
        model = model.to(device)
        build: Callable[[], MapMethod] = lambda: CCAMMaps(model)  # noqa: E731
        if ccam_config.inference_backend == "onnx":  # exported once, then labelled by ONNX Runtime
            from wsseg.deploy.onnx_export import export_ccam

            onnx_path = context.layout.ccam_maps_onnx(ccam_config.name)
            if dist.is_main() and not onnx_path.is_file():
                export_ccam(checkpoint, onnx_path)
            dist.barrier()
            build = lambda: CCAMOnnxMaps(onnx_path, device=config.device)  # noqa: E731
        return MapProducer(build, tuple(meta["mean"]), tuple(meta["std"]),
                           lambda dataset: np.zeros(len(dataset), dtype=np.int64),
                           fingerprint(digest, ccam_config.inference_backend))
