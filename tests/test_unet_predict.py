"""The U-Net's probabilities inside a run through ONNX Runtime (`segment.inference_backend`): the same as
eager PyTorch (fp32) or within the INT8 tolerance export uses, and keyed so a changed backend remakes the
self-training labels but never retrains the U-Net they came from."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_demo_overrides
from wsseg.cli.main import main
from wsseg.models.segmenter import SegmenterMeta, build_unet
from wsseg.stages.unet_predict import Predictors, unet_predictor

TINY_ENCODER = "tu-test_resnet"




@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = build_unet(TINY_ENCODER, "none").eval()
    meta = SegmenterMeta(TINY_ENCODER, 64, (0.5,) * 3, (0.5,) * 3, 0.5, flips=["hflip", "vflip"])
    return model, meta


def test_onnx_fp32_predicts_what_pytorch_predicts(unet):
    model, meta = unet
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = unet_predictor(model, meta, torch.device("cpu"))(images)
    with Predictors(model, torch.device("cpu"), "onnx") as predictors:
        onnx = predictors.get(meta)(images)
        assert predictors.get(meta) is predictors.get(meta)  # one export per way of predicting
        folder = predictors.get(meta).folder
        assert folder.is_dir()
    assert not folder.exists()  # closed: the temporary model is gone
    assert onnx.shape == reference.shape == (3, 64, 64) and onnx.dtype == np.float32
    assert np.abs(onnx - reference).max() < 1e-4


def test_onnx_int8_within_the_export_tolerance(unet, tmp_path):
    from wsseg.config_schema import DatasetConfig
    from wsseg.data import create_dataset

    model, meta = unet
    train = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 8, "size": 64}))
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    reference = unet_predictor(model, meta, torch.device("cpu"))(images)
    with Predictors(model, torch.device("cpu"), "onnx_int8", train) as predictors:
        int8 = predictors.get(meta)(images)
    masks = [(a >= 0.5, b >= 0.5) for a, b in zip(reference, int8)]
    dice = [1.0 if a.sum() + b.sum() == 0 else 2 * (a & b).sum() / (a.sum() + b.sum()) for a, b in masks]
    assert np.abs(int8 - reference).mean() < 0.1 and np.mean(dice) > 0.5  # as export's INT8 check
    with pytest.raises(ValueError, match="must be torch, onnx or onnx_int8"):
        unet_predictor(model, meta, torch.device("cpu"), "tensorrt")


def test_on_a_gpu_without_the_onnxruntime_cuda_provider_pytorch_predicts(unet, monkeypatch, caplog):
    """ONNX Runtime on the CPU beside a GPU would be slower than PyTorch on it: the run says so and uses PyTorch."""
    import wsseg.stages.unet_predict as unet_predict

    model, meta = unet
    monkeypatch.setattr(unet_predict, "onnx_runtime_has_cuda", lambda: False)
    monkeypatch.setattr(unet_predict, "torch_predictor", lambda m, mt, device: ("pytorch on", str(device)))
    with caplog.at_level("WARNING", logger="wsseg"):
        assert unet_predict.unet_predictor(model, meta, torch.device("cuda"), "onnx") == ("pytorch on", "cuda")
    assert "no CUDA provider" in caplog.text and "onnxruntime-gpu" in caplog.text


def test_a_changed_backend_remakes_the_labels_not_the_unet_they_came_from(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + ["segment.masks=gradcam", "export.enabled=false",
                                                     "pseudo_masks.variants=[]", "segment.self_training_rounds=1"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    torch_masks = {p.name: np.array(Image.open(p)) for p in (out / "masks" / "unet_round0").glob("*.png")}
    assert main(["recipe", "run", "--resume", str(out), "segment.inference_backend=onnx"]) == 0
    skipped = json.loads((out / "metrics.json").read_text())["resumed_skipped_stages"]
    assert "unet_round0" in skipped  # the U-Net is the same model whatever runs it
    assert "unet_round0_probabilities" not in skipped and "unet_round1" not in skipped  # its labels are not
    onnx_masks = {p.name: np.array(Image.open(p)) for p in (out / "masks" / "unet_round0").glob("*.png")}
    assert onnx_masks.keys() == torch_masks.keys()
    agreement = np.mean([(onnx_masks[k] == torch_masks[k]).mean() for k in torch_masks])
    assert agreement > 0.99, agreement
    assert main(["recipe", "run", "--resume", str(out), "segment.inference_backend=onnx"]) == 0
    skipped = json.loads((out / "metrics.json").read_text())["resumed_skipped_stages"]
    assert {"unet_round0", "unet_round0_probabilities", "unet_round1"} <= set(skipped)  # the same backend: reused
