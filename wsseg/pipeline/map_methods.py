"""The stages that make map methods: the classifier (for the CAM family, and a U-Net encoder), then every
method of `maps.methods` as a MapProducer (methods that train, like CCAM, train here through their hook)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from wsseg.cams import create_map_method, is_trained, MAP_METHODS, method_setup, requires_classifier
from wsseg.config_schema import CLASSIFIER_WEIGHTS, RecipeConfig
from wsseg.errors import ConfigError
from wsseg.models.classifier import load_classifier
from wsseg.pipeline.context import MapProducer, RunContext, Stage
from wsseg.pipeline.executor import fingerprint
from wsseg.stages.classifier import predict_probabilities, train_classifier
from wsseg.stages.maps import choose_targets

log = logging.getLogger("wsseg")


def method_setups(config: RecipeConfig) -> Dict[str, Tuple[str, Any]]:
    """Each `maps.methods` entry -> (registered method, its typed options)."""
    return {name: method_setup(name, config.maps.method_options) for name in config.maps.methods}


#: How images are normalised for a map method that brings no model of its own (ImageNet statistics).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ClassifierStage(Stage):
    """Train the image classifier when a map method (the CAM family, a classifier-initialised CCAM) or the
    U-Net needs it."""

    name = "classifier"
    reads = ("config.classifier", "config.backbone")
    writes = ("classifier", "metrics.classifier")

    def enabled(self, config: RecipeConfig) -> bool:
        unet_from_classifier = config.segment is not None and config.segment.encoder_weights == CLASSIFIER_WEIGHTS
        needed = unet_from_classifier or any(requires_classifier(method, options)
                                             for method, options in method_setups(config).values())
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
    """One MapProducer per `maps.methods` entry: CAM methods on the classifier, methods that train (CCAM)
    through their `train` hook, the others (plug-ins that need no model) as they are."""

    name = "map_methods"
    reads = ("classifier", "config.maps")
    writes = ("producers", "artifacts", "exports")

    def run(self, context: RunContext) -> None:
        producers = {}
        setups = method_setups(context.config)
        cam_methods = {name: setup for name, setup in setups.items()
                       if not is_trained(setup[0]) and requires_classifier(*setup)}
        if cam_methods:
            producers.update(self.cam_producers(context, cam_methods))
        for name, (method, options) in setups.items():
            if is_trained(method):
                with context.timer(name):
                    producers[name] = MAP_METHODS.get(method).train(context, name, options)
            elif name not in producers:  # registered methods that need no classifier (plug-ins)
                producers[name] = MapProducer(
                    lambda method=method, options=options: create_map_method(method, model=None, **options),
                    IMAGENET_MEAN, IMAGENET_STD, lambda dataset: np.zeros(len(dataset), dtype=np.int64),
                    fingerprint(name, *self._variant_key(name, method, options)))
        context.producers = {m: producers[m] for m in context.config.maps.methods}

    @staticmethod
    def _variant_key(name: str, method: str, options) -> tuple:
        """What a producer is keyed on beside its name: its options, and the method a variant is built from."""
        return (options,) if method == name else (method, options)

    @staticmethod
    def cam_producers(context: RunContext, setups: Dict[str, Tuple[str, Any]]):
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
        for name, (method, options) in setups.items():
            producers[name] = MapProducer(
                lambda method=method, options=options: create_map_method(
                    method, model=model, target_layer=config.maps.target_layer, **options),
                meta.mean, meta.std, targets,
                fingerprint(context.classifier_fingerprint, name, config.maps.target, config.maps.target_layer,
                            *MapMethodsStage._variant_key(name, method, options)))
        return producers
