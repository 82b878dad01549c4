"""Helpers shared by the stages: loaders, JSON output, optimiser groups."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      drop_last=drop_last and len(dataset) > batch_size, generator=generator,
                      persistent_workers=False)


def eval_loader(dataset, image_size: int, mean: Sequence[float], std: Sequence[float], batch_size: int,
                indices: Optional[Sequence[int]] = None, num_workers: int = 0, with_masks: bool = False) -> DataLoader:
    """Resize + normalise in order, optionally only `indices` (e.g. this rank's shard), with each image's mask
    resized alike when `with_masks`. Large JPEGs decode at reduced scale: nothing beyond twice the input size
    survives the resize anyway."""
    from wsseg.data.transforms import TorchDataset, eval_transform

    images = TorchDataset(dataset, eval_transform(image_size, mean, std), with_masks=with_masks,
                          max_side=2 * image_size)
    if indices is not None:
        images = Subset(images, list(indices))
    return make_loader(images, batch_size, shuffle=False, num_workers=num_workers)


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write: never a half-written metrics file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True))
    tmp.replace(path)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def param_groups(modules_lrs, weight_decay: float):
    """Parameter groups with weight decay on weights only (not biases or norm parameters)."""
    groups = []
    for module, lr in modules_lrs:
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def poly_lambda(total_steps: int, power: float = 0.9):
    return lambda step: max(0.0, 1.0 - step / max(1, total_steps)) ** power


def cosine_lambda(total_steps: int, warmup: int = 0):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return f
