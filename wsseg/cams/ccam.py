"""CCAM maps as a map method: forward only, batched, no gradients (TTA comes from `TTAMaps`).

Two backends: PyTorch (channels-last, inference mode) and ONNX Runtime on the exported map model,
the fast path for pseudo-labelling large image sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from wsseg.cams.base import MapMethod


class CCAMMaps(MapMethod):
    """Class-agnostic: `targets` are ignored."""

    requires_classifier = False

    def __init__(self, model: torch.nn.Module):
        # channels-last lets oneDNN (CPU) and cuDNN pick faster convolution kernels for inference
        self.model = model.eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def compute(self, images: torch.Tensor, targets: Sequence[int] = ()) -> np.ndarray:
        return self.model(images.contiguous(memory_format=torch.channels_last))[:, 0].float().cpu().numpy()


class CCAMOnnxMaps(MapMethod):
    """The same maps from an exported CCAM (`wsseg.deploy.onnx_export.export_ccam`) through ONNX Runtime."""

    requires_classifier = False

    def __init__(self, onnx_path: Path, threads: Optional[int] = None, device: str = "auto"):
        import onnxruntime as ort

        from wsseg_infer.runtime import choose_providers, session_options

        self.session = ort.InferenceSession(str(onnx_path), session_options(threads), providers=choose_providers(device))

    def compute(self, images: torch.Tensor, targets: Sequence[int] = ()) -> np.ndarray:
        return self.session.run(None, {"image": images.detach().cpu().numpy().astype(np.float32)})[0][:, 0]
