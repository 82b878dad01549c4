"""Map-method registry: `create_map_method(name, ...)`, `list_map_methods()`."""

from __future__ import annotations

import inspect
from dataclasses import fields, is_dataclass, replace
from typing import Any, Dict, List, Tuple

from wsseg._registry import Registry
from wsseg.cams.base import MapMethod, TrainedMapMethod, find_last_feature_layer
from wsseg.cams.ccam import CCAMMethod
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


MAP_METHODS.register("ccam")(CCAMMethod())

#: In `maps.method_options.<name>`: the registered method a variant under another name is built from.
VARIANT_OF = "method"


def list_map_methods():
    return MAP_METHODS.names()


def create_map_method(name: str, **kwargs) -> MapMethod:
    """Build a registered map method: `model`, `target_layer` and the method's own options
    (`map_method_options(name)`, e.g. `n_concepts` for dff)."""
    return MAP_METHODS.get(name)(**kwargs)


def map_method_options(name: str) -> List[str]:
    """The options a method takes from `maps.method_options` (everything but `model` and `target_layer`)."""
    entry = MAP_METHODS.get(name)
    if isinstance(entry, TrainedMapMethod):
        return [f.name for f in fields(entry.options_type) if f.name != "name"]
    parameters = inspect.signature(entry).parameters
    return [p for p in parameters if p not in ("model", "target_layer")]


def resolve_method(name: str, method_options: Dict[str, Dict[str, Any]]) -> Tuple[str, Dict[str, Any]]:
    """The registered method a `maps.methods` entry runs and its raw options: the entry's own name, or for a
    variant (`maps.method_options.<name>.method`, e.g. a second CCAM) the method it names."""
    options = dict(method_options.get(name) or {})
    return options.pop(VARIANT_OF, name), options


def typed_options(name: str, method_options: Dict[str, Dict[str, Any]], key: str, problems: List[str]) -> Any:
    """A `maps.methods` entry's options as its method takes them (the options dataclass of a trained method,
    else keyword arguments), each problem appended to `problems` under `key`."""
    method, options = resolve_method(name, method_options)
    entry = MAP_METHODS.get(method)
    if isinstance(entry, TrainedMapMethod):
        from wsseg.config import build_dataclass

        if "name" in options:
            problems.append(f"{key}.name: a method's name is its key in maps.method_options")
            options.pop("name")
        built = build_dataclass(entry.options_type, options, key, problems)
        if built is None:
            return None
        if any(f.name == "name" for f in fields(built)):
            built = replace(built, name=name)
        problems.extend(entry.problems(built, key))
        return built
    valid = map_method_options(method)
    for option in options:
        if option not in valid:
            problems.append(f"{key}.{option}: unknown option (valid for {method}: {', '.join(valid) or 'none'})")
    return options


def method_setup(name: str, method_options: Dict[str, Dict[str, Any]]) -> Tuple[str, Any]:
    """(registered method, typed options) of a `maps.methods` entry of a validated recipe."""
    from wsseg.errors import ConfigError

    problems: List[str] = []
    options = typed_options(name, method_options, f"maps.method_options.{name}", problems)
    if problems:
        raise ConfigError(problems)
    return resolve_method(name, method_options)[0], options


def is_trained(method: str) -> bool:
    """Whether a registered method trains a model of its own in the run (train / export hooks)."""
    return isinstance(MAP_METHODS.get(method), TrainedMapMethod)


def requires_classifier(method: str, options: Any = None) -> bool:
    """Whether `method` (with these typed options) needs the recipe's classifier stage."""
    entry = MAP_METHODS.get(method)
    if isinstance(entry, TrainedMapMethod):
        return entry.requires_classifier(options if is_dataclass(options) else entry.options_type())
    return getattr(entry, "requires_classifier", True)


__all__ = ["MAP_METHODS", "FeatureFactorization", "MapMethod", "TrainedMapMethod", "VARIANT_OF",
           "create_map_method", "find_last_feature_layer", "is_trained", "list_map_methods", "map_method_options",
           "method_setup", "requires_classifier", "resolve_method", "typed_options"]
