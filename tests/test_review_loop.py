"""The review loop on a run shaped like `polyp_best` (its recipe as shipped: map variants, CRF and GrabCut, a
self-training round, calibrated flip-averaged prediction through ONNX Runtime), on a small Kvasir-SEG and CP-CHILD
layout with a tiny backbone: review page, export, import, and the correction bench on the finished run."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_MODEL
from wsseg.cli.main import main

pytest.importorskip("pydensecrf.densecrf")
pytest.importorskip("pycocotools")


@pytest.fixture
def polyp_best_run(tmp_path, kvasir_root, class_folders_root):
    data_root = kvasir_root.parent
    assert class_folders_root.parent == data_root
    out = tmp_path / "run"
    overrides = [f"backbone.name={TINY_MODEL}", "backbone.weights=none", f"segment.encoder=tu-{TINY_MODEL}",
                 "classifier.train.0.root=cp", "classifier.val.root=cp", "classifier.image_size=32",
                 "classifier.epochs=1", "classifier.batch_size=4", "maps.image_size=32", "maps.batch_size=2",
                 "pseudo_masks.calibrate.n_images=3", "segment.image_size=32", "segment.epochs=1",
                 "segment.batch_size=2", "segment.self_training_rounds=1", "segment.self_training_predict.size=32",
                 "segment.predict.size=32", "export.int8=false"]
    assert main(["recipe", "run", "polyp_best", "--data-root", str(data_root), "--out", str(out), *overrides]) == 0
    return out, data_root


def test_review_export_import_and_corrections_on_a_polyp_best_run(polyp_best_run, tmp_path):
    run, data_root = polyp_best_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"unet", "unet_round0", "dff_crf_tight08", "dff_crf_grabcut"} <= set(metrics)

    page = tmp_path / "review.html"
    assert main(["review", str(run), "--data-root", str(data_root), "--producer", "unet", "dff_crf_tight08",
                 "--out", str(page)]) == 0
    entries = json.loads(re.search(r"const ENTRIES = (.*);\n", page.read_text()).group(1).replace("<\\/", "</"))
    assert sorted((e["producer"], e["stem"]) for e in entries) == sorted(
        (producer, stem) for producer in ("unet", "dff_crf_tight08") for stem in ("img1", "img3", "img5"))
    assert [e["confidence"] for e in entries] == sorted(e["confidence"] for e in entries)

    exported, corrected = tmp_path / "least_confident.json", tmp_path / "corrected"
    assert main(["masks", "export", str(run), "--data-root", str(data_root), "--format", "coco", "--producer",
                 "unet", "--least-confident", "2", "--out", str(exported)]) == 0
    assert main(["masks", "import", str(exported), "--format", "coco", "--out", str(corrected)]) == 0
    imported = sorted(corrected.glob("*.png"))
    assert len(imported) == 2
    for path in imported:  # at the image's own size, bit for bit
        original = np.array(Image.open(run / "masks" / "unet" / path.name)) > 0
        assert original.shape == (48, 64) and np.array_equal(np.array(Image.open(path)) > 0, original)

    bench = tmp_path / "bench"
    assert main(["bench", "corrections", str(run), "--data-root", str(data_root), "--fractions", "0", "0.34",
                 "--choose", "confidence", "--supervised", "0.9", "--out", str(bench)]) == 0
    points = json.loads((bench / "corrections.json").read_text())
    assert [(p["choose"], p["n_corrected"]) for p in points["points"]] == [("none", 0), ("confidence", 1)]
    assert points["supervised_dice"] == pytest.approx(0.9)
    assert points["points"][0]["dice"] == pytest.approx(metrics["unet"]["dice"])
