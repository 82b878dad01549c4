"""Device choice and mixed precision with clean CPU fallbacks."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available; use device=auto or device=cpu")
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16/fp16 autocast on CUDA; a no-op on CPU, where it rarely speeds up convolutions."""
    if enabled and torch.device(device).type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_to(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """Move a batch; images go channels-last on CUDA (faster convolutions with AMP) and with `channels_last`."""
    device = torch.device(device)

    def move(v):
        v = v.to(device, non_blocking=True)
        if (channels_last or device.type == "cuda") and v.ndim == 4:
            v = v.contiguous(memory_format=torch.channels_last)
        return v

    return {k: move(v) if torch.is_tensor(v) else v for k, v in batch.items()}
