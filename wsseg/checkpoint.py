"""Atomic checkpoint writes: a temporary name, then a rename, so a killed run never leaves half a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: Path, what: str, meta_keys=(), map_location="cpu") -> dict:
    """A checkpoint wsseg wrote (`{"meta": ..., "state_dict": ...}`), or an error naming the file and what is
    wrong with it: missing, not a PyTorch file, or a PyTorch file of something else. `what` names the kind
    expected, e.g. "U-Net checkpoint (checkpoints/unet.pth of a run)"."""
    from wsseg.errors import WssegError

    path = Path(path)
    if not path.is_file():
        raise WssegError(f"{path}: no such file (expected a wsseg {what})")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # pickle, zip and torch errors alike: the file is not a checkpoint
        raise WssegError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]}); expected a "
                         f"wsseg {what}") from None
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "state_dict" not in checkpoint:
        raise WssegError(f"{path}: a PyTorch file but not a wsseg {what} (it has no 'meta' and 'state_dict')")
    missing = [k for k in meta_keys if k not in meta]
    if missing:
        raise WssegError(f"{path}: not a wsseg {what} (its meta lacks {', '.join(missing)})")
    return checkpoint
