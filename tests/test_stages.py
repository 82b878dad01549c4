"""Stage functions called from Python, as a library user would."""

import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL
from wsseg.config_schema import BackboneConfig, CCAMConfig, ClassifierConfig, DatasetConfig
from wsseg.stages.ccam import load_ccam, train_ccam
from wsseg.stages.classifier import train_classifier


def test_classifier_alternates_datasets_and_reports_auc(tmp_path):
    a = DatasetConfig("synthetic", None, "train", options={"n": 16, "size": 32})
    b = DatasetConfig("synthetic", None, "other", options={"n": 24, "size": 32})
    config = ClassifierConfig(train=[a, b], val=DatasetConfig("synthetic", None, "val", options={"n": 8, "size": 32}),
                              image_size=32, epochs=3, batch_size=8, amp=False)
    result = train_classifier(config, BackboneConfig(TINY_MODEL, "none"), tmp_path, "cpu")
    history = torch.load(result.checkpoint, weights_only=False)["loss_history"]
    assert len(history) == 3
    assert 0 <= result.metrics["accuracy"] <= 1 and 0 <= result.metrics["roc_auc"] <= 1
    assert (tmp_path / "classifier_metrics.json").is_file()


def _epoch_lengths(config, tmp_path):
    """Batches per classifier epoch, read from the progress callback."""
    lengths = []

    def progress(iterable, total=None, description=""):
        if description.startswith("classifier epoch"):
            lengths.append(total)
        return iterable

    train_classifier(config, BackboneConfig(TINY_MODEL, "none"), tmp_path, "cpu", progress=progress)
    return lengths


def test_classifier_schedule_alternates_or_concatenates(tmp_path):
    # Same split name, so the two sets share file stems (as CP-CHILD-A and -B do): fine for a classifier.
    a = DatasetConfig("synthetic", None, "train", options={"n": 16, "size": 32, "seed": 1})
    b = DatasetConfig("synthetic", None, "train", options={"n": 24, "size": 32, "seed": 2})
    common = dict(train=[a, b], image_size=32, epochs=2, batch_size=8, amp=False)
    # 16 and 24 images in batches of 8, one set per epoch; or all 40 every epoch.
    assert _epoch_lengths(ClassifierConfig(**common), tmp_path / "alt") == [2, 3]
    assert _epoch_lengths(ClassifierConfig(schedule="concat", **common), tmp_path / "cat") == [5, 5]


def test_ccam_frozen_backbone_phase_leaves_backbone_untouched(tmp_path):
    train = DatasetConfig("synthetic", None, "train", options={"n": 16, "size": 32})
    torch.manual_seed(0)
    frozen = CCAMConfig(train=[train], image_size=32, epochs=1, batch_size=8, freeze_backbone_epochs=1,
                        polarity="none", amp=False)
    result = train_ccam(frozen, BackboneConfig(TINY_MODEL, "none"), tmp_path / "a", "cpu", seed=0)
    torch.manual_seed(0)
    from wsseg.models.ccam import CCAM

    initial = CCAM(TINY_MODEL, "none").backbone.state_dict()
    model, _ = load_ccam(result.checkpoint)
    trained = model.backbone.state_dict()
    assert all(torch.equal(initial[k], trained[k]) for k in initial if "num_batches" not in k)
    head_moved = CCAMConfig(train=[train], image_size=32, epochs=1, batch_size=8, polarity="none", amp=False)
    torch.manual_seed(0)
    result = train_ccam(head_moved, BackboneConfig(TINY_MODEL, "none"), tmp_path / "b", "cpu", seed=0)
    model, _ = load_ccam(result.checkpoint)
    assert not all(torch.equal(initial[k], v) for k, v in model.backbone.state_dict().items())


class _RecordingMethod:
    """Stands in for a map method: records the image batches `fit` sees."""

    def __init__(self, needs_fit):
        self.needs_fit, self.fitted = needs_fit, []

    def fit(self, batches):
        self.fitted = [(b.shape[0], round(float(b.sum()), 3)) for b in batches]
        return self


def test_fit_map_method_fits_only_methods_that_learn_on_a_fixed_sample():
    from wsseg.data import create_dataset
    from wsseg.stages.maps import fit_map_method

    dataset = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 12, "size": 32}))
    plain = fit_map_method(_RecordingMethod(False), dataset, range(12), 32, (0.5,) * 3, (0.5,) * 3, "cpu")
    assert plain.fitted == []
    seen = []
    for _ in range(2):
        method = fit_map_method(_RecordingMethod(True), dataset, range(12), 32, (0.5,) * 3, (0.5,) * 3, "cpu",
                                batch_size=4, max_images=7)
        seen.append(method.fitted)
    assert [n for n, _ in seen[0]] == [4, 3]  # at most max_images
    assert seen[0] == seen[1]  # the same images every time (every rank fits the same model)


def test_a_unet_on_two_classes_that_both_hold_objects_finds_both(tmp_path):
    """Pets: label 0 is "cat", not "no object". Every image's pseudo-mask is its map's, and the U-Net trained
    on them finds the pet in cat photos as in dog photos (it once learned that cats have no pet)."""
    import numpy as np

    from wsseg.config_schema import SegmentConfig
    from wsseg.data import create_dataset
    from wsseg.metrics import confusion, scores
    from wsseg.stages.maps import save_map
    from wsseg.stages.pseudo_masks import MaskRule
    from wsseg.stages.segment import load_segmenter, predict_masks, train_segmenter
    from wsseg.stages.unet_labels import pseudo_mask_source

    rng = np.random.default_rng(0)
    root, lines = tmp_path / "oxford-iiit-pet", []
    for i in range(12):
        name, species = (f"Bengal_{i}", 1) if i % 2 else (f"beagle_{i}", 2)
        image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        top, left = rng.integers(4, 28, 2)
        image[top:top + 32, left:left + 32] = 230
        trimap = np.full((64, 64), 2, np.uint8)
        trimap[top:top + 32, left:left + 32] = 1
        for folder, array, ext in (("images", image, "jpg"), ("annotations/trimaps", trimap, "png")):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / folder / f"{name}.{ext}")
        lines.append(f"{name} {i + 1} {species} 1")
    (root / "annotations" / "trainval.txt").write_text("\n".join(lines) + "\n")
    dataset = create_dataset(DatasetConfig("oxford_pets", str(root), "trainval"))
    for i in range(len(dataset)):  # a map that marks the pet: what a good CAM gives
        save_map(tmp_path / "maps" / f"{dataset.records[i].stem}.npy", dataset.load_mask(i).astype(np.float32))
    source = pseudo_mask_source(dataset, MaskRule("m", 0.5), {"m": tmp_path / "maps"})
    cats = [i for i, r in enumerate(dataset.records) if dataset.classes[r.label] == "cat"]
    assert cats and all(source(i).sum() == dataset.load_mask(i).sum() > 0 for i in cats)

    config = SegmentConfig(masks="m", image_size=64, epochs=12, batch_size=4, lr=3e-3, amp=False)
    result = train_segmenter(config, BackboneConfig(TINY_MODEL, "none"), dataset, source, tmp_path, "cpu")
    model, meta = load_segmenter(result.checkpoint)
    masks = predict_masks(model, meta, dataset, None, "cpu", keep=True)
    dice = {c: np.mean([scores(confusion(masks[i], dataset.load_mask(i)))["dice"] for i in range(len(dataset))
                        if dataset.classes[dataset.records[i].label] == c]) for c in ("cat", "dog")}
    assert dice["cat"] > 0.5 and dice["dog"] > 0.5, dice


def test_unet_decoder_widths_and_channels_last_train_the_same_model_and_key_its_cache(tmp_path):
    """Narrower decoder blocks reach the checkpoint and its reload; channels-last memory trains the same
    numbers up to float rounding; both enter the U-Net's fingerprint only when set."""
    import numpy as np
    import torch

    from wsseg.config_schema import SegmentConfig
    from wsseg.data import create_dataset
    from wsseg.pipeline.executor import fingerprint
    from wsseg.stages.segment import load_segmenter, train_segmenter
    from wsseg.stages.unet_labels import pseudo_mask_source

    dataset = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 8, "size": 64}))
    source = pseudo_mask_source(dataset)
    losses = {}
    for layout in (False, True):
        config = SegmentConfig(masks="ground_truth", image_size=64, epochs=1, batch_size=4, amp=False,
                               decoder_channels=[32, 16, 16, 8, 8], channels_last=layout)
        result = train_segmenter(config, BackboneConfig(TINY_MODEL, "none"), dataset, source,
                                 tmp_path / str(layout), "cpu")
        losses[layout] = result.metrics["final_loss"]
        model, meta = load_segmenter(result.checkpoint)
        assert meta.decoder_channels == [32, 16, 16, 8, 8]
        assert model.decoder.blocks[-1].conv2[0].out_channels == 8
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert fingerprint(SegmentConfig()) == fingerprint(SegmentConfig(channels_last=False, decoder_channels=None))
    assert fingerprint(SegmentConfig(channels_last=True)) != fingerprint(SegmentConfig())
    assert fingerprint(SegmentConfig(decoder_channels=[128, 64, 32, 16, 16])) != fingerprint(SegmentConfig())
    assert fingerprint(SegmentConfig(seed=1)) != fingerprint(SegmentConfig())  # another U-Net seed trains again
    old_style = {k: v for k, v in dataclass_fields(SegmentConfig()).items()
                 if k not in ("decoder_channels", "channels_last", "inference_backend", "cpu_amp", "seed")}
    assert fingerprint(SegmentConfig()) == fingerprint(old_style)  # caches keyed before the options stay valid


def test_cpu_bf16_autocast_is_used_only_where_asked_and_keys_each_training_cache(tmp_path, monkeypatch):
    """`cpu_amp`: bf16 runs a CPU forward pass in bfloat16, auto only on a CPU with hardware bf16, off (and
    amp: false) in fp32; the classifier and the U-Net train under it (their losses move by bf16 rounding only);
    it enters a section's fingerprint only when set."""
    import wsseg.device as device_module
    from wsseg.config_schema import SegmentConfig
    from wsseg.data import create_dataset
    from wsseg.device import autocast
    from wsseg.pipeline.executor import fingerprint
    from wsseg.stages.segment import train_segmenter
    from wsseg.stages.unet_labels import pseudo_mask_source

    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)

    def dtype_under(*args):
        with autocast(torch.device("cpu"), *args):
            return conv(x).dtype

    assert dtype_under(True, "bf16") == torch.bfloat16
    assert dtype_under(True, "off") == torch.float32 and dtype_under(False, "bf16") == torch.float32
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda native=native: native)
        assert dtype_under(True, "auto") == expected
    with pytest.raises(ValueError, match="cpu_amp"):
        dtype_under(True, "fp8")

    data = DatasetConfig("synthetic", None, "train", options={"n": 16, "size": 32})
    losses = {}
    for mode in ("off", "bf16"):
        config = ClassifierConfig(train=[data], image_size=32, epochs=1, batch_size=8, cpu_amp=mode)
        history = torch.load(train_classifier(config, BackboneConfig(TINY_MODEL, "none"), tmp_path / f"c{mode}",
                                              "cpu").checkpoint, weights_only=False)["loss_history"]
        losses["classifier", mode] = history[-1]
    dataset = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 8, "size": 64}))
    for mode in ("off", "bf16"):
        config = SegmentConfig(masks="ground_truth", image_size=64, epochs=1, batch_size=4, cpu_amp=mode)
        result = train_segmenter(config, BackboneConfig(TINY_MODEL, "none"), dataset, pseudo_mask_source(dataset),
                                 tmp_path / f"u{mode}", "cpu")
        losses["unet", mode] = result.metrics["final_loss"]
    for stage in ("classifier", "unet"):
        assert losses[stage, "bf16"] != losses[stage, "off"], "bf16 autocast did not reach the training step"
        assert losses[stage, "bf16"] == pytest.approx(losses[stage, "off"], rel=0.05), losses
    newer_options = {SegmentConfig: ("decoder_channels", "channels_last", "inference_backend", "seed"),
                     ClassifierConfig: ("channels_last",), CCAMConfig: ("channels_last",)}
    for section, others in newer_options.items():
        assert fingerprint(section(cpu_amp="auto")) != fingerprint(section())
        before = {k: v for k, v in dataclass_fields(section()).items() if k not in ("cpu_amp", *others)}
        assert fingerprint(section()) == fingerprint(before)  # caches keyed before the option stay valid


def test_classifier_and_ccam_train_the_same_model_in_channels_last_memory_and_key_their_caches(tmp_path):
    """`channels_last` of the classifier and a CCAM: the same losses up to float rounding, and a fingerprint
    that changes only when it is set."""
    import torch

    from wsseg.pipeline.executor import fingerprint
    from wsseg.stages.ccam import train_ccam

    data = DatasetConfig("synthetic", None, "train", options={"n": 16, "size": 32})
    losses = {}
    for layout in (False, True):
        config = ClassifierConfig(train=[data], image_size=32, epochs=1, batch_size=8, amp=False,
                                  channels_last=layout)
        checkpoint = train_classifier(config, BackboneConfig(TINY_MODEL, "none"), tmp_path / f"c{layout}",
                                      "cpu").checkpoint
        losses["classifier", layout] = torch.load(checkpoint, weights_only=False)["loss_history"][-1]
        ccam = CCAMConfig(name="ccam", train=[data], image_size=32, epochs=1, batch_size=8, amp=False,
                          polarity="border", channels_last=layout)
        torch.manual_seed(0)
        result = train_ccam(ccam, BackboneConfig(TINY_MODEL, "none"), tmp_path / f"ccam{layout}", "cpu")
        losses["ccam", layout] = result.metrics["final_loss"]
    for stage in ("classifier", "ccam"):
        assert losses[stage, True] == pytest.approx(losses[stage, False], rel=1e-3), losses
    for section in (ClassifierConfig, CCAMConfig):
        assert fingerprint(section(channels_last=True)) != fingerprint(section())
        assert fingerprint(section(channels_last=False)) == fingerprint(section())


def dataclass_fields(value):
    import dataclasses

    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def test_labels_filled_ahead_in_worker_processes_equal_those_made_on_first_read(tmp_path):
    """`fill_label_cache`: the GrabCut-refined self-training labels computed by two forked processes are the
    masks the source computes itself, nothing is computed twice, and a corrected image's label is never made."""
    import numpy as np

    from wsseg.config_schema import RefineStepConfig
    from wsseg.data import create_dataset
    from wsseg.stages.unet_labels import confident_mask_source, fill_label_cache, with_corrections

    dataset = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 10, "size": 48}))
    rng = np.random.default_rng(0)
    (tmp_path / "probs").mkdir()
    for i in range(len(dataset)):  # a noisy probability around the true object
        prob = np.clip(dataset.load_mask(i) * 0.7 + rng.uniform(0, 0.3, dataset.image_size(i)), 0, 1)
        np.save(tmp_path / "probs" / f"{dataset.records[i].stem}.npy", prob.astype(np.float16))
    refine = [RefineStepConfig("grabcut", options={"sure_above": 0.8, "sure_below": 0.2})]

    def source(cache):
        return confident_mask_source(dataset, tmp_path / "probs", [0.5, 0.5], refine, cache_dir=cache)

    expected = [source(None)(i) for i in range(len(dataset))]  # no cache: computed in this process
    corrected = tmp_path / "corrected"
    corrected.mkdir()
    stem = dataset.records[3].stem
    Image.fromarray(np.full(dataset.image_size(3), 255, np.uint8)).save(corrected / f"{stem}.png")
    labels = with_corrections(source(tmp_path / "cache"), dataset, {stem: corrected / f"{stem}.png"})

    assert fill_label_cache(labels, range(len(dataset)), workers=2) == len(dataset) - 1
    assert not (tmp_path / "cache" / f"{stem}.png").exists()  # the correction is what training reads
    assert fill_label_cache(labels, range(len(dataset)), workers=2) == 0  # all cached: nothing runs again
    for i in range(len(dataset)):
        assert np.array_equal(labels(i), np.ones_like(expected[i]) if i == 3 else expected[i]), i
    assert any(e.any() and not e.all() for e in expected)  # the labels compared are real masks
    assert fill_label_cache(source(None), range(len(dataset)), workers=2) == 0  # no cache: first epoch makes them


def test_pseudo_masks_written_by_worker_processes_equal_those_written_in_process(tmp_path):
    """`write_rule_masks(workers=2)`: the same GrabCut-refined PNGs and the same confidences as one process."""
    import json

    import numpy as np

    from wsseg.config_schema import RefineStepConfig
    from wsseg.data import create_dataset
    from wsseg.stages.maps import save_map
    from wsseg.stages.pseudo_masks import MaskRule, write_rule_masks

    dataset = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 9, "size": 48}))
    rng = np.random.default_rng(1)
    for i in range(len(dataset)):
        save_map(tmp_path / "maps" / f"{dataset.records[i].stem}.npy",
                 dataset.load_mask(i) * 0.6 + rng.uniform(0, 0.4, dataset.image_size(i)))
    rule = MaskRule("m", 0.5, steps=[RefineStepConfig("grabcut", options={"sure_above": 0.3, "sure_below": 0.1})])
    written = {}
    for workers in (1, 2):
        out = write_rule_masks(rule, dataset, {"m": tmp_path / "maps"}, tmp_path / str(workers), workers=workers)
        written[workers] = ({p.name: np.array(Image.open(p)) for p in sorted(out.glob("*.png"))},
                            json.loads(next(out.glob("confidence-*.json")).read_text()))
    masks, confidence = written[1]
    assert len(masks) == len(dataset) == len(confidence) and any(m.any() for m in masks.values())
    assert written[2][0].keys() == masks.keys()
    assert all(np.array_equal(written[2][0][name], masks[name]) for name in masks)
    assert written[2][1] == confidence
