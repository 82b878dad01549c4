"""Stage 5: train a U-Net on pseudo-masks (or real masks, for the upper bound) and predict masks.
What it learns from is made in `wsseg.stages.unet_labels`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from wsseg.config_schema import BackboneConfig, SegmentConfig
from wsseg.data.base import SegmentationDataset
from wsseg.data.io import write_mask_png
from wsseg.data.transforms import TorchDataset, train_transform
from wsseg.device import autocast, batch_to, seed_everything
from wsseg.errors import ConfigError
from wsseg.models.segmenter import (SegmenterMeta, build_unet, encoder_normalisation, load_segmenter,
                                    save_segmenter, with_prediction)
from wsseg.progress import ProgressFn, no_progress
from wsseg import distributed as dist
from wsseg.stages.common import cosine_lambda, eval_loader, param_groups, write_json
from wsseg.stages.pseudo_masks import best_grid_threshold
from wsseg.stages.unet_labels import IGNORE, refined_mask
from wsseg.training import fit, state_file, training_loader

log = logging.getLogger("wsseg")


@dataclass
class SegmentResult:
    checkpoint: Path
    metrics: Dict[str, float]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice, both over the pixels that are not ignored."""
    valid = (target != IGNORE).float()
    target = target.clamp(max=1).float() * valid
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=valid, reduction="sum") / valid.sum().clamp(min=1)
    probs = torch.sigmoid(logits) * valid
    dims = (1, 2)
    dice = 1 - (2 * (probs * target).sum(dims) + 1) / (probs.sum(dims) + target.sum(dims) + 1)
    return bce + dice.mean()


def train_segmenter(config: SegmentConfig, backbone: BackboneConfig, dataset: SegmentationDataset,
                    mask_source: Callable[[int], np.ndarray], out_dir: Path, device: torch.device, seed: int = 0,
                    progress: ProgressFn = no_progress, val: Optional[SegmentationDataset] = None,
                    name: str = "unet", state_tag: str = "", start_from: Optional[Path] = None) -> SegmentResult:
    """Train the U-Net; keeps the best checkpoint by validation Dice when `val` has masks, else the last.
    `start_from`: a U-Net checkpoint to fine-tune (same encoder) instead of the encoder's initial weights."""
    seed_everything(seed)
    encoder = config.encoder or f"tu-{backbone.name}"
    weights = config.encoder_weights or backbone.weights
    if start_from is not None:
        model, start_meta = load_segmenter(Path(start_from))
        if start_meta.encoder != encoder:
            raise ConfigError(f"{start_from}: a U-Net with encoder {start_meta.encoder}, cannot start a "
                              f"{encoder} U-Net from it")
        if start_meta.decoder_channels != config.decoder_channels:
            raise ConfigError(f"{start_from}: a U-Net with decoder channels {start_meta.decoder_channels or 'default'}, "
                              f"cannot fine-tune it with segment.decoder_channels={config.decoder_channels}")
        model = model.train().to(device)
    else:
        model = build_unet(encoder, weights, config.decoder_channels).to(device)
    mean, std = encoder_normalisation(encoder)
    meta = with_prediction(SegmenterMeta(encoder, config.image_size, mean, std, config.threshold,
                                         trained_on=config.masks, decoder_channels=config.decoder_channels),
                           config.predict)
    transform = train_transform(config.image_size, mean, std, config.vertical_flip)
    loader = training_loader(TorchDataset(dataset, transform, with_masks=True, masks=mask_source,
                                          max_side=2 * config.image_size),
                             config.batch_size, config.num_workers, seed)
    optimizer = torch.optim.AdamW(param_groups([(model, config.lr)], config.weight_decay))
    steps = config.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(steps, warmup=min(50, steps // 10)))
    checkpoint = Path(out_dir) / f"{name}.pth"
    best = {"score": -1.0}

    def step(net, batch):
        batch = batch_to(batch, device, config.channels_last)
        with autocast(device, config.amp, config.cpu_amp):
            logits = net(batch["image"])[:, 0]
        return segmentation_loss(logits.float(), batch["mask"])

    def after_epoch(epoch, record):
        if val is not None and val.has_masks:
            record["val_dice"] = validation_dice(model, val, meta, device)
        score = record.get("val_dice", epoch)  # without validation masks, the last epoch wins
        if score >= best["score"] and dist.is_main():
            best["score"] = score
            save_segmenter(checkpoint, model, meta, {"epoch": epoch + 1})

    history = fit(name, model, loader, step, optimizer, scheduler, config.epochs, state_file(out_dir, name, state_tag),
                  device, progress, lambda epoch: transform.set_random_seed(seed * 1000 + epoch), after_epoch,
                  config.channels_last)
    if not checkpoint.is_file() and dist.is_main():  # resumed after the last epoch: nothing left to train
        save_segmenter(checkpoint, model, meta, {"epoch": config.epochs})
    dist.barrier()
    metrics = {"final_loss": history[-1]["loss"] if history else float("nan"),
               "best_val_dice": best["score"] if val is not None else None}
    if dist.is_main():
        write_json(Path(out_dir) / f"{name}_history.json", history)
    return SegmentResult(checkpoint, metrics)


def _probability_batches(model, meta: SegmenterMeta, dataset: SegmentationDataset, device, batch_size: int,
                         progress: ProgressFn, indices: Optional[Sequence[int]], description: str,
                         predictor=None):
    """(dataset index, probability map at the input size) for each image, in batches, predicted as `meta`
    says (`input_size`, flips averaged), by `predictor` (wsseg.stages.unet_predict; default eager PyTorch)."""
    from wsseg.stages.unet_predict import torch_predictor

    predict = predictor or torch_predictor(model, meta, device)
    loader = eval_loader(dataset, meta.input_size, meta.mean, meta.std, batch_size, indices)
    for batch in progress(loader, total=len(loader), description=description):
        yield from zip(batch["index"].tolist(), predict(batch["image"]))


def _image_probabilities(model, meta: SegmenterMeta, dataset: SegmentationDataset, device, batch_size: int,
                         progress: ProgressFn, indices: Optional[Sequence[int]], predictor=None):
    """(dataset index, probability map resized to the image's own size) for each image."""
    for index, prob in _probability_batches(model, meta, dataset, device, batch_size, progress, indices,
                                            "unet predict", predictor):
        height, width = dataset.image_size(index)
        yield index, cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)


def predict_masks(model: torch.nn.Module, meta: SegmenterMeta, dataset: SegmentationDataset, out_dir: Optional[Path],
                  device: torch.device, batch_size: int = 8, progress: ProgressFn = no_progress,
                  keep: bool = False, indices: Optional[Sequence[int]] = None,
                  refine: Sequence = ()) -> List[np.ndarray]:
    """Masks at each image's own size, after the `refine` steps if any; written as `out_dir/<stem>.png`
    when `out_dir` is given (for `indices` only, e.g. this rank's shard). Returns the masks when `keep`."""
    kept = []
    for index, prob in _image_probabilities(model, meta, dataset, device, batch_size, progress, indices):
        mask = refined_mask(prob, dataset, index, refine, meta.threshold)
        if out_dir is not None:
            write_mask_png(Path(out_dir) / f"{dataset.records[index].stem}.png", mask)
        if keep:
            kept.append(mask)
    return kept


def write_masks(model: torch.nn.Module, meta: SegmenterMeta, dataset: SegmentationDataset,
                outputs: Mapping[Path, Tuple[Sequence, float]], device: torch.device, batch_size: int = 8,
                progress: ProgressFn = no_progress, indices: Optional[Sequence[int]] = None, predictor=None) -> None:
    """Several mask folders from one prediction pass: `outputs` maps each folder to its `refine` steps
    (empty: plain masks) and threshold. The same masks as one `predict_masks` call per folder, at the cost
    of one, which matters when prediction averages flips at a larger size."""
    from wsseg.confidence import ConfidenceLog

    confidence = {out_dir: ConfidenceLog(out_dir) for out_dir in outputs}
    for index, prob in _image_probabilities(model, meta, dataset, device, batch_size, progress, indices,
                                            predictor):
        stem = dataset.records[index].stem
        for out_dir, (refine, threshold) in outputs.items():
            mask = refined_mask(prob, dataset, index, refine, threshold)
            write_mask_png(Path(out_dir) / f"{stem}.png", mask)
            confidence[out_dir].add(stem, prob, threshold)
    for log in confidence.values():
        log.save()


def calibrate_unet_threshold(model: torch.nn.Module, meta: SegmenterMeta, dataset: SegmentationDataset,
                             grid: Sequence[float], device: torch.device,
                             batch_size: int = 8, predictor=None) -> Tuple[float, Dict[float, float]]:
    """The `grid` threshold whose masks have the best mean Dice on `dataset` (a few labelled images, never
    the evaluation images), the U-Net predicting as `meta` says; and the Dice of each grid value."""
    probs = list(_image_probabilities(model, meta, dataset, device, batch_size, no_progress, None, predictor))
    truths = [dataset.load_mask(index) for index, _ in probs]
    return best_grid_threshold(grid, truths, lambda t: [prob >= t for _, prob in probs])


def write_probabilities(model: torch.nn.Module, meta: SegmenterMeta, dataset: SegmentationDataset, out_dir: Path,
                        device: torch.device, batch_size: int = 8, progress: ProgressFn = no_progress,
                        indices: Optional[Sequence[int]] = None, predictor=None) -> Path:
    """U-Net probabilities at the input size as `out_dir/<stem>.npy` (float16), for self-training."""
    from wsseg.stages.maps import save_map

    for index, prob in _probability_batches(model, meta, dataset, device, batch_size, progress, indices,
                                            "unet relabel", predictor):
        save_map(Path(out_dir) / f"{dataset.records[index].stem}.npy", prob)
    return Path(out_dir)


def validation_dice(model, dataset: SegmentationDataset, meta: SegmenterMeta, device) -> float:
    from wsseg.metrics import dice

    masks = predict_masks(model, meta, dataset, None, device, keep=True)
    return float(np.mean([dice(m, dataset.load_mask(i)) for i, m in enumerate(masks)]))


__all__ = ["SegmentResult", "calibrate_unet_threshold", "load_segmenter", "predict_masks", "segmentation_loss",
           "train_segmenter", "write_masks", "write_probabilities"]
