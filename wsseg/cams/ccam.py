"""CCAM maps as a map method: forward only, batched, no gradients (TTA comes from `TTAMaps`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from wsseg.cams.base import MapMethod


class CCAMMaps(MapMethod):
    """Class-agnostic: `targets` are ignored."""

    requires_classifier = False

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    @torch.no_grad()
    def compute(self, images: torch.Tensor, targets: Sequence[int] = ()) -> np.ndarray:
        return self.model(images)[:, 0].float().cpu().numpy()
