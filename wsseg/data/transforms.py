"""Albumentations pipelines and the torch Dataset that applies them."""

from __future__ import annotations

from typing import Optional, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from wsseg.data.base import SegmentationDataset
from wsseg.errors import about

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(size: int, mean: Sequence[float], std: Sequence[float], vertical_flip: bool = True) -> A.Compose:
    """Random crop, flips, small rotations and colour jitter: what endoscopy and pet photos vary in."""
    steps = [
        A.RandomResizedCrop(size=(size, size), scale=(0.5, 1.0), ratio=(0.8, 1.25)),
        A.HorizontalFlip(p=0.5),
    ]
    if vertical_flip:
        steps.append(A.VerticalFlip(p=0.5))
    steps += [
        A.Affine(rotate=(-15, 15), p=0.3),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.5),
        A.Normalize(mean=mean, std=std),
    ]
    return A.Compose(steps)


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    return A.Compose([A.Resize(size, size), A.Normalize(mean=mean, std=std)])


class TorchDataset(Dataset):
    """Yields dicts: `image` (3xHxW float tensor), `label`, `index`, and `mask` when asked for."""

    def __init__(self, dataset: SegmentationDataset, transform: A.Compose, with_masks: bool = False,
                 masks: Optional[object] = None, max_side: Optional[int] = None):
        self.dataset = dataset
        self.transform = transform
        self.with_masks = with_masks
        self.masks = masks  # optional callable index -> mask overriding the dataset's own
        self.max_side = max_side  # decode large JPEGs at reduced scale (training crops need no more)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        with about(image=lambda: self.dataset.image_name(index)):
            return self._item(index)

    def _item(self, index: int) -> dict:
        image = self.dataset.load_image(index, self.max_side)
        item = {"label": self.dataset.records[index].label, "index": index}
        if self.with_masks:
            mask = self.masks(index) if self.masks is not None else self.dataset.load_mask(index)
            if mask.shape != image.shape[:2]:  # the image was decoded at reduced scale
                mask = cv2.resize(mask.astype(np.uint8), (image.shape[1], image.shape[0]),
                                  interpolation=cv2.INTER_NEAREST)
            out = self.transform(image=image, mask=mask.astype(np.uint8))
            item["mask"] = torch.from_numpy(np.ascontiguousarray(out["mask"])).float()
        else:
            out = self.transform(image=image)
        item["image"] = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))).float()
        return item
