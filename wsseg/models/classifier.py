"""Image-level classifier: a timm model plus the metadata needed to use it later."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Tuple

import timm
import torch

from wsseg.checkpoint import atomic_save
from wsseg.models.weights import create_timm_model


@dataclass
class ClassifierMeta:
    """Everything besides the weights that inference needs: stored in the checkpoint."""

    model_name: str
    classes: List[str]
    positive_index: int
    image_size: int
    mean: Tuple[float, ...] = field(default=(0.485, 0.456, 0.406))
    std: Tuple[float, ...] = field(default=(0.229, 0.224, 0.225))


def normalisation(model: torch.nn.Module) -> Tuple[tuple, tuple]:
    """Mean/std the backbone was pretrained with (timm's pretrained_cfg), ImageNet's otherwise."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return tuple(cfg["mean"]), tuple(cfg["std"])


def build_classifier(model_name: str, weights: str, num_classes: int) -> torch.nn.Module:
    return create_timm_model(model_name, weights, num_classes=num_classes)


def save_classifier(path: Path, model: torch.nn.Module, meta: ClassifierMeta, extra: dict = None) -> None:
    atomic_save({"meta": asdict(meta), "state_dict": model.state_dict(), **(extra or {})}, path)


def load_classifier(path: Path, map_location="cpu") -> Tuple[torch.nn.Module, ClassifierMeta]:
    """Rebuild the classifier from its checkpoint (no download: the weights are in the file)."""
    from wsseg.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path, "classifier checkpoint (checkpoints/classifier.pth of a run)",
                                 ("model_name", "classes"), map_location)
    meta = ClassifierMeta(**checkpoint["meta"])
    model = timm.create_model(meta.model_name, pretrained=False, num_classes=len(meta.classes))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), meta
