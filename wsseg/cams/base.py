"""The map-method contract: a batch of normalised images and target classes in, maps in [0, 1] out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, List, Sequence, Tuple

import numpy as np
import torch


class MapMethod(ABC):
    """One way of producing activation maps. Subclasses supply `compute`; `close` releases hooks.

    Use as a context manager so hooks are always removed.
    """

    #: Built from the image-level classifier (Grad-CAM family) or from a model of its own (CCAM).
    requires_classifier = True
    #: Learns something from the image set before mapping it (feature factorisation): call `fit` first.
    needs_fit = False

    def fit(self, batches: Iterable[torch.Tensor]) -> "MapMethod":
        """Learn from batches of normalised images (those to be mapped, or a sample); most methods need nothing."""
        return self

    @abstractmethod
    def compute(self, images: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
        """Return float32 maps of shape (B, H, W) with values in [0, 1], H and W those of `images`."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class TrainedMapMethod:
    """A registry entry for a map method that trains a model of its own in the run (CCAM). Its options are
    the dataclass `options_type` (`maps.method_options.<name>`, checked by the recipe loader); calling it
    with a trained `model` builds the MapMethod.

    `train(context, name, options)` runs inside the map-methods stage: it trains (through `context.cached`,
    keyed on what it read), registers what export writes in `context.exports[name]`, and returns the
    `wsseg.pipeline.MapProducer` that maps any dataset."""

    options_type: type = object

    def __call__(self, model=None, target_layer: str = "auto", **options) -> MapMethod:
        raise NotImplementedError

    def requires_classifier(self, options: Any) -> bool:
        """Whether the recipe needs the classifier stage for these options."""
        return False

    def problems(self, options: Any, key: str) -> List[str]:
        """What is wrong with `options` beyond their types (`key` names them in the recipe)."""
        return []

    def train(self, context, name: str, options: Any):
        raise NotImplementedError

    def untrained_model(self, backbone: str, weights: str, options: Any):
        """The model as initialised (`wsseg bench maps` times it: speed does not depend on training)."""
        raise NotImplementedError

    def export(self, checkpoint: Path, out_path: Path, opset: int = 17):
        """Write the trained model as ONNX and return a report (a dict, recorded in metrics.json); the
        run's export stage calls it through `context.exports`."""
        raise NotImplementedError


def resolve_target_layer(model: torch.nn.Module, target_layer: str = "auto") -> Tuple[str, torch.nn.Module]:
    """The module maps are taken from: `target_layer` by name, or the last feature layer for "auto"."""
    name = find_last_feature_layer(model) if target_layer == "auto" else target_layer
    modules = dict(model.named_modules())
    if name not in modules:
        top = [n for n in modules if n and "." not in n]
        raise ValueError(f"maps.target_layer: model has no module '{name}' (top-level modules: {', '.join(top)})")
    return name, modules[name]


def find_last_feature_layer(model: torch.nn.Module, image_size: int = 64) -> str:
    """Name of the outermost module that outputs the final feature map (e.g. `layer4`, `bn2`).

    Found by tracing one forward pass, so it works for any timm CNN without a per-architecture table.
    """
    finished = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: finished.append((n, out)))
             for name, m in model.named_modules() if name]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model.forward_features(torch.zeros(1, 3, image_size, image_size,
                                                          device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for name, out in reversed(finished):
        if torch.is_tensor(out) and out.shape == features.shape and out.ndim == 4:
            return name
    raise ValueError("could not find a 4-D feature layer; set maps.target_layer to a module name")
