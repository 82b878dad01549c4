"""How a trained U-Net's probabilities are computed inside a run (`segment.inference_backend`): eager PyTorch,
or ONNX Runtime on the model exported exactly as `wsseg export` writes it (flips averaged inside the graph),
in fp32 or INT8. On CPU the exported models are faster for the same prediction (docs/BENCHMARKS.md, deployment
speed), which is what the self-training rounds spend their prediction time on.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from wsseg.device import autocast
from wsseg.models.segmenter import SegmenterMeta, probability_model

log = logging.getLogger("wsseg")

#: images (B, 3, H, W), normalised as the U-Net expects -> probabilities (B, H, W) as float32
Predictor = Callable[[torch.Tensor], np.ndarray]
INT8_CALIBRATION_IMAGES = 16


def torch_predictor(model: torch.nn.Module, meta: SegmenterMeta, device) -> Predictor:
    net = probability_model(model, meta).to(device).eval()

    def predict(images: torch.Tensor) -> np.ndarray:
        with torch.no_grad(), autocast(device):
            return net(images.to(device))[:, 0].float().cpu().numpy()

    return predict


class OnnxPredictor:
    """The U-Net exported to a temporary ONNX file (INT8: quantised on `calibration` batches, the U-Net's
    training images) and run by ONNX Runtime; `close` removes the files."""

    def __init__(self, model: torch.nn.Module, meta: SegmenterMeta, device="cpu", int8: bool = False,
                 calibration: Optional[list] = None):
        import onnxruntime as ort

        from wsseg.deploy.onnx_export import export_segmenter_model
        from wsseg_infer.runtime import choose_providers

        self.folder = Path(tempfile.mkdtemp(prefix="wsseg-unet-"))
        path = self.folder / "unet.onnx"
        export_segmenter_model(model.cpu().eval(), meta, path)
        if int8:
            from wsseg.deploy.quantize import quantize_int8

            if not calibration:
                raise ValueError("segment.inference_backend=onnx_int8 needs calibration images")
            path = quantize_int8(path, self.folder / "unet.int8.onnx", calibration)
        on_gpu = torch.device(device).type == "cuda"
        self.session = ort.InferenceSession(str(path), providers=choose_providers("cuda" if on_gpu else "cpu"))
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        batch = images.detach().cpu().numpy().astype(np.float32)
        return self.session.run(None, {self.input_name: batch})[0][:, 0].astype(np.float32)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def unet_predictor(model: torch.nn.Module, meta: SegmenterMeta, device, backend: str = "torch",
                   calibration_set=None) -> Predictor:
    """The predictor `backend` names (torch, onnx, onnx_int8). INT8 calibrates on `calibration_set` (the
    U-Net's training images), prepared at `meta.input_size` as the predictions are."""
    if backend == "torch":
        return torch_predictor(model, meta, device)
    if backend not in ("onnx", "onnx_int8"):
        raise ValueError(f"segment.inference_backend: must be torch, onnx or onnx_int8, got '{backend}'")
    if torch.device(device).type == "cuda" and not onnx_runtime_has_cuda():
        # ONNX Runtime on the CPU beside a GPU would be the slow path; the fp32 backend's labels equal PyTorch's.
        log.warning("segment.inference_backend=%s: onnxruntime has no CUDA provider here (pip install "
                    "onnxruntime-gpu), so the U-Net predicts with PyTorch on the GPU", backend)
        return torch_predictor(model, meta, device)
    calibration = None
    if backend == "onnx_int8":
        calibration = calibration_images(calibration_set, meta)
    predictor = OnnxPredictor(model, meta, device, backend == "onnx_int8", calibration)
    model.to(device)  # export moved it to the CPU
    return predictor


def onnx_runtime_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def calibration_images(dataset, meta: SegmenterMeta, n_images: int = INT8_CALIBRATION_IMAGES) -> list:
    """`n_images` spread over `dataset`, each a 1x3xHxW float32 batch as the U-Net's input."""
    from wsseg.stages.common import eval_loader

    if dataset is None or len(dataset) == 0:
        raise ValueError("segment.inference_backend=onnx_int8 needs the U-Net's training images to calibrate on")
    picks = dataset.spread(n_images)
    loader = eval_loader(dataset, meta.input_size, meta.mean, meta.std, 1, picks)
    return [batch["image"].numpy().astype(np.float32) for batch in loader]


class Predictors:
    """One predictor per way of predicting (input size, flips) of one U-Net, made when first asked for (a
    cached stage asks for none); `close` releases them. Use as a context manager."""

    def __init__(self, model: torch.nn.Module, device, backend: str = "torch", calibration_set=None):
        self.model, self.device, self.backend, self.calibration_set = model, device, backend, calibration_set
        self._made = {}

    def get(self, meta: SegmenterMeta) -> Predictor:
        key = (meta.input_size, tuple(meta.flips))
        if key not in self._made:
            self._made[key] = unet_predictor(self.model, meta, self.device, self.backend, self.calibration_set)
        return self._made[key]

    def close(self) -> None:
        for predictor in self._made.values():
            close = getattr(predictor, "close", None)
            if close is not None:
                close()
        self._made.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def backend_key(backend: str) -> tuple:
    """What a cache adds to its fingerprint for `backend`: nothing for eager PyTorch, the reference (so its
    fingerprints are those of runs made before there was a choice)."""
    return () if backend == "torch" else (backend,)


__all__ = ["OnnxPredictor", "Predictor", "Predictors", "backend_key", "calibration_images", "torch_predictor",
           "unet_predictor"]
