"""Test-time augmentation for any map method: maps averaged over horizontal flips and scales."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsseg.cams.base import MapMethod


class TTAMaps(MapMethod):
    """Wraps a map method; each augmented map is mapped back to the original frame before averaging."""

    def __init__(self, method: MapMethod, hflip: bool = False, scales: Sequence[float] = (1.0,)):
        self.method = method
        self.hflip = hflip
        self.scales = list(scales) or [1.0]
        self.requires_classifier = method.requires_classifier
        self.needs_fit = method.needs_fit

    def fit(self, batches):
        """Fitted on the images as given (no augmentation): the augmented views are mapped with it."""
        self.method.fit(batches)
        return self

    def compute(self, images: torch.Tensor, targets: Sequence[int] = ()) -> np.ndarray:
        height, width = images.shape[-2:]
        total = np.zeros((images.shape[0], height, width), np.float32)
        count = 0
        for scale in self.scales:
            scaled = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                               align_corners=False)
            for flipped in ([False, True] if self.hflip else [False]):
                batch = scaled.flip(-1) if flipped else scaled
                maps = torch.from_numpy(np.ascontiguousarray(self.method.compute(batch, targets)))
                if flipped:
                    maps = maps.flip(-1)
                total += F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear",
                                       align_corners=False)[:, 0].numpy()
                count += 1
        return total / count

    def close(self) -> None:
        self.method.close()
