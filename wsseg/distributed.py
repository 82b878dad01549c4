"""Multi-process runs on PyTorch's own engine: torchrun sets the environment, this module reads it.

Every helper is a no-op in a single process, so the same code runs with and without torchrun.
"""

from __future__ import annotations

import os
from typing import List, Sequence

import torch
import torch.distributed as dist

from wsseg.device import resolve_device
from wsseg.errors import WssegError


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes: NCCL when the run's `device` is CUDA (each rank on its own
    GPU), gloo on CPU, also on a machine that has a GPU the run does not use. False when not launched so."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    on_cuda = resolve_device(device).type == "cuda"
    if on_cuda:
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:
            raise WssegError(f"LOCAL_RANK {local_rank}: this machine has {gpus} CUDA device(s) and each process "
                             f"takes its own; start at most {gpus} per machine (torchrun --nproc_per_node {gpus}), "
                             f"or run on CPU processes with device=cpu")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_cuda else "gloo")
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
    device = resolve_device(name)
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def mean_across_ranks(value: float) -> float:
    if not is_distributed():
        return value
    # NCCL reduces only CUDA tensors (on this rank's GPU, set by init_from_env); gloo CPU ones.
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.float64, device=on)
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
