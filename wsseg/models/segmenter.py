"""The deployable segmenter: a segmentation-models-pytorch U-Net with any smp or `tu-<timm>` encoder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

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
    # How it predicts (segment.predict): input size (None: image_size) and flips averaged over.
    predict_size: Optional[int] = None
    flips: List[str] = field(default_factory=list)
    decoder_channels: Optional[List[int]] = None  # None: smp's default widths

    @property
    def input_size(self) -> int:
        return self.predict_size or self.image_size


#: Flips a prediction can average over, and the tensor dimensions each one reverses (NCHW).
FLIP_DIMS = {"hflip": (-1,), "vflip": (-2,)}


def flip_views(flips: Sequence[str]) -> List[Tuple[int, ...]]:
    """Every combination of the named flips as dims to reverse: [()] for none, 4 views for both."""
    views: List[Tuple[int, ...]] = [()]
    for name in flips:
        views += [view + FLIP_DIMS[name] for view in views]
    return views


def with_prediction(meta: SegmenterMeta, predict) -> SegmenterMeta:
    """`meta` predicting as a `PredictConfig` says (size, flips and a fixed `threshold` when set), the
    weights' own fields unchanged. A calibrated threshold is the runner's to set."""
    flips = [name for name in FLIP_DIMS if getattr(predict, name)]
    threshold = meta.threshold if predict.threshold is None else predict.threshold
    return replace(meta, predict_size=predict.size, flips=flips, threshold=threshold)


class ProbabilityHead(torch.nn.Module):
    """U-Net logits -> probabilities, so every runtime thresholds (and averages) the same quantity."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(image))


def probability_model(model: torch.nn.Module, meta: SegmenterMeta) -> torch.nn.Module:
    """Images -> probabilities (B, 1, H, W) as `meta` predicts: averaged over its flips, if any."""
    return FlipAveraged(ProbabilityHead(model), meta.flips)


class FlipAveraged(torch.nn.Module):
    """Mean of `model`'s output over flipped copies of the input, each flipped back (test-time augmentation).
    The views run as one batch, so an exported graph keeps a single model call."""

    def __init__(self, model: torch.nn.Module, flips: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.views = flip_views(flips)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if len(self.views) == 1:
            return self.model(image)
        batch = torch.cat([image.flip(view) if view else image for view in self.views])
        outputs = self.model(batch).chunk(len(self.views))
        return torch.stack([out.flip(view) if view else out for out, view in zip(outputs, self.views)]).mean(0)


def build_unet(encoder: str, weights: Optional[str] = "none",
               decoder_channels: Optional[Sequence[int]] = None) -> smp.Unet:
    """U-Net whose encoder weights come from wsseg's sources (`tu-` encoders) or smp's own names;
    `decoder_channels`: the five decoder blocks' widths (None: smp's default)."""
    widths = {} if decoder_channels is None else {"decoder_channels": tuple(decoder_channels)}
    if not encoder.startswith("tu-"):
        smp_weights = None if weights in (None, "none") else weights
        return smp.Unet(encoder_name=encoder, encoder_weights=smp_weights, classes=1, **widths)
    model = smp.Unet(encoder_name=encoder, encoder_weights=None, classes=1, **widths)
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


#: How a U-Net predicts (size, flips, threshold): set by the run that trained it, kept beside its weights.
PREDICTION_FIELDS = ("predict_size", "flips", "threshold")


def prediction_settings_path(checkpoint: Path) -> Path:
    """`unet.pth` -> `unet.predict.json`: how the U-Net predicts, read with the weights by every loader."""
    return Path(checkpoint).with_suffix(".predict.json")


def save_prediction_settings(checkpoint: Path, meta: SegmenterMeta) -> None:
    """Record how the U-Net at `checkpoint` predicts; the weights and the metadata trained with them stay."""
    import json
    import os

    path = prediction_settings_path(checkpoint)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({name: getattr(meta, name) for name in PREDICTION_FIELDS}, indent=2))
    os.replace(tmp, path)


def read_prediction_settings(checkpoint: Path, meta: SegmenterMeta) -> SegmenterMeta:
    """`meta` predicting as recorded beside `checkpoint`, or as trained when nothing is recorded."""
    import json

    from wsseg.errors import WssegError

    path = prediction_settings_path(checkpoint)
    if not path.is_file():
        return meta
    try:
        settings = json.loads(path.read_text())
        return replace(meta, **{name: settings[name] for name in PREDICTION_FIELDS})
    except (ValueError, KeyError, TypeError) as exc:
        raise WssegError(f"{path}: not wsseg prediction settings ({exc}); delete it to predict as the U-Net "
                         "was trained") from exc


def load_segmenter(path: Path, map_location="cpu") -> Tuple[torch.nn.Module, SegmenterMeta]:
    from wsseg.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path, "U-Net checkpoint (checkpoints/unet.pth of a run)", ("encoder", "image_size"),
                                 map_location)
    meta = read_prediction_settings(path, SegmenterMeta(**checkpoint["meta"]))
    model = build_unet(meta.encoder, "none", meta.decoder_channels)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), meta
