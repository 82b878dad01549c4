"""Grad-CAM and its relatives from the `grad-cam` package, computed on whole batches."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

from wsseg.cams.base import MapMethod, resolve_target_layer


class SignedEigenCAM(pgc.EigenCAM):
    """EigenCAM (first principal component of the activations) with its sign fixed.

    The sign of an SVD component is arbitrary, so plain EigenCAM inverts some maps and the clip to
    [0, 1] then keeps the background. The salient region is the side with the larger magnitude
    (Seg-Eigen-CAM's rule). On 60 Kvasir-SEG train images with flip/scale TTA: Otsu Dice 0.433 vs
    0.425 without the correction.
    """

    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
        return get_2d_projection_with_sign_correction(activations)


GRADCAM_CLASSES = {
    "gradcam": pgc.GradCAM,
    "hirescam": pgc.HiResCAM,
    "fullgrad": pgc.FullGrad,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
    "eigencam": SignedEigenCAM,
    "segeigencam": pgc.SegEigenCAM,
}


class GradCamFamily(MapMethod):
    """Wraps one `pytorch_grad_cam` class around the classifier's last feature layer."""

    def __init__(self, method: str, model: torch.nn.Module, target_layer: str = "auto"):
        self.method = method
        self.layer_name, layer = resolve_target_layer(model, target_layer)
        # FullGrad uses every bias layer and warns when handed a target layer.
        layers = [] if method == "fullgrad" else [layer]
        self.cam = GRADCAM_CLASSES[method](model=model, target_layers=layers)

    def compute(self, images: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
        maps = self.cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        return np.nan_to_num(np.asarray(maps, dtype=np.float32).clip(0, 1))

    def close(self) -> None:
        self.cam.activations_and_grads.release()
