"""CCAM's head trained alone on a frozen backbone's features, computed once per image and its mirror image:
each step costs a 3x3 convolution instead of a backbone pass (`ccam.head_only`)."""

from __future__ import annotations

import torch

from wsseg.config_schema import CCAMConfig
from wsseg.device import autocast
from wsseg.models.ccam import CCAM
from wsseg.progress import ProgressFn, no_progress
from wsseg.stages.common import eval_loader, param_groups, poly_lambda
from wsseg.training import fit, training_loader


def ccam_optimizer(config: CCAMConfig, modules_lrs):
    groups = param_groups(modules_lrs, config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.SGD(groups, momentum=0.9)


class _FeatureViews(torch.utils.data.Dataset):
    """Backbone features of each image and of its mirror image; an item is one of the two, drawn from torch's
    RNG (whose state the epoch loop saves, so a resumed run draws the same)."""

    def __init__(self, views: torch.Tensor):
        self.views = views  # (N, 2, C, h, w), float16 to halve the memory

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> dict:
        return {"features": self.views[index, int(torch.randint(2, ()))].float()}


@torch.no_grad()
def backbone_features(model: CCAM, dataset, image_size: int, mean, std, device, batch_size: int = 16,
                      progress: ProgressFn = no_progress) -> torch.Tensor:
    """(N, 2, C, h, w) features of every image as the map sees it (resized to `image_size`) and mirrored."""
    model.backbone.eval()
    views = []
    loader = eval_loader(dataset, image_size, mean, std, batch_size)
    for batch in progress(loader, total=len(loader), description="ccam features"):
        images = batch["image"].to(device)
        with autocast(device):
            pair = [model.features(images), model.features(images.flip(-1))]
        views.append(torch.stack(pair, 1).half().cpu())
    return torch.cat(views)


def train_head_on_features(config: CCAMConfig, model: CCAM, dataset, mean, std, criterion, device, seed,
                            state_path, progress):
    """The head alone on features computed once: each step costs a 3x3 convolution instead of a backbone."""
    model.backbone.requires_grad_(False)
    views = backbone_features(model, dataset, config.image_size, mean, std, device, config.batch_size, progress)
    loader = training_loader(_FeatureViews(views), config.batch_size, 0, seed)
    optimizer = ccam_optimizer(config, [(model.head, config.lr * config.head_lr_scale)])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(config.epochs * len(loader)))

    def step(head, batch):
        fg, bg, _ = head(batch["features"].to(device))
        return criterion(fg.float(), bg.float())[0]

    return [h["loss"] for h in fit(config.name, model.head, loader, step, optimizer, scheduler, config.epochs,
                                   state_path, device, progress)]


__all__ = ["backbone_features", "ccam_optimizer", "train_head_on_features"]
