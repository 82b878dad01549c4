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
