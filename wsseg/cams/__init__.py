"""Map-method registry: `create_map_method(name, ...)`, `list_map_methods()`."""

from __future__ import annotations

from wsseg._registry import Registry
from wsseg.cams.base import MapMethod, find_last_feature_layer
from wsseg.cams.factorization import FeatureFactorization
from wsseg.cams.gradcam_family import GRADCAM_CLASSES, GradCamFamily

MAP_METHODS: Registry = Registry("map method")


def _gradcam_builder(method: str):
    def build(model=None, target_layer: str = "auto", **_):
        return GradCamFamily(method, model, target_layer)

    build.requires_classifier = True
    return build


for _name in GRADCAM_CLASSES:
    MAP_METHODS.register(_name)(_gradcam_builder(_name))


@MAP_METHODS.register("dff")
def _feature_factorization(model=None, target_layer: str = "auto", **_):
    return FeatureFactorization(model, target_layer)


_feature_factorization.requires_classifier = True


def list_map_methods():
    return MAP_METHODS.names()


def create_map_method(name: str, **kwargs) -> MapMethod:
    """Build a registered map method; Grad-CAM family members take `model` and `target_layer`."""
    return MAP_METHODS.get(name)(**kwargs)


def requires_classifier(name: str) -> bool:
    return getattr(MAP_METHODS.get(name), "requires_classifier", True)


__all__ = ["MAP_METHODS", "FeatureFactorization", "MapMethod", "create_map_method", "find_last_feature_layer", "list_map_methods",
           "requires_classifier"]
