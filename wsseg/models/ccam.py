"""CCAM (Xie et al., CVPR 2022): a class-agnostic activation map learned contrastively.

A 3x3 conv + batch norm head on the last two backbone stages gives a one-channel map; foreground and
background features are pooled with the map and with one minus the map; SimMax pulls background
features together (and foreground features together), SimMin pushes foreground from background.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsseg.models.weights import create_timm_model


class CCAMHead(nn.Module):
    """3x3 conv to one channel and batch norm; pools fg/bg features with the (sigmoid) map."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(1)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out")

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        activation = torch.sigmoid(self.bn(self.conv(features)))
        n, c, h, w = features.shape
        flat = features.reshape(n, c, h * w)
        weights = activation.reshape(n, 1, h * w)
        fg = torch.bmm(flat, weights.transpose(1, 2)).squeeze(2) / (h * w)
        bg = torch.bmm(flat, (1 - weights).transpose(1, 2)).squeeze(2) / (h * w)
        return fg, bg, activation


class CCAM(nn.Module):
    """Backbone (timm `features_only`, last two stages fused at a common stride) + CCAM head.

    `flip` is a buffer: 1 when the learned map marks the background, so the polarity decided after
    training travels with the weights into checkpoints and ONNX.
    """

    def __init__(self, backbone_name: str, weights: str = "none", stages: Sequence[int] = (-2, -1),
                 output_stride: int = 16):
        super().__init__()
        kwargs = {"features_only": True, "out_indices": tuple(stages)}
        if output_stride and output_stride != 32:
            kwargs["output_stride"] = output_stride
        self.backbone_name = backbone_name
        self.backbone = create_timm_model(backbone_name, weights, **kwargs)
        channels = sum(self.backbone.feature_info.channels())
        self.head = CCAMHead(channels)
        self.register_buffer("flip", torch.zeros(()))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone(images)
        size = maps[0].shape[-2:]  # stages come shallow to deep: the first is the finest
        resized = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        return torch.cat(resized, dim=1)

    def forward_train(self, images: torch.Tensor):
        """(foreground features, background features, raw map) for the contrastive losses."""
        return self.head(self.features(images))

    def forward(self, images: torch.Tensor, mode: str = "map"):
        """`map`: polarity-corrected map in [0, 1] at the input's size, (B, 1, H, W).
        `train`: what `forward_train` returns (through forward, so DistributedDataParallel syncs gradients)."""
        if mode == "train":
            return self.forward_train(images)
        _, _, activation = self.head(self.features(images))
        activation = self.flip * (1 - activation) + (1 - self.flip) * activation
        return F.interpolate(activation, size=images.shape[-2:], mode="bilinear", align_corners=False)


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    sim = F.normalize(x, dim=1) @ F.normalize(y, dim=1).t()
    return sim.clamp(min=0.0005, max=0.9995)  # as in the paper's code: keeps the logs finite


class SimMaxLoss(nn.Module):
    """Pull features of the same kind together; the most similar pairs weigh most (rank weights exp(-alpha r))."""

    def __init__(self, alpha: float = 0.25):
        super().__init__()
        self.alpha = alpha

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        sim = _cosine(features, features)
        loss = -torch.log(sim)
        _, order = sim.sort(dim=1, descending=True)
        _, rank = order.sort(dim=1)
        weights = torch.exp(-(rank.float() - 1).clamp(min=0) * self.alpha)
        return (loss * weights).mean()


class SimMinLoss(nn.Module):
    """Push foreground features away from background features."""

    def forward(self, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        return -torch.log(1 - _cosine(fg, bg)).mean()


class CCAMLoss(nn.Module):
    """SimMax(bg, bg) + SimMin(bg, fg) + SimMax(fg, fg), each term returned for logging."""

    def __init__(self, alpha: float = 0.25):
        super().__init__()
        self.sim_max = SimMaxLoss(alpha)
        self.sim_min = SimMinLoss()

    def forward(self, fg: torch.Tensor, bg: torch.Tensor):
        terms = {"bg_max": self.sim_max(bg), "min": self.sim_min(fg, bg), "fg_max": self.sim_max(fg)}
        return sum(terms.values()), terms
