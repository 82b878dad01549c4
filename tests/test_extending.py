"""What docs/extending.md promises: a map method, a mask refinement and a dataset registered from outside
the package work in a recipe like wsseg's own."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_demo_overrides
from wsseg.cams import MAP_METHODS, list_map_methods
from wsseg.cams.base import MapMethod, TrainedMapMethod
from wsseg.cli.main import main
from wsseg.config_schema import DatasetConfig
from wsseg.data import DATASETS
from wsseg.data.base import Record, SegmentationDataset, list_images, require_dir
from wsseg.refine import MASK_STEPS


class CentreBlob(MapMethod):
    requires_classifier = False

    def __init__(self, width: float = 0.3):
        self.width = width

    def compute(self, images, targets=()):
        b, _, h, w = images.shape
        y, x = np.mgrid[0:h, 0:w]
        blob = np.exp(-(((x - w / 2) / (self.width * w)) ** 2 + ((y - h / 2) / (self.width * h)) ** 2))
        return np.repeat(blob[None].astype(np.float32), b, axis=0)


widths = []


def build_centre_blob(model=None, target_layer="auto", width: float = 0.3):
    widths.append(width)
    return CentreBlob(width)


build_centre_blob.requires_classifier = False


@pytest.fixture
def centre_blob():
    MAP_METHODS.register("centre_blob")(build_centre_blob)
    widths.clear()
    yield
    MAP_METHODS.unregister("centre_blob")


def _maps_only(method):
    return tiny_demo_overrides((method,)) + ["segment=null", "export.enabled=false", "pseudo_masks.variants=[]"]


def test_a_map_method_registered_outside_wsseg_runs_in_a_recipe(tmp_path, centre_blob):
    assert "centre_blob" in list_map_methods()
    out = tmp_path / "run"
    overrides = tiny_demo_overrides(("centre_blob",)) + [
        "segment.masks=centre_blob", "export.enabled=false", "pseudo_masks.variants=[]",
        "segment.self_training_rounds=0", "maps.method_options={centre_blob: {width: 0.25}}"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert widths and set(widths) == {0.25}  # the recipe's option reached the builder
    assert "classifier" not in metrics  # a method that needs no classifier trains none
    assert 0 < metrics["centre_blob"]["dice"] <= 1 and 0 <= metrics["unet"]["dice"] <= 1
    assert len(list((out / "masks" / "centre_blob").glob("*.png"))) == metrics["centre_blob"]["n_images"]
    # An unknown option is refused by validation, naming the key, like a built-in method's.
    bad = overrides + ["maps.method_options={centre_blob: {radius: 2}}"]
    assert main(["recipe", "validate", "demo", *bad]) == 2


def test_a_mask_step_registered_outside_wsseg_refines_pseudo_masks(tmp_path, centre_blob):
    import cv2

    def open_mask(mask, size: int = 5, **_):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel) > 0

    MASK_STEPS.register("open")(open_mask)
    try:
        out = tmp_path / "run"
        variant = "pseudo_masks.variants=[{name: blob_open, source: centre_blob, refine: [{name: open, options: {size: 63}}]}]"
        assert main(["recipe", "run", "demo", "--out", str(out), *_maps_only("centre_blob")[:-1], variant]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        plain = cv2.imread(str(next((out / "masks" / "centre_blob").glob("*.png"))), cv2.IMREAD_GRAYSCALE) > 0
        opened = cv2.imread(str(next((out / "masks" / "blob_open").glob("*.png"))), cv2.IMREAD_GRAYSCALE) > 0
        assert "blob_open" in metrics and opened.sum() < plain.sum()  # an opening this wide removes pixels
    finally:
        MASK_STEPS.unregister("open")


def test_a_dataset_registered_outside_wsseg_is_read_by_a_recipe(tmp_path, centre_blob):
    class Lesions(SegmentationDataset):
        name = "lesions"

        def __init__(self, root, split="train"):
            folder = require_dir(root / split / "images", "lesions images")
            records = [Record(p.stem, p, 1, p.parent.parent / "masks" / p.name) for p in list_images(folder)]
            super().__init__(records, ["background", "lesion"], positive_index=1, object_free=())

    root = tmp_path / "lesions"
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "val" / "images" / f"l{i}.png")
        mask = np.zeros((48, 48), np.uint8)
        mask[12:36, 12:36] = 255
        Image.fromarray(mask).save(root / "val" / "masks" / f"l{i}.png")
    DATASETS.register("lesions")(Lesions)
    try:
        out = tmp_path / "run"
        dataset = f"maps.dataset={{name: lesions, root: {root}, split: val}}"
        assert main(["recipe", "run", "demo", "--out", str(out), *_maps_only("centre_blob"), dataset]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["centre_blob"]["n_images"] == 4 and metrics["centre_blob"]["dice"] > 0.5  # a centred square
    finally:
        DATASETS.unregister("lesions")


# ----------------------------------------------------------------------------- a map method that trains


@dataclass
class BrightnessOptions:
    train: List[DatasetConfig] = field(default_factory=list)
    sharpness: float = 4.0
    name: str = "brightness"


class BrightnessModel(torch.nn.Module):
    """Map = sigmoid(sharpness * (grey - mean) / std), with mean and std learnt from the training images."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, sharpness: float = 4.0):
        super().__init__()
        self.register_buffer("stats", torch.tensor([mean, std, sharpness]))

    def forward(self, images):
        grey = images.mean(1, keepdim=True)
        return torch.sigmoid(self.stats[2] * (grey - self.stats[0]) / self.stats[1])


class BrightnessMaps(MapMethod):
    requires_classifier = False

    def __init__(self, model):
        self.model = model

    def compute(self, images, targets=()):
        with torch.no_grad():
            return self.model(images)[:, 0].numpy().astype(np.float32)


class Brightness(TrainedMapMethod):
    options_type = BrightnessOptions
    trained = []

    def __call__(self, model=None, target_layer="auto", **options):
        return BrightnessMaps(model)

    def problems(self, options, key):
        return [] if options.train else [f"{key}.train: at least one dataset is needed"]

    def train(self, context, name, options):
        from wsseg.checkpoint import atomic_save
        from wsseg.pipeline import MapProducer
        from wsseg.pipeline.executor import fingerprint

        def fit():
            self.trained.append(name)
            dataset = context.catalog.concat(options.train, f"maps.method_options.{name}.train")
            grey = [(dataset.load_image(i) / 255.0 - MEAN[0]).mean() / STD[0] for i in range(len(dataset))]
            path = context.layout.checkpoints / f"{name}.pth"
            atomic_save({"mean": float(np.mean(grey)), "std": float(np.std(grey)) + 1e-6}, path)
            return {"checkpoint": str(path)}

        digest = fingerprint(options, context.config.seed)
        checkpoint = Path(context.cached(f"brightness_{name}", digest, fit, lambda r: [Path(r["checkpoint"])])["checkpoint"])
        model = BrightnessModel(**torch.load(checkpoint), sharpness=options.sharpness)
        context.exports[name] = lambda out, opset: self.export_model(model, out, opset)
        return MapProducer(lambda: BrightnessMaps(model), MEAN, STD, lambda d: np.zeros(len(d), np.int64), digest)

    @staticmethod
    def export_model(model, out, opset):
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(out), input_names=["image"], opset_version=opset,
                          dynamo=False)
        return {"path": str(out)}


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_a_map_method_that_trains_registered_outside_wsseg_runs_exports_and_resumes(tmp_path):
    MAP_METHODS.register("brightness")(Brightness())  # its module plus this one registration line
    Brightness.trained.clear()
    try:
        out = tmp_path / "run"
        train = "{name: synthetic, split: train, options: {n: 8, size: 64}}"
        overrides = _maps_only("bright") + [f"maps.method_options={{bright: {{method: brightness, train: [{train}]}}}}",
                                            "export.enabled=true", "export.int8=false"]
        assert main(["recipe", "validate", "demo", *overrides]) == 0
        assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert Brightness.trained == ["bright"] and "classifier" not in metrics
        assert 0 <= metrics["bright"]["dice"] <= 1 and len(list((out / "maps" / "bright").glob("*.npy"))) == 6
        assert (out / "bright.onnx").is_file() and metrics["export"]["bright"]["path"].endswith("bright.onnx")
        assert main(["recipe", "run", "--resume", str(out)]) == 0
        assert Brightness.trained == ["bright"]  # resumed: trained once, keyed on its options
        assert main(["recipe", "run", "--resume", str(out), "maps.method_options.bright.sharpness=2.0"]) == 0
        assert Brightness.trained == ["bright", "bright"]  # another option, another model
        # Its options are checked like a built-in method's, naming the key.
        bad = overrides + ["maps.method_options.bright.sharpnes=2"]
        assert main(["recipe", "validate", "demo", *bad]) == 2
    finally:
        MAP_METHODS.unregister("brightness")
