"""Choosing a map method on labelled images: the scoring rules and the `bench map-quality` command."""

import json

import numpy as np
import pytest

from conftest import TINY_MODEL
from wsseg.config_schema import DatasetConfig
from wsseg.data import create_dataset
from wsseg.errors import DataError
from wsseg.models.classifier import ClassifierMeta, build_classifier, save_classifier
from wsseg.selection import MapCandidate, sample_indices, score_map_methods, score_maps


def _scenes(n=4):
    return create_dataset(DatasetConfig("synthetic", None, "val", options={"n": n, "size": 64,
                                                                           "negative_fraction": 0.0}))


def test_score_maps_rewards_maps_that_match_the_masks():
    dataset = _scenes()
    truths = {i: dataset.load_mask(i).astype(bool) for i in range(len(dataset))}
    rng = np.random.default_rng(0)
    good = {i: np.where(t, 0.9, 0.1) + rng.uniform(0, 0.05, t.shape) for i, t in truths.items()}
    inverted = {i: 1 - m for i, m in good.items()}
    good_scores, bad_scores = score_maps(good, truths, [0.3, 0.5]), score_maps(inverted, truths, [0.3, 0.5])
    assert good_scores["0.50"] == pytest.approx(1.0) and good_scores["otsu"] == pytest.approx(1.0)
    assert bad_scores["0.50"] < 0.2 and bad_scores["oracle"] < 0.6
    assert bad_scores["oracle"] >= max(bad_scores["0.30"], bad_scores["0.50"])  # the oracle's grid holds both


def test_score_map_methods_with_a_tiny_classifier(tmp_path):
    dataset = _scenes(6)
    checkpoint = tmp_path / "classifier.pth"
    save_classifier(checkpoint, build_classifier(TINY_MODEL, "none", 2), ClassifierMeta(TINY_MODEL, ["bg", "obj"], 1, 64))
    candidates = [MapCandidate("gradcam", image_size=64), MapCandidate("eigencam", image_size=64, tta=True)]
    results = score_map_methods(checkpoint, dataset, candidates, n_images=4, thresholds=(0.3, 0.5))
    assert {r.candidate.method for r in results} == {"gradcam", "eigencam"}
    best = [r.dice[r.best_rule] for r in results]
    assert best == sorted(best, reverse=True)
    for r in results:
        assert set(r.dice) == {"0.30", "0.50", "otsu", "oracle"}
        assert all(0.0 <= v <= 1.0 for v in r.dice.values())
        assert r.dice["oracle"] >= r.dice["0.30"] - 1e-9


def test_sample_indices_is_fixed_and_needs_masks():
    dataset = _scenes(10)
    assert sample_indices(dataset, 5, seed=1) == sample_indices(dataset, 5, seed=1)
    assert len(set(sample_indices(dataset, 50))) == 10

    class NoMasks:
        has_masks = False

        def describe(self):
            return "folder of photos"

    with pytest.raises(DataError, match="folder of photos: has no masks"):
        sample_indices(NoMasks(), 5)


def test_bench_map_quality_cli_prints_and_writes(tmp_path, capsys):
    from wsseg.cli.main import main

    checkpoint = tmp_path / "classifier.pth"
    save_classifier(checkpoint, build_classifier(TINY_MODEL, "none", 2), ClassifierMeta(TINY_MODEL, ["bg", "obj"], 1, 64))
    out = tmp_path / "scores.json"
    code = main(["bench", "map-quality", str(checkpoint), "--dataset", "synthetic", "--split", "val", "--n-images", "3",
                 "--methods", "gradcam", "dff", "--sizes", "64", "--tta", "both", "--tta-scales", "1.0", "1.25",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "gradcam@auto 64px" in printed and "oracle" in printed
    rows = json.loads(out.read_text())
    assert {(r["candidate"]["method"], r["candidate"]["tta"]) for r in rows} == {
        ("gradcam", False), ("gradcam", True), ("dff", False), ("dff", True)}
    assert all(r["candidate"]["tta_scales"] == [1.0, 1.25] and r["best_rule"] in r["dice"] for r in rows)
