"""The deployable segmenter: a segmentation-models-pytorch U-Net with any smp or `tu-<timm>` encoder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import segmentation_models_pytorch as smp
import torch

from wsseg.checkpoint import atomic_save
from wsseg.models.weights import create_timm_model


@dataclass
class SegmenterMeta:
    """Preprocessing and post-processing a deployment needs, stored with the weights (and in ONNX)."""

    encoder: str
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    threshold: float = 0.5
    classes: List[str] = field(default_factory=lambda: ["background", "foreground"])
    trained_on: str = ""


def build_unet(encoder: str, weights: Optional[str] = "none") -> smp.Unet:
    """U-Net whose encoder weights come from wsseg's sources (`tu-` encoders) or smp's own names."""
    if not encoder.startswith("tu-"):
        smp_weights = None if weights in (None, "none") else weights
        return smp.Unet(encoder_name=encoder, encoder_weights=smp_weights, classes=1)
    model = smp.Unet(encoder_name=encoder, encoder_weights=None, classes=1)
    if weights not in (None, "none"):
        timm_encoder = model.encoder.model
        source = create_timm_model(encoder[3:], weights, features_only=True,
                                   out_indices=tuple(timm_encoder.feature_info.out_indices))
        timm_encoder.load_state_dict(source.state_dict(), strict=True)
    return model


def encoder_normalisation(encoder: str) -> Tuple[tuple, tuple]:
    if encoder.startswith("tu-"):
        import timm

        cfg = timm.data.resolve_data_config({}, model=timm.create_model(encoder[3:], pretrained=False))
        return tuple(cfg["mean"]), tuple(cfg["std"])
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def save_segmenter(path: Path, model: torch.nn.Module, meta: SegmenterMeta, extra: dict = None) -> None:
    atomic_save({"meta": asdict(meta), "state_dict": model.state_dict(), **(extra or {})}, path)


def load_segmenter(path: Path, map_location="cpu") -> Tuple[torch.nn.Module, SegmenterMeta]:
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    meta = SegmenterMeta(**checkpoint["meta"])
    model = build_unet(meta.encoder, "none")
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), meta
