"""Shared fixtures: tiny models, tiny images, real-data paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_MODEL = "test_resnet"  # timm's own test architecture: random weights, seconds to run


def needs_shared(subdir: str):
    path = SHARED_DATA / subdir
    return pytest.mark.skipif(not path.is_dir(), reason=f"real data not present at {path}")


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def random_image(rng, height=48, width=64) -> np.ndarray:
    return rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture
def kvasir_root(tmp_path) -> Path:
    """Official Kvasir-SEG layout with 6 images (JPEG masks) and a split file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "kvasir-seg"
    for i in range(6):
        _save(root / "images" / f"img{i}.jpg", random_image(rng))
        mask = np.zeros((48, 64), np.uint8)
        mask[10:30, 20:40 + i] = 255
        _save(root / "masks" / f"img{i}.jpg", mask)
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("img1\nimg3\nimg5\n")
    (root / "splits" / "train.txt").write_text("img0\nimg2\nimg4\n")
    return root


@pytest.fixture
def class_folders_root(tmp_path) -> Path:
    """CP-CHILD layout: root/<split>/<class>/, file names with spaces and parentheses."""
    rng = np.random.default_rng(1)
    root = tmp_path / "cp"
    for split in ("Train", "Test"):
        for cls, n in (("Polyp", 3), ("Non-Polyp", 4)):
            for i in range(n):
                _save(root / split / cls / f"{int(cls == 'Polyp')} ({i + 1}).jpg", random_image(rng, 32, 32))
    return root


@pytest.fixture
def pets_root(tmp_path) -> Path:
    """Oxford-IIIT Pet layout: images/, annotations/trimaps/, annotations/{trainval,test}.txt."""
    rng = np.random.default_rng(2)
    root = tmp_path / "oxford-iiit-pet"
    lines = {"trainval": [], "test": []}
    for i, (name, species) in enumerate([("Abyssinian_1", 1), ("beagle_2", 2), ("Bengal_3", 1), ("pug_4", 2)]):
        _save(root / "images" / f"{name}.jpg", random_image(rng, 40, 40))
        trimap = np.full((40, 40), 2, np.uint8)  # background
        trimap[10:30, 10:30] = 3  # border band
        trimap[12:28, 12:28] = 1  # foreground
        _save(root / "annotations" / "trimaps" / f"{name}.png", trimap)
        lines["trainval" if i < 2 else "test"].append(f"{name} {i + 1} {species} 1")
    for split, rows in lines.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def tiny_demo_overrides(out_methods=("ccam", "ccam_cls", "gradcam", "hirescam", "fullgrad")):
    ccam = []
    for name in ("ccam", "ccam_cls"):
        key = f"maps.method_options.{name}"
        ccam += [f"{key}.train.0.options.n=16", f"{key}.train.0.options.size=64", f"{key}.image_size=64",
                 f"{key}.epochs=1", f"{key}.batch_size=8"]
    segment = ["segment.train.0.options.n=16", "segment.train.0.options.size=64", "segment.image_size=64",
               "segment.epochs=1", "segment.batch_size=4", "export.calibration_images=2",
               "segment.self_training_rounds=1", "pseudo_masks.calibrate.dataset.options.size=64",
               "pseudo_masks.calibrate.n_images=3"]
    return ccam + segment + [
        f"backbone.name={TINY_MODEL}",
        "classifier.train.0.options.n=24", "classifier.train.0.options.size=64",
        "classifier.val.options.n=8", "classifier.val.options.size=64",
        "classifier.image_size=64", "classifier.epochs=1", "classifier.batch_size=8",
        "maps.dataset.options.n=6", "maps.dataset.options.size=64", "maps.image_size=64", "maps.batch_size=4",
        f"maps.methods={json.dumps(list(out_methods))}",
    ]
