"""Where everything of a run lives: the one place that spells the run directory's paths.

    config.yaml  environment.json  run.log  metrics.json  report.md  per_image.csv
    stages/<key>.json            what each finished stage recorded (the cache, see pipeline.executor)
    checkpoints/<name>.pth       trained models; <name>.predict.json: how a U-Net predicts
    maps/<method>/<stem>.npy     maps of the evaluation images (maps_train/, maps_calibrate/ likewise)
    masks/<producer>/<stem>.png  every producer's masks of the evaluation images
    train_masks/<name>-<digest>/<stem>.png   the labels a U-Net learns from
    model.onnx  model.int8.onnx  <map method>.onnx   what export writes (a trained map method: CCAM)
    plots/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def log(self, rank: int = 0) -> Path:
        return self.root / ("run.log" if rank == 0 else f"run.rank{rank}.log")

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def per_image(self) -> Path:
        return self.root / "per_image.csv"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def stage_record(self, key: str) -> Path:
        return self.root / "stages" / f"{key}.json"

    @property
    def image_cache(self) -> Path:
        """Decoded images, when the recipe keeps them (`image_cache: true`; wsseg.data.image_cache)."""
        return self.root / "image_cache"

    def partial_record(self, key: str) -> Path:
        """Which fingerprint a stage's folder is being written for, while it is (wsseg.pipeline.executor)."""
        return self.root / "stages" / f"{key}.partial.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / f"{name}.pth"

    @property
    def unet(self) -> Path:
        return self.checkpoint("unet")

    @property
    def classifier(self) -> Path:
        return self.checkpoint("classifier")

    def maps(self, name: str, folder: str = "maps") -> Path:
        """`folder`: maps (evaluation images), maps_train (U-Net training images) or maps_calibrate."""
        return self.root / folder / name

    def masks(self, name: str) -> Path:
        return self.root / "masks" / name

    def probabilities(self, name: str) -> Path:
        """A U-Net's probabilities of its training images, from which the next round's labels are made."""
        return self.root / "maps_train" / name

    def labels(self, name: str, digest: str) -> Path:
        return self.root / "train_masks" / f"{name}-{digest}"

    @property
    def model_onnx(self) -> Path:
        return self.root / "model.onnx"

    @property
    def model_int8(self) -> Path:
        return self.root / "model.int8.onnx"

    def map_model_onnx(self, name: str) -> Path:
        """A trained map method's exported model (`<name>.onnx`)."""
        return self.root / f"{name}.onnx"

    def map_labelling_onnx(self, name: str, tag: str) -> Path:
        """The map model ONNX Runtime labels with inside the run (CCAM's `inference_backend: onnx`), tagged
        with the trained model's fingerprint: a retrained model never labels through an earlier export."""
        return self.checkpoints / f"{name}.{tag}.maps.onnx"
