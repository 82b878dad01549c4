"""Multi-process runs on PyTorch's own engine: torchrun sets the environment, this module reads it.

Every helper is a no-op in a single process, so the same code runs with and without torchrun.
"""

from __future__ import annotations

import os
from typing import List, Sequence

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); False when not launched so."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_device(name: str) -> torch.device:
    """Under torchrun with CUDA each rank takes its own GPU."""
    from wsseg.device import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def mean_across_ranks(value: float) -> float:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def shard(indices: Sequence[int]) -> List[int]:
    """This rank's share of `indices` (round-robin), for labelling large image sets in parallel."""
    return list(indices)[rank()::world_size()]


def broadcast_object(obj):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
