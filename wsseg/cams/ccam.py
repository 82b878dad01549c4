"""CCAM maps as a map method: forward only, batched, optional flip/scale test-time augmentation."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsseg.cams.base import MapMethod


class CCAMMaps(MapMethod):
    """Class-agnostic: `targets` are ignored. Maps are averaged over flips and scales when asked."""

    requires_classifier = False

    def __init__(self, model: torch.nn.Module, hflip: bool = False, scales: Sequence[float] = (1.0,)):
        self.model = model.eval()
        self.hflip = hflip
        self.scales = list(scales) or [1.0]

    @torch.no_grad()
    def compute(self, images: torch.Tensor, targets: Sequence[int] = ()) -> np.ndarray:
        height, width = images.shape[-2:]
        total = torch.zeros(images.shape[0], 1, height, width, device=images.device)
        count = 0
        for scale in self.scales:
            scaled = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                               align_corners=False)
            variants = [(scaled, False)] + ([(scaled.flip(-1), True)] if self.hflip else [])
            for batch, flipped in variants:
                activation = self.model(batch)
                if flipped:
                    activation = activation.flip(-1)
                total += F.interpolate(activation, size=(height, width), mode="bilinear", align_corners=False)
                count += 1
        return (total / count)[:, 0].float().cpu().numpy()
