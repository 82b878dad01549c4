"""Stage 2b: train CCAM (ImageNet- or classifier-initialised), decide its polarity, save it."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from wsseg.checkpoint import atomic_save
from wsseg.config_schema import BackboneConfig, CCAMConfig
from wsseg.data import DatasetCatalog
from wsseg.data.base import SegmentationDataset
from wsseg.data.transforms import TorchDataset, train_transform
from wsseg.device import autocast, batch_to, seed_everything
from wsseg.errors import ConfigError
from wsseg.models.ccam import CCAM, CCAMLoss
from wsseg.models.classifier import normalisation
from wsseg.progress import ProgressFn, no_progress
from wsseg import distributed as dist
from wsseg.stages.ccam_head import ccam_optimizer, train_head_on_features
from wsseg.stages.common import eval_loader, poly_lambda, write_json
from wsseg.training import fit, state_file, training_loader

log = logging.getLogger("wsseg")
MIN_RECOMMENDED_BATCH = 16  # the contrastive losses compare every pair in a batch


@dataclass
class CCAMResult:
    checkpoint: Path
    metrics: Dict[str, float]


def build_ccam(config: CCAMConfig, backbone: BackboneConfig, classifier_checkpoint: Optional[Path]) -> CCAM:
    backbone = config.backbone or backbone
    weights = backbone.weights
    if config.init == "classifier":
        if classifier_checkpoint is None:
            raise ConfigError(f"ccam '{config.name}': init=classifier needs the classifier stage's checkpoint")
        meta = torch.load(classifier_checkpoint, map_location="cpu", weights_only=False)["meta"]
        if meta["model_name"] != backbone.name:
            raise ConfigError(f"ccam '{config.name}': classifier backbone is {meta['model_name']}, "
                              f"CCAM backbone is {backbone.name}; they must match for init=classifier")
        weights = str(classifier_checkpoint)
    return CCAM(backbone.name, weights, config.stages, config.output_stride)


def border_score(activation: torch.Tensor) -> float:
    """Mean of the binarised map along the image border: high means the map marks the background."""
    binary = (activation > 0.5).float()
    edges = torch.cat([binary[..., 0, :], binary[..., -1, :], binary[..., :, 0], binary[..., :, -1]], dim=-1)
    return float(edges.mean())


def mean_correlation(maps: torch.Tensor, references: torch.Tensor) -> float:
    """Mean over images of the pixel correlation of a map with its reference (a flat pair is skipped; NaN
    when every pair is flat)."""
    flat_maps, flat_refs = maps.flatten(1).float(), references.flatten(1).float()
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # a flat map has no correlation: skipped
        return float(np.nanmean([np.corrcoef(a.numpy(), b.numpy())[0, 1] for a, b in zip(flat_maps, flat_refs)]))


@torch.no_grad()
def decide_polarity(model: CCAM, dataset: SegmentationDataset, mode: str, device, image_size: int, mean, std,
                    reference_maps=None, n_images: int = 64,
                    labelled: Optional[SegmentationDataset] = None) -> Dict[str, float]:
    """Set `model.flip` so that the map marks objects. `labelled` (images with masks; mode `labelled`) decides
    by the maps' correlation with the masks; `reference_maps(images)` (e.g. the classifier's Grad-CAM) by
    correlation with it when given; otherwise the border cue of the original code."""
    model.flip.zero_()
    requested = mode
    if mode in ("none", "inverted"):
        model.flip.fill_(float(mode == "inverted"))
        return {"polarity_mode": mode, "flip": float(model.flip)}
    if mode == "labelled":
        if labelled is None or not labelled.has_masks:
            raise ConfigError("ccam.polarity=labelled needs labelled images (pseudo_masks.calibrate.dataset)")
        maps, masks = [], []
        for batch in eval_loader(labelled, image_size, mean, std, 16, with_masks=True):
            maps.append(model(batch["image"].to(device))[:, 0].float().cpu())
            masks.append(batch["mask"])
        corr = mean_correlation(torch.cat(maps), torch.cat(masks))
        if not np.isnan(corr):
            model.flip.fill_(float(corr < 0))
            return {"labelled_correlation": corr, "labelled_images": len(labelled), "polarity_mode": mode,
                    "flip": float(corr < 0)}
        log.warning("ccam polarity: the maps of the %d labelled images are flat or their masks empty; deciding "
                    "by the classifier's Grad-CAM when given, else the border cue", len(labelled))
        mode = "auto"
    loader = eval_loader(dataset, image_size, mean, std, 16)
    maps, refs, seen = [], [], 0
    for batch in loader:
        images = batch["image"].to(device)
        maps.append(model(images).cpu())
        if reference_maps is not None and mode in ("auto", "classifier"):
            with torch.enable_grad():  # Grad-CAM needs gradients even though CCAM does not
                refs.append(torch.as_tensor(reference_maps(images)))
        seen += len(images)
        if seen >= n_images:
            break
    maps = torch.cat(maps)
    info = {"border_score": border_score(maps)}
    if refs:
        corr = mean_correlation(maps[:, 0], torch.cat(refs))
        if np.isnan(corr):  # every map flat: the classifier cannot tell, fall back to the border cue
            corr = -1.0 if info["border_score"] > 0.5 else 1.0
        info["classifier_correlation"] = float(corr)
        flip = corr < 0
    elif mode == "classifier":
        raise ConfigError("ccam.polarity=classifier needs a classifier stage")
    else:
        flip = info["border_score"] > 0.5
    model.flip.fill_(float(flip))
    info.update({"polarity_mode": requested, "flip": float(flip)})
    return info


def train_ccam(config: CCAMConfig, backbone: BackboneConfig, out_dir: Path, device: torch.device,
               train_set: Optional[SegmentationDataset] = None, seed: int = 0,
               classifier_checkpoint: Optional[Path] = None,
               reference_maps=None, progress: ProgressFn = no_progress, state_tag: str = "",
               labelled: Optional[SegmentationDataset] = None) -> CCAMResult:
    """Train one CCAM variant with the contrastive losses on `train_set` (the runner builds it from
    `config.train`; by default it is read here); returns its checkpoint and training metrics."""
    seed_everything(seed)
    if config.batch_size < MIN_RECOMMENDED_BATCH:
        log.warning("ccam '%s': batch_size %d is below %d; the contrastive losses compare pairs within a batch "
                    "and become noisy with few images", config.name, config.batch_size, MIN_RECOMMENDED_BATCH)
    dataset = train_set if train_set is not None else DatasetCatalog().concat(config.train, "ccam.train")
    model = build_ccam(config, backbone, classifier_checkpoint).to(device)
    mean, std = normalisation(model.backbone)
    criterion = CCAMLoss(config.alpha)
    if config.head_only:
        history = train_head_on_features(config, model, dataset, mean, std, criterion, device, seed,
                                          state_file(out_dir, config.name, state_tag), progress)
    else:
        history = _train_whole(config, model, dataset, mean, std, criterion, device, seed,
                               state_file(out_dir, config.name, state_tag), progress)
    model.backbone.requires_grad_(True)
    model.eval()
    polarity = decide_polarity(model, dataset, config.polarity, device, config.image_size, mean, std, reference_maps,
                               labelled=labelled)
    log.info("%s polarity: %s", config.name, polarity)
    checkpoint = Path(out_dir) / f"{config.name}.pth"
    metrics = {"final_loss": history[-1] if history else float("nan"), **polarity}
    if dist.is_main():
        save_ccam(checkpoint, model, config, mean, std)
        write_json(Path(out_dir) / f"{config.name}_metrics.json", metrics)
    dist.barrier()
    return CCAMResult(checkpoint, metrics)


def _train_whole(config: CCAMConfig, model: CCAM, dataset, mean, std, criterion, device, seed, state_path,
                 progress):
    """Backbone and head on augmented images (the backbone optionally frozen for the first epochs)."""
    transform = train_transform(config.image_size, mean, std, config.vertical_flip)
    loader = training_loader(TorchDataset(dataset, transform, max_side=2 * config.image_size), config.batch_size,
                             config.num_workers, seed)
    optimizer = ccam_optimizer(config, [(model.backbone, config.lr), (model.head, config.lr * config.head_lr_scale)])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(config.epochs * len(loader)))

    def before_epoch(epoch):
        transform.set_random_seed(seed * 1000 + epoch)
        frozen = epoch < config.freeze_backbone_epochs  # the paper's optional frozen-backbone phase
        model.backbone.requires_grad_(not frozen)
        if frozen:
            log.info("%s epoch %d: backbone frozen", config.name, epoch + 1)

    def step(net, batch):
        images = batch_to(batch, device, config.channels_last)["image"]
        if not next(model.backbone.parameters()).requires_grad:
            model.backbone.eval()  # frozen phase: batch-norm statistics stay as initialised
        with autocast(device, config.amp, config.cpu_amp):
            fg, bg, _ = net(images, mode="train")
        loss, _terms = criterion(fg.float(), bg.float())
        return loss

    return [h["loss"] for h in fit(config.name, model, loader, step, optimizer, scheduler, config.epochs,
                                   state_path, device, progress, before_epoch, channels_last=config.channels_last)]


def save_ccam(path: Path, model: CCAM, config: CCAMConfig, mean, std) -> None:
    atomic_save({"meta": {"backbone": model.backbone_name, "stages": list(config.stages),
                         "output_stride": config.output_stride, "image_size": config.image_size,
                         "mean": list(mean), "std": list(std), "name": config.name},
                "state_dict": model.state_dict()}, path)


def load_ccam(path: Path, map_location="cpu"):
    """Rebuild a trained CCAM (polarity included) from its checkpoint; returns (model, meta)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    meta = checkpoint["meta"]
    model = CCAM(meta["backbone"], "none", meta["stages"], meta["output_stride"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), meta
