"""Refinement steps, threshold rules, calibration and mask variants."""

import cv2
import numpy as np
import pytest

from wsseg.config import parse_recipe
from wsseg.config_schema import DatasetConfig, RefineStepConfig
from wsseg.data import create_dataset
from wsseg.errors import ConfigError
from wsseg.refine import (MAP_STEPS, MASK_STEPS, fill_holes, largest_component, list_refinements, otsu_threshold,
                          refine_map, threshold_and_clean)
from wsseg.stages.pseudo_masks import MaskRule, calibrate_threshold


def _scene():
    image = np.zeros((40, 40, 3), np.uint8)
    image[10:30, 10:30] = 200  # a bright square on black
    blurry = np.zeros((40, 40), np.float32)
    blurry[5:35, 5:35] = 0.6
    blurry[12:28, 12:28] = 1.0
    return image, blurry


@pytest.mark.parametrize("name", MAP_STEPS.names())
def test_every_map_step_returns_a_normalised_map(name):
    image, activation = _scene()
    out = MAP_STEPS.get(name)(activation, image, other=np.ones_like(activation))
    assert out.shape == activation.shape and out.min() >= 0 and out.max() <= 1 + 1e-6


@pytest.mark.parametrize("name", MASK_STEPS.names())
def test_every_mask_step_keeps_shape(name):
    image, activation = _scene()
    mask = activation >= 0.8
    assert MASK_STEPS.get(name)(mask, image=image, source_map=activation).shape == mask.shape


def test_guided_filter_snaps_to_image_edges():
    image, activation = _scene()
    refined = MAP_STEPS.get("guided_filter")(activation, image, radius=4, eps=1e-4)
    truth = image[..., 0] > 0
    before = np.abs((activation >= 0.5) ^ truth).sum()
    after = np.abs((refined >= 0.5) ^ truth).sum()
    assert after < before


def test_largest_component_and_fill_holes():
    mask = np.zeros((20, 20), bool)
    mask[1:3, 1:3] = True
    mask[8:18, 8:18] = True
    mask[12:14, 12:14] = False  # a hole
    big = largest_component(mask)
    assert not big[1, 1] and big[9, 9]
    assert fill_holes(big)[12, 12] and not big[12, 12]


def test_otsu_and_gate_and_rule_order():
    activation = np.concatenate([np.full((10, 10), 0.1), np.full((10, 10), 0.9)]).astype(np.float32)
    assert 0.09 < otsu_threshold(activation) < 0.9
    assert threshold_and_clean(activation, [], 0.0, "otsu").sum() == 100  # exactly the bright half
    other = np.zeros_like(activation)
    other[:10] = 1.0  # the other map only agrees on the top half
    steps = [RefineStepConfig("gate", "gradcam")]
    gated = refine_map(activation, None, steps, {"gradcam": other})
    assert gated[:10].max() > gated[10:].max()
    assert threshold_and_clean(activation, [], 0.5).sum() == 100


def test_calibration_picks_the_threshold_that_fits(tmp_path):
    dataset = create_dataset(DatasetConfig("synthetic", None, "val", options={"n": 4, "size": 32,
                                                                              "negative_fraction": 0.0}))
    ramp = np.tile(np.linspace(0, 0.6, 32, dtype=np.float32), (32, 1))
    for i, record in enumerate(dataset.records):  # objects at 1.0 over a background ramp up to 0.6
        mask = dataset.load_mask(i)
        np.save(tmp_path / f"{record.stem}.npy", np.where(mask, 1.0, ramp).astype(np.float16))
    threshold, curve = calibrate_threshold(MaskRule("m"), dataset, {"m": tmp_path}, [0.1, 0.5, 0.9])
    assert threshold == 0.9 and curve[0.9] == pytest.approx(1.0) and curve[0.1] < curve[0.5] < 1.0


def test_variant_validation_names_the_key():
    base = {"maps": {"methods": ["gradcam"]}}
    with pytest.raises(ConfigError) as err:
        parse_recipe({**base, "pseudo_masks": {"variants": [
            {"name": "v", "source": "ccam", "refine": [{"name": "blur"}, {"name": "guided_filter",
                                                                          "options": {"radius": 3, "size": 2}}],
             "threshold_mode": "calibrated"}]}})
    text = str(err.value)
    assert "pseudo_masks.variants.0.source: 'ccam'" in text
    assert "pseudo_masks.variants.0.refine.0.name: unknown refinement 'blur'" in text
    assert "pseudo_masks.variants.0.refine.1.options.size: unknown option" in text
    assert "calibrated needs pseudo_masks.calibrate.dataset" in text
    assert set(list_refinements()) >= {"guided_filter", "bilateral", "gate", "largest_component", "otsu"} - {"otsu"}
    with pytest.raises(ConfigError) as err:
        parse_recipe({**base, "segment": {"masks": "gradcam", "train": [{"name": "synthetic"}],
                                          "confident_band": [0.7, 0.3],
                                          "self_training_refine": [{"name": "blur"},
                                                                   {"name": "gate", "other": "gradcam"}]},
                               "export": {"calibration_images": 0}})
    assert "segment.self_training_refine.0.name: unknown refinement 'blur'" in str(err.value)
    assert "segment.confident_band: expected [low, high]" in str(err.value)
    assert "export.calibration_images: INT8 needs at least 1" in str(err.value)
    assert "segment.self_training_refine.1.other: a self-training round has only the U-Net's" in str(err.value)
    with pytest.raises(ConfigError) as err:  # each band checked on its own
        parse_recipe({**base, "segment": {"masks": "gradcam", "train": [{"name": "synthetic"}],
                                          "ignore_band": [0.2, 1.5], "self_training_init": "last",
                                          "self_training_epochs": 0,
                                          "predict": {"size": 100, "threshold": 1.5, "threshold_mode": "otsu"},
                                          "self_training_predict": {"size": 100, "threshold": 0.3}}})
    assert "segment.ignore_band: expected [low, high]" in str(err.value) and "confident_band" not in str(err.value)
    assert "segment.self_training_init: must be fresh or previous, got 'last'" in str(err.value)
    assert "segment.self_training_epochs: at least 1" in str(err.value)
    assert "segment.predict.size: the U-Net downsamples 5 times, so it must be a multiple of 32" in str(err.value)
    assert "segment.predict.threshold: must lie in [0, 1]" in str(err.value)
    assert "segment.predict.threshold_mode: must be fixed or calibrated, got 'otsu'" in str(err.value)
    assert "segment.self_training_predict.size: the U-Net downsamples 5 times" in str(err.value)
    assert "segment.self_training_predict: the labels' threshold is segment.threshold" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_recipe({**base, "segment": {"masks": "gradcam", "train": [{"name": "synthetic"}],
                                          "predict": {"threshold_mode": "calibrated", "threshold": 0.3}}})
    assert "segment.predict.threshold_mode: 'calibrated' needs pseudo_masks.calibrate.dataset" in str(err.value)
    assert "segment.predict.threshold: 0.3 set, but threshold_mode 'calibrated' chooses it" in str(err.value)


def test_dense_crf_snaps_a_blurry_map_to_the_object():
    pytest.importorskip("pydensecrf.densecrf", reason="dense_crf needs the optional pydensecrf2 package")
    rng = np.random.default_rng(0)
    image = np.full((160, 160, 3), 40.0)
    image[40:120, 50:130] = (200, 90, 90)  # a reddish rectangle on a dark, noisy background
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    truth = image[..., 0] > 120
    yy, xx = np.mgrid[:160, :160]  # a round blob roughly on the object, as a coarse CAM would give
    activation = np.exp(-((yy - 85) ** 2 + (xx - 85) ** 2) / (2 * 45 ** 2)).astype(np.float32)
    refined = MAP_STEPS.get("dense_crf")(activation, image, max_side=80)  # also checks the rescaling
    assert refined.shape == activation.shape
    before = ((activation >= otsu_threshold(activation)) ^ truth).sum()
    after = ((refined >= 0.5) ^ truth).sum()
    assert after < before / 4


def test_dense_crf_without_its_package_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_crf(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_crf)
    image, activation = _scene()
    with pytest.raises(ConfigError, match=r"wsseg\[crf\]"):
        MAP_STEPS.get("dense_crf")(activation, image)
    with pytest.raises(ConfigError, match=r"variants.0.refine.0.name: refinement 'dense_crf' needs.*wsseg\[crf\]"):
        parse_recipe({"maps": {"methods": ["gradcam"]}, "pseudo_masks": {"variants": [
            {"name": "v", "source": "gradcam", "refine": [{"name": "dense_crf"}]}]}})


def test_dense_crf_offset_moves_the_foreground_level():
    pytest.importorskip("pydensecrf.densecrf", reason="dense_crf needs the optional pydensecrf2 package")
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(120, 6, (96, 96, 3)), 0, 255).astype(np.uint8)  # no edges to snap to
    yy, xx = np.mgrid[:96, :96]
    activation = np.exp(-((yy - 48) ** 2 + (xx - 48) ** 2) / (2 * 20 ** 2)).astype(np.float32)
    # Weak pairwise terms: on an image without edges, strong ones would smooth everything to background.
    refined = {offset: MAP_STEPS.get("dense_crf")(activation, image, offset=offset, bilateral_weight=1,
                                                  smoothness_weight=1) >= 0.5 for offset in (-0.1, 0.0, 0.1)}
    area = {offset: int(mask.sum()) for offset, mask in refined.items()}
    assert 0 < area[0.1] < area[0.0] < area[-0.1] < activation.size
    assert all(mask[48, 48] for mask in refined.values())  # still the blob around the peak, only smaller


def _reddish_object_scene(seed=0):
    rng = np.random.default_rng(seed)
    image = np.full((120, 120, 3), 60.0)
    image[30:90, 40:100] = (200, 90, 90)  # a reddish rectangle on a grey, noisy background
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:120, :120]  # a coarse blob off-centre on the object, as a CAM would give
    activation = np.exp(-((yy - 55) ** 2 + (xx - 65) ** 2) / (2 * 25 ** 2)).astype(np.float32)
    return image, activation, image[..., 0] > 130


def test_grabcut_grows_a_partial_mask_to_the_object_colour():
    image, activation, truth = _reddish_object_scene()
    partial = activation >= 0.8  # the blob's core: much smaller than the object
    refined = MASK_STEPS.get("grabcut")(partial, image=image, source_map=activation, max_side=60)
    assert refined.shape == truth.shape
    assert (refined ^ truth).sum() < (partial ^ truth).sum() / 4


def test_grabcut_cuts_the_same_whatever_ran_before_it():
    """GrabCut's k-means start draws from OpenCV's RNG; a resume or another shard must still make the same
    labels. A noisy scene where, unseeded, other k-means calls in between change the cut."""
    rng = np.random.default_rng(0)
    image = (rng.random((120, 160, 3)) * 255).astype(np.uint8)
    yy, xx = np.mgrid[:120, :160]
    inside = (yy - 60) ** 2 / 900 + (xx - 80) ** 2 / 1600 < 1
    image[inside] = np.clip(image[inside] * 0.5 + 100, 0, 255).astype(np.uint8)
    prob = np.clip(inside * 0.7 + rng.random(inside.shape) * 0.4, 0, 1).astype(np.float32)
    step = MASK_STEPS.get("grabcut")
    first = step(prob > 0.5, image=image, source_map=prob, sure_above=0.4, sure_below=0.3)
    for _ in range(3):
        points = rng.random((50, 3)).astype(np.float32)
        cv2.kmeans(points, 3, None, (cv2.TERM_CRITERIA_MAX_ITER, 5, 0), 1, cv2.KMEANS_PP_CENTERS)
        again = step(prob > 0.5, image=image, source_map=prob, sure_above=0.4, sure_below=0.3)
        assert np.array_equal(first, again)
    assert first[inside].mean() > 0.9 and first.mean() < 0.5  # a real cut: the ellipse, not everything


def test_grabcut_in_a_variant_gets_the_image_and_source_map(tmp_path):
    image, activation, truth = _reddish_object_scene(1)

    class OneImage:  # the two methods a mask rule reads
        records = [type("Record", (), {"stem": "a"})()]

        def image_size(self, index):
            return truth.shape

        def load_image(self, index):
            return image

    np.save(tmp_path / "a.npy", activation.astype(np.float16))
    rule = MaskRule("m", 0.8, steps=[RefineStepConfig("grabcut")])
    refined = rule.refined(OneImage(), 0, {"m": tmp_path})
    assert refined.image is image and refined.source_map is not None
    assert (rule.mask(refined) ^ truth).sum() < ((refined.activation >= 0.8) ^ truth).sum() / 4
    with pytest.raises(ConfigError, match="grabcut.*needs the image"):
        rule.mask(refined.activation)  # a bare map lacks what GrabCut needs
    parse_recipe({"maps": {"methods": ["gradcam"]}, "pseudo_masks": {"variants": [
        {"name": "v", "source": "gradcam", "refine": [{"name": "grabcut", "options": {"sure_above": 0.2}}]}]}})
    with pytest.raises(ConfigError, match=r"refine.0.options.radius: unknown option for 'grabcut'"):
        parse_recipe({"maps": {"methods": ["gradcam"]}, "pseudo_masks": {"variants": [
            {"name": "v", "source": "gradcam", "refine": [{"name": "grabcut", "options": {"radius": 2}}]}]}})


@pytest.mark.parametrize("name", MAP_STEPS.names() + MASK_STEPS.names())
def test_every_step_takes_a_small_read_only_decoded_image(name, tmp_path):
    """Images no larger than a step's working size reach it as decoded, read-only arrays (as PIL gives them)."""
    from wsseg.data.io import read_image

    function = MAP_STEPS.get(name) if name in MAP_STEPS else MASK_STEPS.get(name)
    if getattr(function, "requires", None) is not None and not function.requires[2]():
        pytest.skip(f"{name} needs the optional {function.requires[0]} package")
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 60, (150, 200, 3), np.uint8)
    pixels[40:110, 60:150] = 220  # a bright pet on a dark background, smaller than dense_crf's max_side
    path = tmp_path / "small.png"
    cv2.imwrite(str(path), pixels)
    image = read_image(path)
    image.flags.writeable = False
    activation = np.zeros((150, 200), np.float32)
    activation[50:100, 70:140] = 1.0
    activation.flags.writeable = False
    if name in MAP_STEPS:
        out = function(activation, image, other=activation)
        assert out.shape == activation.shape and np.isfinite(out).all()
    else:
        out = function(activation >= 0.5, image=image, source_map=activation)
        assert out.shape == activation.shape
