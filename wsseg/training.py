"""The epoch loop shared by every training stage: DDP, resumable state, NaN guard, progress.

Each epoch ends with an atomic `<name>.state.pth` (model, optimiser, scheduler, RNG and loader
states, history), so a killed run resumes at the next epoch with the same random stream.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from wsseg import distributed as dist
from wsseg.checkpoint import atomic_save
from wsseg.progress import ProgressFn, no_progress

log = logging.getLogger("wsseg")


def training_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """Shuffled loader; under torchrun a DistributedSampler splits each epoch and the global batch."""
    if dist.is_distributed():
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        per_rank = max(1, batch_size // dist.world_size())  # the recipe's batch size stays the global one
        return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=num_workers, drop_last=True)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                      drop_last=len(dataset) > batch_size, generator=generator)


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if not dist.is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _rng_state(loader: DataLoader) -> Dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if loader.generator is not None:
        state["loader"] = loader.generator.get_state()
    return state


def _set_rng_state(state: Dict, loader: DataLoader) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "loader" in state and loader.generator is not None:
        loader.generator.set_state(state["loader"])


class NonFiniteLoss(FloatingPointError):
    """Training produced NaN/inf; the message names the last good checkpoint."""


def fit(name: str, model: torch.nn.Module, loader: DataLoader, step: Callable[[torch.nn.Module, dict], torch.Tensor],
        optimizer: torch.optim.Optimizer, scheduler, epochs: int, state_path: Path, device: torch.device,
        progress: ProgressFn = no_progress, before_epoch: Optional[Callable[[int], None]] = None,
        after_epoch: Optional[Callable[[int, Dict], None]] = None, channels_last: bool = False) -> List[Dict]:
    """Train for `epochs`; `step(model, batch) -> loss`. Resumes from `state_path` when it exists. The model
    trains in channels-last memory on CUDA, and on any device with `channels_last` (`step` then moves its
    batches with `batch_to(..., channels_last=True)`)."""
    state_path = Path(state_path)
    history: List[Dict] = []
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], loader)
        history, start = state["history"], state["epoch"]
        log.info("%s: resuming after epoch %d from %s", name, start, state_path)
    if channels_last or torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)
    model = wrap_model(model, device)
    for epoch in range(start, epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        model.train()
        total, count = 0.0, 0
        for batch in progress(loader, total=len(loader), description=f"{name} epoch {epoch + 1}/{epochs}"):
            loss = step(model, batch)
            if not torch.isfinite(loss):
                last = f"the last good state is {state_path} (epoch {start})" if state_path.is_file() else \
                    "no epoch finished, so there is no checkpoint"
                raise NonFiniteLoss(f"{name}: loss became {loss.item()} in epoch {epoch + 1}; training stopped, "
                                    f"{last}. Lower the learning rate or check the data.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
            count += 1
        record = {"epoch": epoch + 1, "loss": dist.mean_across_ranks(total / max(1, count))}
        if after_epoch is not None:
            after_epoch(epoch, record)
        history.append(record)
        log.info("%s epoch %d/%d: %s", name, epoch + 1, epochs, record)
        if dist.is_main():
            save_state(state_path, unwrap(model), optimizer, scheduler, _rng_state(loader), history, epoch + 1)
        start = epoch + 1
        dist.barrier()
    return history


def state_file(folder: Path, name: str, tag: str = "") -> Path:
    """Per-epoch training state; `tag` (a config fingerprint) keeps a changed recipe from resuming stale state."""
    return Path(folder) / (f"{name}.{tag}.state.pth" if tag else f"{name}.state.pth")


def save_state(path: Path, model, optimizer, scheduler, rng: Dict, history: List[Dict], epoch: int) -> None:
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng, "history": history, "epoch": epoch}, path)
