"""What the stages of a run share: the recipe, the run folder, the cache, and what earlier stages made."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from wsseg.cams.base import MapMethod
from wsseg.config_schema import RecipeConfig
from wsseg.data import DatasetCatalog
from wsseg.data.base import SegmentationDataset
from wsseg.pipeline.executor import StageExecutor
from wsseg.pipeline.layout import RunLayout
from wsseg.progress import ProgressFn, no_progress

log = logging.getLogger("wsseg")


@dataclass
class MapProducer:
    """A trained map method ready to run on any dataset: how to build it, normalise for it, target it."""

    build: Callable[[], MapMethod]
    mean: tuple
    std: tuple
    targets: Callable[[SegmentationDataset], np.ndarray]
    fingerprint: str


@dataclass
class RunContext:
    """Handed to every stage. The fields below `progress` are filled in by the stages, in their order."""

    config: RecipeConfig
    layout: RunLayout
    executor: StageExecutor
    catalog: DatasetCatalog
    device: torch.device
    progress: ProgressFn = no_progress
    metrics: Dict[str, Any] = field(default_factory=dict)
    artifacts: Dict[str, Path] = field(default_factory=dict)  # what the run trained: name -> checkpoint
    # How export writes a trained map method's model: name -> fn(out_path, opset) (its `export` hook).
    exports: Dict[str, Callable[[Path, int], Any]] = field(default_factory=dict)
    eval_set: Optional[SegmentationDataset] = None  # maps.dataset: the images masked and scored
    classifier: Optional[Tuple[Path, str]] = None  # checkpoint, fingerprint
    producers: Dict[str, MapProducer] = field(default_factory=dict)
    map_dirs: Dict[str, Path] = field(default_factory=dict)
    rules: Dict[str, Any] = field(default_factory=dict)  # mask producer -> MaskRule
    mask_dirs: Dict[str, Path] = field(default_factory=dict)  # every producer scored in the table

    def dataset(self, config, key: str) -> SegmentationDataset:
        return self.catalog.get(config, key)

    def timer(self, stage: str):
        return self.executor.timer(stage)

    def cached(self, key: str, digest: str, work, outputs=None):
        return self.executor.cached(key, digest, work, outputs)

    @property
    def classifier_checkpoint(self) -> Optional[Path]:
        return None if self.classifier is None else self.classifier[0]

    @property
    def classifier_fingerprint(self) -> Optional[str]:
        return None if self.classifier is None else self.classifier[1]

    def calibration_images(self) -> SegmentationDataset:
        """The few labelled images thresholds are calibrated on (`pseudo_masks.calibrate`), never the
        evaluation images."""
        calib = self.config.pseudo_masks.calibrate
        return self.dataset(calib.dataset, "pseudo_masks.calibrate.dataset").subset(calib.n_images)

    def record_calibration(self, name: str, threshold: float, n_images: int, curve: Dict[float, float]) -> None:
        self.metrics.setdefault("calibration", {})[name] = {"threshold": threshold, "n_images": n_images,
                                                             "dice_by_threshold": curve}
        log.info("%s: calibrated threshold %.2f on %d labelled images", name, threshold, n_images)


class Stage:
    """One step of a recipe. `reads` and `writes` name the RunContext fields it takes and fills (what a
    reader of the runner needs to follow the data); `run` does the work through `context.cached`, which
    keys each piece on the fingerprint of what it reads."""

    name: str = ""
    reads: Tuple[str, ...] = ()
    writes: Tuple[str, ...] = ()

    def enabled(self, config: RecipeConfig) -> bool:
        return True

    def main_only(self) -> bool:
        """Whether only rank 0 runs it (under torchrun); the others wait at the barrier after it."""
        return False

    def run(self, context: RunContext) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reads={list(self.reads)}, writes={list(self.writes)})"
