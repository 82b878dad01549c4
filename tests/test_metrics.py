import numpy as np
import pytest

from wsseg.metrics import confusion, roc_auc, scores, summarise
from wsseg.stages.pseudo_masks import map_to_mask, resize_map
from wsseg.stages.references import REFERENCE_PRODUCERS, list_reference_producers


def test_scores_on_known_masks():
    pred = np.zeros((4, 4), bool)
    pred[:2, :2] = True  # 4 px
    target = np.zeros((4, 4), bool)
    target[:2, :3] = True  # 6 px, 4 shared
    s = scores(confusion(pred, target))
    assert s["dice"] == pytest.approx(8 / 10)
    assert s["iou"] == pytest.approx(4 / 6)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(4 / 6)
    assert s["accuracy"] == pytest.approx(14 / 16)


def test_empty_mask_convention():
    empty = np.zeros((3, 3), bool)
    full = np.ones((3, 3), bool)
    assert scores(confusion(empty, empty))["dice"] == 1.0
    assert scores(confusion(empty, full))["dice"] == 0.0
    assert scores(confusion(empty, full))["precision"] == 0.0
    assert scores(confusion(full, empty))["recall"] == 0.0


def test_pooled_differs_from_mean():
    rows = []
    for pred, target in [((10, 10), (10, 10)), ((1, 1), (0, 1))]:
        p = np.zeros((10, 10), bool)
        t = np.zeros((10, 10), bool)
        p[: pred[0], : pred[1]] = True
        t[: target[0], : target[1]] = True
        c = confusion(p, t)
        rows.append({**c, **scores(c)})
    summary = summarise(rows)
    assert summary["dice"] == pytest.approx(0.5)
    assert summary["pooled_dice"] == pytest.approx(200 / 201)
    assert summary["n_images"] == 2


def test_roc_auc_with_ties():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_reference_producers():
    assert set(list_reference_producers()) == {"all_foreground", "center_ellipse"}
    ellipse = REFERENCE_PRODUCERS.get("center_ellipse")(300, 500)
    assert ellipse.mean() == pytest.approx(0.30, abs=0.01)
    assert ellipse[150, 250] and not ellipse[0, 0]
    assert REFERENCE_PRODUCERS.get("all_foreground")(3, 4).all()


def test_map_resized_to_image_and_thresholded():
    activation = np.zeros((8, 8), np.float32)
    activation[2:6, 2:6] = 1.0
    resized = resize_map(activation * 0.5 + 0.2, 40, 60)
    assert resized.shape == (40, 60) and resized.min() == 0 and resized.max() == pytest.approx(1)
    mask = map_to_mask(activation, 40, 60, 0.58)
    assert mask.shape == (40, 60) and mask[20, 30] and not mask[0, 0]
    assert not map_to_mask(np.full((8, 8), 0.3, np.float32), 10, 10, 0.5).any()  # flat map -> empty mask
