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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX): there bf16 autocast makes
    convolutions faster; elsewhere PyTorch emulates bf16 and it is slower than fp32."""
    try:
        capabilities = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # a PyTorch without the query: assume the safe answer
        return False
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def cpu_autocast_enabled(cpu_amp: str = "off") -> bool:
    """`cpu_amp` of a training section: `off`, `bf16` (always) or `auto` (where the CPU has native bf16)."""
    if cpu_amp not in ("off", "bf16", "auto"):
        raise ValueError(f"cpu_amp must be off, bf16 or auto, got {cpu_amp!r}")
    return cpu_amp == "bf16" or (cpu_amp == "auto" and cpu_has_native_bf16())


def autocast(device: torch.device, enabled: bool = True, cpu_amp: str = "off"):
    """bf16/fp16 autocast on CUDA; on CPU bf16 autocast only when `cpu_amp` asks for it (see
    cpu_autocast_enabled), because without hardware bf16 it slows convolutions down."""
    device_type = torch.device(device).type
    if enabled and device_type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if enabled and device_type == "cpu" and cpu_autocast_enabled(cpu_amp):
        return torch.autocast("cpu", dtype=torch.bfloat16)
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
