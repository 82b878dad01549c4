"""Segmenter training pieces, ONNX export, INT8, the torch-free runtime and the benchmarks."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from wsseg.config_schema import BackboneConfig, DatasetConfig, PredictConfig, RefineStepConfig, SegmentConfig
from wsseg.data import create_dataset
from wsseg.data.io import read_binary_mask
from wsseg.deploy.bench import bench_inference, bench_maps, map_method_callables
from wsseg.deploy.onnx_export import ProbabilityHead, export_segmenter, export_segmenter_model, read_metadata
from wsseg.deploy.quantize import (choose_keep_float, describe_kept_float, encoder_stages, mask_agreement,
                                   quantize_int8)
from wsseg.deploy.static_padding import same_padding, with_static_same_padding
from wsseg.errors import ConfigError
from wsseg.models.segmenter import (FlipAveraged, SegmenterMeta, build_unet, flip_views, load_segmenter,
                                    probability_model, save_segmenter, with_prediction)
from wsseg.stages.pseudo_masks import MaskRule
from wsseg.stages.segment import (calibrate_unet_threshold, predict_masks, segmentation_loss, train_segmenter,
                                  write_masks)
from wsseg.stages.unet_labels import IGNORE, confident_mask_source, pseudo_mask_source
from wsseg_infer.runtime import InputError, Segmenter

ROOT = Path(__file__).resolve().parents[1]
TINY_ENCODER = "tu-test_resnet"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny U-Net checkpoint and its ONNX export."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_unet(TINY_ENCODER, "none")
    meta = SegmenterMeta(TINY_ENCODER, 64, (0.5,) * 3, (0.5,) * 3, 0.5, trained_on="test")
    save_segmenter(folder / "unet.pth", model, meta)
    report = export_segmenter(folder / "unet.pth", folder / "model.onnx")
    return folder, report


def test_export_parity_dynamic_axes_and_metadata(exported):
    folder, report = exported
    assert report.max_abs_diff < 1e-4 and report.parity_shape[0] == 2 and report.parity_shape[2] != 64
    assert report.opset >= 17
    onnx.checker.check_model(onnx.load(str(report.path)))
    meta = read_metadata(report.path)
    for key in ("mean", "std", "input_size", "threshold", "class_names", "wsseg_version"):
        assert key in meta
    assert meta["input_size"] == "64" and meta["wsseg_kind"] == "segmenter"


def test_runtime_matches_torch_and_keeps_image_sizes(exported):
    folder, report = exported
    dataset = create_dataset(DatasetConfig("synthetic", None, "val", options={"n": 4, "size": 80}))
    model, meta = load_segmenter(folder / "unet.pth")
    torch_masks = predict_masks(model, meta, dataset, None, "cpu", keep=True)
    runtime = Segmenter(report.path, device="cpu")
    images = [dataset.load_image(i) for i in range(len(dataset))]
    onnx_masks = runtime.masks(images, batch_size=3)
    for t, o, image in zip(torch_masks, onnx_masks, images):
        assert o.shape == image.shape[:2]
        assert (t == o).mean() > 0.97  # resizing libraries differ by a pixel here and there


def test_flip_averaged_prediction_is_the_mean_over_flipped_views():
    torch.manual_seed(0)
    model = build_unet(TINY_ENCODER, "none").eval()
    x = torch.randn(2, 3, 64, 96)
    assert flip_views([]) == [()] and len(flip_views(["hflip", "vflip"])) == 4
    with torch.no_grad():
        logits = model(x)
        by_hand = (logits + model(x.flip(-1)).flip(-1) + model(x.flip(-2)).flip(-2)
                   + model(x.flip(-1, -2)).flip(-1, -2)) / 4
        both = FlipAveraged(model, ["hflip", "vflip"])(x)
        assert torch.allclose(FlipAveraged(model, [])(x), logits)
    assert torch.allclose(both, by_hand, atol=1e-5) and not torch.allclose(both, logits, atol=1e-3)


def test_export_and_prediction_follow_the_meta_prediction_settings(exported, tmp_path):
    folder, _ = exported
    model, meta = load_segmenter(folder / "unet.pth")
    assert with_prediction(meta, PredictConfig(size=96)).threshold == meta.threshold  # unset: the U-Net's own
    predicting = with_prediction(meta, PredictConfig(size=96, hflip=True, vflip=True, threshold=0.3))
    assert predicting.input_size == 96 and predicting.image_size == 64 and predicting.flips == ["hflip", "vflip"]
    assert predicting.threshold == 0.3 != meta.threshold
    report = export_segmenter_model(model, predicting, tmp_path / "tta.onnx")
    assert report.max_abs_diff < 1e-4  # the flips are inside the graph, at the parity check's other size too
    meta_onnx = read_metadata(report.path)
    assert meta_onnx["input_size"] == "96" and meta_onnx["trained_size"] == "64"
    assert meta_onnx["flips_averaged"] == "hflip,vflip" and float(meta_onnx["threshold"]) == 0.3
    dataset = create_dataset(DatasetConfig("synthetic", None, "val", options={"n": 3, "size": 80}))
    torch_masks = predict_masks(model, predicting, dataset, None, "cpu", keep=True)
    onnx_masks = Segmenter(report.path, device="cpu").masks([dataset.load_image(i) for i in range(3)])
    plain = predict_masks(model, meta, dataset, None, "cpu", keep=True)
    for t, o in zip(torch_masks, onnx_masks):
        assert (t == o).mean() > 0.97
    # The TTA model's probabilities are flip-symmetric: a flipped image gets the flipped probability.
    net = probability_model(model, predicting)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(net(x.flip(-1)), net(x).flip(-1), atol=1e-5)
    assert any((a != b).any() for a, b in zip(torch_masks, plain))


def test_one_prediction_pass_writes_each_folder_as_its_own_call_would(exported, tmp_path):
    folder, _ = exported
    model, meta = load_segmenter(folder / "unet.pth")
    meta = with_prediction(meta, PredictConfig(size=96, hflip=True))
    dataset = create_dataset(DatasetConfig("synthetic", None, "val", options={"n": 3, "size": 80}))
    steps = [RefineStepConfig("largest_component")]
    outputs = {tmp_path / "plain": ((), meta.threshold), tmp_path / "largest": (steps, meta.threshold),
               tmp_path / "low": ((), 0.2)}
    write_masks(model, meta, dataset, outputs, "cpu")
    for name, refine, at in (("plain", (), meta), ("largest", steps, meta), ("low", (), replace(meta, threshold=0.2))):
        expected = predict_masks(model, at, dataset, None, "cpu", keep=True, refine=refine)
        written = [read_binary_mask(tmp_path / name / f"{dataset.records[i].stem}.png") for i in range(3)]
        assert all(np.array_equal(w, e > 0) for w, e in zip(written, expected)), name
    assert any(e.any() for e in expected)


def test_unet_threshold_calibration_picks_the_grid_value_with_the_best_dice(monkeypatch):
    import wsseg.stages.segment as segment_stage

    dataset = create_dataset(DatasetConfig("synthetic", None, "val", options={"n": 4, "size": 48,
                                                                              "negative_fraction": 0.0}))
    seen = {}

    def probabilities(model, meta, dataset, device, batch_size, progress, indices, predictor=None):
        seen["meta"] = meta
        for index in range(len(dataset)):  # an under-confident U-Net: 0.3 on the objects, 0.1 elsewhere
            yield index, np.where(dataset.load_mask(index) > 0, 0.3, 0.1).astype(np.float32)

    monkeypatch.setattr(segment_stage, "_image_probabilities", probabilities)
    meta = SegmenterMeta("tu-test", 64, (0.5,) * 3, (0.5,) * 3, predict_size=96)
    threshold, curve = calibrate_unet_threshold(None, meta, dataset, [0.05, 0.2, 0.25, 0.5], "cpu")
    assert threshold == 0.2 and curve[0.2] == curve[0.25] == 1.0  # ties go to the lowest
    assert curve[0.05] < 1.0 and curve[0.5] == 0.0  # everything / nothing marked
    assert seen["meta"] is meta  # the images are predicted as the meta says


def test_runtime_preprocessing_is_the_training_pipelines(tmp_path):
    """Deployment feeds the model what it saw in training: the same reduction and plain bilinear resize
    (an antialiased resize here measured about 0.01 Dice lower on Kvasir-SEG val)."""
    from wsseg.data.io import read_image
    from wsseg.data.transforms import eval_transform
    from wsseg_infer.runtime import ModelInfo, load_image, preprocess, reduction_factor

    assert [reduction_factor(w, 600, 256) for w in (300, 600, 1100, 2100)] == [1, 2, 2, 2]
    assert reduction_factor(4200, 2100, 256) == 8 and reduction_factor(4200, 1100, 256) == 4
    info = ModelInfo("segmenter", 64, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 0.5, [], "test")
    noise = np.random.default_rng(0).integers(0, 256, (330, 270, 3), dtype=np.uint8)  # aliasing shows on noise
    Image.fromarray(noise).save(tmp_path / "big.png")
    trained = eval_transform(64, info.mean, info.std)(image=read_image(tmp_path / "big.png", 128))["image"]
    deployed = preprocess(load_image(tmp_path / "big.png"), info).transpose(1, 2, 0)
    assert read_image(tmp_path / "big.png", 128).shape == (165, 135, 3)  # box-reduced by 2, like a JPEG draft
    assert np.abs(trained - deployed).max() <= 1.01 / 255 / min(info.std)  # rounding of one 8-bit level


def test_runtime_rejects_bad_inputs(exported, tmp_path):
    runtime = Segmenter(exported[1].path, device="cpu")
    with pytest.raises(InputError, match="float32"):
        runtime.run(np.zeros((1, 3, 64, 64), np.float64))
    with pytest.raises(InputError, match=r"shape \(batch, 3, height, width\)"):
        runtime.run(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(InputError, match="multiples of 32"):
        runtime.run(np.zeros((1, 3, 50, 64), np.float32))
    with pytest.raises(InputError, match="model file not found"):
        Segmenter(tmp_path / "nope.onnx")


def test_same_padding_is_tensorflows_for_inputs_divisible_by_the_stride():
    # (top, left, bottom, right): the odd pixel goes to the end, as in TensorFlow and timm's Conv2dSame.
    assert same_padding((3, 3), (2, 2), (1, 1)) == (0, 0, 1, 1)
    assert same_padding((5, 5), (2, 2), (1, 1)) == (1, 1, 2, 2)
    assert same_padding((3, 3), (1, 1), (1, 1)) == (1, 1, 1, 1)
    assert same_padding((3, 1), (2, 1), (2, 1)) == (1, 0, 2, 0)


TF_ENCODER = "tu-tf_mobilenetv3_small_minimal_100"  # small, TF 'same' padding and depthwise convs


@pytest.fixture(scope="module")
def tf_exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_unet(TF_ENCODER, "none").eval()
    meta = SegmenterMeta(TF_ENCODER, 64, (0.5,) * 3, (0.5,) * 3, 0.5)
    return model, export_segmenter_model(model, meta, tmp_path_factory.mktemp("tf") / "model.onnx")


def test_tf_encoder_exports_without_pad_nodes_and_matches_timm(tf_exported):
    from timm.layers import Conv2dSame

    model, report = tf_exported
    static, replaced = with_static_same_padding(model)
    assert replaced == sum(isinstance(m, Conv2dSame) for m in model.modules()) > 0
    assert not any(isinstance(m, Conv2dSame) for m in static.modules())  # the copy, not the original
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(static(x), model(x), atol=1e-5)
        with pytest.raises(ValueError, match="divisible by the stride"):
            static(torch.randn(1, 3, 65, 64))
    assert report.max_abs_diff < 1e-4  # parity at a batch and size other than the traced ones
    ops = [n.op_type for n in onnx.load(str(report.path)).graph.node]
    assert "Pad" not in ops and ops.count("Conv") == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert read_metadata(report.path)["static_same_padding_convs"] == str(replaced)
    with torch.no_grad():
        expected = torch.sigmoid(model(x)).numpy()[:, 0]
    assert np.abs(Segmenter(report.path, "cpu").run(x.numpy()) - expected).max() < 1e-4


def test_int8_variant_is_written_and_close(exported, tmp_path):
    folder, report = exported
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(4)]
    out = quantize_int8(report.path, tmp_path / "model.int8.onnx", calibration)
    assert read_metadata(out)["quantization"] == "int8-static-qdq"
    x = calibration[0]
    fp32, int8 = Segmenter(report.path, "cpu").run(x), Segmenter(out, "cpu").run(x)
    assert np.abs(fp32 - int8).mean() < 0.1
    agreement = mask_agreement(report.path, out, calibration)
    assert 0.5 < agreement["mask_dice_vs_fp32"] <= 1.0 and agreement["mean_abs_prob_diff"] < 0.1
    assert mask_agreement(report.path, report.path, calibration) == {"mask_dice_vs_fp32": 1.0, "mean_abs_prob_diff": 0.0}


def _quantised_nodes(path):
    import onnx

    return {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"}


def test_int8_keep_float_decides_which_nodes_are_quantised(exported, tmp_path):
    folder, report = exported
    calibration = [np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)]
    default = _quantised_nodes(quantize_int8(report.path, tmp_path / "a.onnx", calibration))
    everything = quantize_int8(report.path, tmp_path / "b.onnx", calibration, keep_float=[])
    assert read_metadata(everything)["int8_kept_float"] == "[]"
    everything = _quantised_nodes(everything)
    in_encoder = lambda nodes: sum("/encoder/" in n for n in nodes)  # noqa: E731
    assert any("/decoder/" in n for n in default)
    # Only the encoder outputs that feed the quantised decoder get a (de)quantisation in the default model.
    assert in_encoder(everything) > 3 * max(1, in_encoder(default)) and len(everything) > len(default)


def test_encoder_stages_group_timm_and_smp_node_names():
    names = ["/model/encoder/model/conv_stem/Conv", "/model/encoder/model/blocks.3/blocks.3.0/conv_pw/Conv",
             "/model/encoder/model/blocks.3/blocks.3.1/conv_dw/Conv", "/model/encoder/layer1/layer1.0/conv1/Conv",
             "/model/decoder/blocks.0/conv1/Conv", "/model/encoder/Identity"]
    assert encoder_stages(names) == {
        "/model/encoder/model/conv_stem/": names[:1], "/model/encoder/model/blocks.3/": names[1:3],
        "/model/encoder/layer1/": names[3:4]}


def test_int8_auto_keeps_depthwise_convs_and_the_stages_that_move_the_masks(tf_exported, tmp_path):
    _, report = tf_exported
    calibration = [np.random.default_rng(i).standard_normal((1, 3, 64, 64)).astype(np.float32) for i in range(2)]
    graph = onnx.load(str(report.path)).graph
    stages = encoder_stages(n.name for n in graph.node)
    depthwise = {n.name for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1
                                                                          for a in n.attribute)}
    assert len(stages) >= 4 and depthwise
    keep, agreement = choose_keep_float(report.path, calibration, min_agreement=1.01)  # every stage too sensitive
    assert list(agreement) == list(stages) and all(0 <= a <= 1 for a in agreement.values())
    assert set(keep) == set(stages) | depthwise
    keep, _ = choose_keep_float(report.path, calibration, min_agreement=0.0)  # no stage sensitive
    assert set(keep) == depthwise
    out = quantize_int8(report.path, tmp_path / "auto.int8.onnx", calibration, keep_float=["auto"])
    meta = read_metadata(out)
    assert list(json.loads(meta["int8_stage_agreement"])) == list(stages)
    assert set(json.loads(meta["int8_kept_float"])) >= depthwise
    assert any("/encoder/" in n for n in _quantised_nodes(out))  # unlike the default, the encoder is quantised
    assert describe_kept_float(out).startswith("auto: stages") and f"{len(depthwise)} depthwise" in describe_kept_float(out)
    default = quantize_int8(report.path, tmp_path / "default.int8.onnx", calibration)
    assert describe_kept_float(default) == "/encoder/"


def test_bench_rows_have_ratios(exported):
    folder, report = exported
    model, _ = load_segmenter(folder / "unet.pth")
    rows = bench_inference(ProbabilityHead(model), {"onnxruntime fp32": report.path}, 64, (1, 2), warmup=1, iters=2,
                           rounds=3)
    assert [r.batch_size for r in rows] == [1, 1, 2, 2]
    assert rows[0].ratio == 1.0 and rows[0].ratio_range == (1.0, 1.0)
    low, high = rows[1].ratio_range
    assert 0 < low <= rows[1].ratio <= high
    with pytest.raises(ValueError, match="rounds"):
        bench_inference(ProbabilityHead(model), {}, 64, (1,), rounds=0)
    maps = bench_maps(map_method_callables("test_resnet", "none", ["ccam", "gradcam"], image_size=64), 64, 2,
                      warmup=1, iters=1)
    assert [r.name for r in maps] == ["ccam (onnxruntime)", "ccam (pytorch)", "gradcam"]
    assert all(r.images_per_s > 0 for r in maps)


def test_bench_train_times_each_unet_variant_and_the_cli_writes_them(tmp_path, capsys):
    from wsseg.cli.main import main
    from wsseg.deploy.bench import bench_training

    rows = bench_training({"default": {}, "narrow, channels_last": {"decoder_channels": [16, 8, 8, 8, 8],
                                                                    "channels_last": True},
                           "bf16": {"cpu_amp": "bf16"}},
                          TINY_ENCODER, 32, 2, warmup=1, iters=1, rounds=2)
    assert [r.name for r in rows] == ["default", "narrow, channels_last", "bf16"]
    assert rows[0].ratio == 1.0 and all(r.images_per_s > 0 for r in rows)
    with pytest.raises(ValueError, match="rounds"):
        bench_training({"default": {}}, TINY_ENCODER, 32, 2, rounds=0)
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--encoder", TINY_ENCODER, "--size", "32", "--batch-size", "2",
                 "--decoder-channels", "16", "8", "8", "8", "8", "--iters", "1", "--rounds", "1", "--out", str(out)]) == 0
    assert "channels_last" in capsys.readouterr().out
    assert [r["name"] for r in json.loads(out.read_text())] == [
        "default", "channels_last", "decoder [16, 8, 8, 8, 8]", "decoder [16, 8, 8, 8, 8], channels_last",
        "channels_last, bf16 autocast", "decoder [16, 8, 8, 8, 8], channels_last, bf16 autocast"]


def test_bench_train_times_the_classifier_variants_without_a_decoder(tmp_path, capsys):
    from wsseg.cli.main import main
    from wsseg.deploy.bench import bench_training

    rows = bench_training({"default": {}, "channels_last": {"channels_last": True}}, "test_resnet", 32, 2,
                          warmup=1, iters=1, rounds=1, model="classifier")
    assert [r.name for r in rows] == ["default", "channels_last"] and all(r.images_per_s > 0 for r in rows)
    with pytest.raises(ValueError, match="unet or classifier"):
        bench_training({"default": {}}, "test_resnet", 32, 2, model="detector")
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--model", "classifier", "--encoder", "test_resnet", "--size", "32",
                 "--batch-size", "2", "--iters", "1", "--rounds", "1", "--out", str(out)]) == 0
    assert "classifier training steps (test_resnet" in capsys.readouterr().out
    assert [r["name"] for r in json.loads(out.read_text())] == [
        "default", "channels_last", "bf16 autocast", "channels_last, bf16 autocast"]


def test_bench_labels_compares_each_backends_masks_with_pytorchs(exported, kvasir_root, tmp_path, capsys):
    from wsseg.cli.main import main

    folder, _ = exported
    out = tmp_path / "labels.json"
    assert main(["bench", "labels", str(folder / "unet.pth"), "--root", str(kvasir_root), "--split", "val",
                 "--n-images", "3", "--flips", "hflip", "--out", str(out)]) == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["torch", "onnx", "onnx_int8"] and "pixel agreement" in capsys.readouterr().out
    assert rows["torch"]["pixel_agreement"] == 1.0 and rows["torch"]["max_probability_difference"] == 0.0
    assert rows["onnx"]["max_probability_difference"] < 1e-3 and rows["onnx"]["pixel_agreement"] > 0.99
    assert 0 < rows["onnx_int8"]["mean_dice"] <= 1 and all(r["seconds_per_image"] > 0 for r in rows.values())


def test_segmentation_loss_ignores_band():
    logits = torch.zeros(1, 4, 4)
    target = torch.zeros(1, 4, 4)
    target[0, :2] = IGNORE
    wrong = target.clone()
    wrong[0, :2] = IGNORE
    logits_bad = logits.clone()
    logits_bad[0, :2] = 10.0  # confident nonsense only on ignored pixels
    assert torch.isclose(segmentation_loss(logits, target), segmentation_loss(logits_bad, wrong))
    perfect = torch.full((1, 4, 4), -10.0)
    assert segmentation_loss(perfect, torch.zeros(1, 4, 4)) < segmentation_loss(logits, torch.zeros(1, 4, 4))


def test_pseudo_mask_source_negatives_band_and_ground_truth(tmp_path):
    dataset = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 6, "size": 32,
                                                                                "negative_fraction": 0.5}))
    for i, record in enumerate(dataset.records):
        ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
        np.save(tmp_path / f"{record.stem}.npy", ramp.astype(np.float16))
    source = pseudo_mask_source(dataset, MaskRule("m", 0.5), {"m": tmp_path}, [0.4, 0.6])
    for i, record in enumerate(dataset.records):
        mask = source(i)
        if record.label == 0:
            assert not mask.any()
        else:
            assert set(np.unique(mask)) == {0, 1, IGNORE}
            assert mask[0, -1] == 1 and mask[0, 0] == 0 and mask[0, 16] == IGNORE
    truth = pseudo_mask_source(dataset, None)
    assert np.array_equal(truth(0), dataset.load_mask(0).astype(np.uint8))


def test_self_training_labels_refined_band_ignored_and_cached(tmp_path):
    dataset = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 6, "size": 32,
                                                                                "negative_fraction": 0.5}))
    prob = np.zeros((32, 32), np.float32)
    prob[2:12, 2:12] = 0.9    # the larger confident blob
    prob[20:24, 20:24] = 0.8  # a smaller one, which largest_component drops
    prob[2:12, 12:14] = 0.6   # an uncertain fringe, inside the band
    for record in dataset.records:
        np.save(tmp_path / f"{record.stem}.npy", prob.astype(np.float16))
    positive = next(i for i, r in enumerate(dataset.records) if r.label == dataset.positive_index)
    negative = next(i for i, r in enumerate(dataset.records) if r.label != dataset.positive_index)
    plain = confident_mask_source(dataset, tmp_path, [0.3, 0.7])(positive)
    assert plain[21, 21] == 1 and plain[5, 5] == 1 and plain[5, 12] == IGNORE and plain[30, 30] == 0
    cache = tmp_path / "cache"
    refined_source = confident_mask_source(dataset, tmp_path, [0.5, 0.5], [RefineStepConfig("largest_component")],
                                           cache_dir=cache)
    refined = refined_source(positive)
    assert refined[21, 21] == 0 and refined[5, 5] == 1 and refined[5, 12] == 1  # empty band: nothing ignored
    assert not refined_source(negative).any()
    cached = cache / f"{dataset.records[positive].stem}.png"  # keyed by image stem, as maps and masks are
    assert cached.is_file()
    cv2.imwrite(str(cached), np.zeros_like(refined))  # a second call reads the cache, not the maps
    assert not refined_source(positive).any()



def test_segmenter_training_starts_from_a_given_unet(tmp_path):
    """Self-training's `previous` start: at lr 0 the trained weights are the starting U-Net's, while a
    fresh start is the encoder's initial weights."""
    dataset = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 4, "size": 64}))
    config = SegmentConfig(masks="ground_truth", encoder=TINY_ENCODER, encoder_weights="none", image_size=64,
                           epochs=1, batch_size=2, lr=0.0, amp=False)
    torch.manual_seed(1)
    save_segmenter(tmp_path / "start.pth", build_unet(TINY_ENCODER, "none"),
                   SegmenterMeta(TINY_ENCODER, 64, (0.5,) * 3, (0.5,) * 3, 0.5, trained_on="test"))

    def trained(name, **kwargs):
        result = train_segmenter(config, BackboneConfig(), dataset, pseudo_mask_source(dataset), tmp_path / name,
                                 "cpu", name=name, **kwargs)
        return dict(load_segmenter(result.checkpoint)[0].named_parameters())

    start = dict(load_segmenter(tmp_path / "start.pth")[0].named_parameters())
    fine_tuned, fresh = trained("fine", start_from=tmp_path / "start.pth"), trained("fresh")
    assert all(torch.equal(p, start[k]) for k, p in fine_tuned.items())
    assert not all(torch.equal(p, start[k]) for k, p in fresh.items())
    with pytest.raises(ConfigError, match="start.pth: a U-Net with encoder tu-test_resnet"):
        train_segmenter(SegmentConfig(encoder="resnet18", encoder_weights="none"), BackboneConfig(), dataset,
                        pseudo_mask_source(dataset), tmp_path / "other", "cpu", start_from=tmp_path / "start.pth")


def test_pseudo_mask_source_computes_each_mask_once_with_a_cache(tmp_path):
    dataset = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 3, "size": 32,
                                                                                "negative_fraction": 0.0}))
    maps, cache = tmp_path / "maps", tmp_path / "cache"
    maps.mkdir()
    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    for record in dataset.records:
        np.save(maps / f"{record.stem}.npy", ramp.astype(np.float16))
    source = pseudo_mask_source(dataset, MaskRule("m", 0.5), {"m": maps}, [0.4, 0.6], cache_dir=cache)
    first = [source(i) for i in range(len(dataset))]
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{r.stem}.png" for r in dataset.records)
    for record in dataset.records:  # the maps change, but the cached masks are what later epochs see
        np.save(maps / f"{record.stem}.npy", (1 - ramp).astype(np.float16))
    again = pseudo_mask_source(dataset, MaskRule("m", 0.5), {"m": maps}, [0.4, 0.6], cache_dir=cache)
    for i in range(len(dataset)):
        assert np.array_equal(again(i), first[i]) and IGNORE in first[i]
    fresh = pseudo_mask_source(dataset, MaskRule("m", 0.5), {"m": maps}, [0.4, 0.6])
    assert fresh(0)[0, 0] == 1 and first[0][0, 0] == 0


def test_predict_cli_both_backends(exported, tmp_path):
    from wsseg.cli.main import main

    folder, report = exported
    (folder / "checkpoints").mkdir(exist_ok=True)
    (folder / "checkpoints" / "unet.pth").write_bytes((folder / "unet.pth").read_bytes())
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(images / f"a{i}.jpg")
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        assert main(["predict", str(folder), str(images), "--out", str(out), "--backend", backend, "--overlays"]) == 0
        mask = Image.open(out / "a0.png")
        assert mask.size == (90, 70) and (out / "a0_overlay.jpg").is_file()


def test_runtime_installs_and_runs_without_torch(exported, tmp_path):
    """pip install ./export into a fresh venv (no torch), then run its CLI on the exported model."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT / "export")], check=True, env=env)
    check = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True, check=True)
    assert check.stdout.strip() == "True"
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(images / "black.png")
    result = subprocess.run([str(venv / "bin" / "wsseg-infer"), str(exported[1].path), str(images), "--out",
                             str(tmp_path / "masks")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stdout and Image.open(tmp_path / "masks" / "black.png").size == (50, 40)
    bad = subprocess.run([str(venv / "bin" / "wsseg-infer"), str(exported[1].path), str(tmp_path / "missing"),
                          "--out", str(tmp_path / "m2")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "no such file or folder" in bad.stderr
