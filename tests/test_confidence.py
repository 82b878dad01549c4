"""A confidence for every mask: steep edges score high, grey zones low; every mask writer records it and
the evaluation puts it beside the true Dice."""

import csv
import json

import numpy as np

from conftest import tiny_demo_overrides
from wsseg.cli.main import main
from wsseg.confidence import mask_confidence, rank_correlation


def _disc(edge_width: float, size: int = 64) -> np.ndarray:
    """A disc of radius 16 whose score falls from 1 to 0 over `edge_width` pixels at its edge."""
    y, x = np.mgrid[0:size, 0:size]
    distance = np.hypot(x - size / 2, y - size / 2) - 16
    return np.clip(0.5 - distance / max(edge_width, 1e-6), 0, 1)


def test_a_steep_edge_is_more_confident_than_a_grey_one():
    steep, grey = mask_confidence(_disc(1), 0.5), mask_confidence(_disc(24), 0.5)
    assert 0.9 < steep <= 1.0 and grey < 0.6 and steep > grey
    assert mask_confidence(np.zeros((8, 8)), 0.5) == 1.0  # confidently empty
    assert mask_confidence(np.full((8, 8), 0.4), 0.5) == 0.0  # a flat map just under the threshold: unsure
    assert rank_correlation({"a": 0.1, "b": 0.5, "c": 0.9}, {"a": 0.2, "b": 0.4, "c": 0.8}) == 1.0
    assert rank_correlation({"a": 0.1, "b": 0.5, "c": 0.9}, {"a": 0.8, "b": 0.4, "c": 0.2}) == -1.0


def test_every_mask_writer_records_confidence_and_the_table_correlates_it(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + [
        "segment.masks=gradcam", "export.enabled=false", "segment.self_training_rounds=1",
        "segment.self_training_refine=[{name: largest_component}]",
        "pseudo_masks.variants=[{name: gradcam_otsu, source: gradcam, threshold_mode: otsu}]"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    scored = {"gradcam", "gradcam_otsu", "unet_round0", "unet_round0_refined", "unet"}
    for producer in scored:
        mine = [r for r in rows if r["method"] == producer]
        assert mine and all(0.0 <= float(r["confidence"]) <= 1.0 for r in mine), producer
        correlation = metrics[producer]["confidence_spearman"]  # None where the tiny run's Dice are all equal
        assert correlation is None or -1.0 <= correlation <= 1.0, producer
    for reference in ("all_foreground", "center_ellipse"):  # blind priors have nothing to be sure of
        assert all(r["confidence"] == "" for r in rows if r["method"] == reference)
        assert "confidence_spearman" not in metrics[reference]
    # the recorded value is the one of the written mask: recompute one pseudo-mask's from its map
    from wsseg.stages.pseudo_masks import resize_map
    from PIL import Image

    row = next(r for r in rows if r["method"] == "gradcam")
    height, width = np.array(Image.open(out / "masks" / "gradcam" / f"{row['stem']}.png")).shape
    activation = resize_map(np.load(out / "maps" / "gradcam" / f"{row['stem']}.npy"), height, width)
    assert float(row["confidence"]) == mask_confidence(activation, 0.58)
