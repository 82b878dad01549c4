"""Stage 1: train an image-level classifier (any timm model) and measure it on a held-out split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from wsseg.config_schema import BackboneConfig, ClassifierConfig
from wsseg.data import DatasetCatalog
from wsseg.data.base import SegmentationDataset
from wsseg.data.transforms import TorchDataset, train_transform
from wsseg.device import autocast, batch_to, seed_everything
from wsseg.errors import DataError
from wsseg.metrics import roc_auc
from wsseg.models.classifier import ClassifierMeta, build_classifier, load_classifier, normalisation, save_classifier
from wsseg.progress import ProgressFn, no_progress
from wsseg import distributed as dist
from wsseg.stages.common import cosine_lambda, eval_loader, param_groups, write_json
from wsseg.training import fit, state_file, training_loader

log = logging.getLogger("wsseg")


class AlternatingLoader:
    """Epoch e draws from loader e mod n; `len` and `sampler` follow the current one."""

    def __init__(self, loaders):
        self.loaders, self.epoch = loaders, 0

    @property
    def current(self):
        return self.loaders[self.epoch % len(self.loaders)]

    @property
    def sampler(self):
        return self.current.sampler

    @property
    def generator(self):
        return self.current.generator

    def __len__(self):
        return len(self.current)

    def __iter__(self):
        return iter(self.current)


@dataclass
class ClassifierResult:
    checkpoint: Path
    metrics: Dict[str, float]


def _class_weights(datasets: List[SegmentationDataset], num_classes: int) -> torch.Tensor:
    counts = np.bincount(np.concatenate([d.labels for d in datasets]), minlength=num_classes).astype(np.float64)
    weights = counts.sum() / np.maximum(counts, 1) / num_classes
    return torch.tensor(weights, dtype=torch.float32)


@torch.no_grad()
def predict_probabilities(model, dataset: SegmentationDataset, meta: ClassifierMeta, device, batch_size: int = 32,
                          progress: ProgressFn = no_progress, num_workers: int = 0) -> np.ndarray:
    """Softmax probabilities (N x classes) for every image of `dataset`."""
    loader = eval_loader(dataset, meta.image_size, meta.mean, meta.std, batch_size, num_workers=num_workers)
    model.eval()
    out = []
    for batch in progress(loader, total=len(loader), description="classify"):
        with autocast(device):
            logits = model(batch["image"].to(device))
        out.append(logits.float().softmax(1).cpu().numpy())
    return np.concatenate(out)


def evaluate_classifier(probs: np.ndarray, labels: np.ndarray, positive_index: int) -> Dict[str, float]:
    metrics = {"accuracy": float((probs.argmax(1) == labels).mean()), "n_images": int(len(labels))}
    if probs.shape[1] == 2:
        metrics["roc_auc"] = roc_auc(labels == positive_index, probs[:, positive_index])
    return metrics


def train_classifier(config: ClassifierConfig, backbone: BackboneConfig, out_dir: Path, device: torch.device,
                     datasets: Optional[DatasetCatalog] = None, seed: int = 0,
                     progress: ProgressFn = no_progress, state_tag: str = "") -> ClassifierResult:
    """Train on `config.train` (several datasets alternate epoch by epoch, or with `schedule: concat` are
    read as one set), keep the last checkpoint.

    Returns the checkpoint path and held-out metrics (accuracy, ROC AUC) when `config.val` is set. The
    datasets come from `datasets`, the run's catalog (default: one reading relative roots below ./data).
    """
    seed_everything(seed)
    backbone = config.backbone or backbone
    out_dir = Path(out_dir)
    datasets = datasets or DatasetCatalog()
    train_sets = [datasets.get(d, f"classifier.train.{i}") for i, d in enumerate(config.train)]
    if not train_sets:
        raise DataError("classifier.train: no training dataset given")
    classes = train_sets[0].classes
    for d in train_sets[1:]:
        if len(d.classes) != len(classes):
            raise DataError(f"classifier.train: datasets disagree on the classes ({classes} vs {d.classes})")
    model = build_classifier(backbone.name, backbone.weights, len(classes)).to(device)
    mean, std = normalisation(model)
    meta = ClassifierMeta(backbone.name, list(classes), train_sets[0].positive_index, config.image_size, mean, std)
    transform = train_transform(config.image_size, mean, std, config.vertical_flip)
    parts = [TorchDataset(d, transform, max_side=2 * config.image_size) for d in train_sets]
    if config.schedule == "concat":  # torch's concat: file stems may repeat across sets, unlike maps' folders
        parts = [torch.utils.data.ConcatDataset(parts)]
    loaders = [training_loader(part, config.batch_size, config.num_workers, seed + i) for i, part in enumerate(parts)]
    # Several datasets alternate epoch by epoch (the paper's schedule for pets and polyps).
    loader = loaders[0] if len(loaders) == 1 else AlternatingLoader(loaders)
    steps = sum(len(loaders[e % len(loaders)]) for e in range(config.epochs))
    optimizer = torch.optim.AdamW(param_groups([(model, config.lr)], config.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(steps, warmup=min(50, steps // 10)))
    class_weights = _class_weights(train_sets, len(classes)).to(device)

    def step(net, batch):
        batch = batch_to(batch, device, config.channels_last)
        with autocast(device, config.amp, config.cpu_amp):
            logits = net(batch["image"])
        return F.cross_entropy(logits.float(), batch["label"], weight=class_weights)

    def before_epoch(epoch):
        transform.set_random_seed(seed * 1000 + epoch)
        if isinstance(loader, AlternatingLoader):
            loader.epoch = epoch

    history = fit("classifier", model, loader, step, optimizer, scheduler, config.epochs,
                  state_file(out_dir, "classifier", state_tag), device, progress, before_epoch,
                  channels_last=config.channels_last)
    history = [h["loss"] for h in history]
    checkpoint = out_dir / "classifier.pth"
    if dist.is_main():
        save_classifier(checkpoint, model, meta, {"loss_history": history})
    metrics: Dict[str, float] = {"final_loss": history[-1] if history else float("nan")}
    if config.val is not None and dist.is_main():
        val = datasets.get(config.val, "classifier.val")
        probs = predict_probabilities(model, val, meta, device, config.batch_size, progress, config.num_workers)
        metrics.update(evaluate_classifier(probs, val.labels, meta.positive_index))
        log.info("classifier on %s: accuracy %.4f, ROC AUC %.4f", val.describe(), metrics["accuracy"],
                 metrics.get("roc_auc", float("nan")))
    if dist.is_main():
        write_json(out_dir / "classifier_metrics.json", metrics)
    dist.barrier()
    return ClassifierResult(checkpoint, metrics)


__all__ = ["ClassifierResult", "evaluate_classifier", "load_classifier", "predict_probabilities", "train_classifier"]
