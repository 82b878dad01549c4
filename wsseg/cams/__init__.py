"""Map-method registry: `create_map_method(name, ...)`, `list_map_methods()`."""

from __future__ import annotations

import inspect
from typing import List

from wsseg._registry import Registry
from wsseg.cams.base import MapMethod, find_last_feature_layer
from wsseg.cams.factorization import FeatureFactorization
from wsseg.cams.gradcam_family import GRADCAM_CLASSES, GradCamFamily

MAP_METHODS: Registry = Registry("map method")


def _gradcam_builder(method: str):
    def build(model=None, target_layer: str = "auto"):
        return GradCamFamily(method, model, target_layer)

    build.requires_classifier = True
    return build


for _name in GRADCAM_CLASSES:
    MAP_METHODS.register(_name)(_gradcam_builder(_name))


@MAP_METHODS.register("dff")
def _feature_factorization(model=None, target_layer: str = "auto", n_concepts: int = 3, max_iter: int = 400):
    return FeatureFactorization(model, target_layer, n_concepts=n_concepts, max_iter=max_iter)


def list_map_methods():
    return MAP_METHODS.names()


def create_map_method(name: str, **kwargs) -> MapMethod:
    """Build a registered map method: `model`, `target_layer` and the method's own options
    (`map_method_options(name)`, e.g. `n_concepts` for dff)."""
    return MAP_METHODS.get(name)(**kwargs)


def map_method_options(name: str) -> List[str]:
    """The options a method takes from `maps.method_options` (everything but `model` and `target_layer`)."""
    parameters = inspect.signature(MAP_METHODS.get(name)).parameters
    return [p for p in parameters if p not in ("model", "target_layer")]


def requires_classifier(name: str) -> bool:
    return getattr(MAP_METHODS.get(name), "requires_classifier", True)


__all__ = ["MAP_METHODS", "FeatureFactorization", "MapMethod", "create_map_method", "find_last_feature_layer",
           "list_map_methods", "map_method_options", "requires_classifier"]
