"""Per-image CPU work that PyTorch does not thread (the dense CRF, GrabCut, the JPEG decoding before them) in
forked worker processes, one image per process at a time. The results are those of the same calls made in the
run's process; only the wall time changes."""

from __future__ import annotations

import multiprocessing
import os
from typing import Callable, Iterable, List, Optional, TypeVar

from wsseg.progress import ProgressFn, no_progress

T = TypeVar("T")
R = TypeVar("R")

_TASK: Optional[Callable] = None  # what a forked worker calls: inherited, never pickled


def _call(item):
    return _TASK(item)


def cpu_workers(configured: Optional[int] = None) -> int:
    """How many processes: as configured, else the cores this process may use, shared among the ranks of a
    distributed run (each rank works on its own shard)."""
    from wsseg import distributed as dist

    if configured is not None:
        return max(1, configured)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // dist.world_size())


def process_map(function: Callable[[T], R], items: Iterable[T], workers: int, progress: ProgressFn = no_progress,
                description: str = "") -> List[R]:
    """[function(item) for item in items], in order, computed by `workers` forked processes. One worker, one
    item, or a platform without `fork` (Windows, macOS's default): in this process. `function` may be a
    closure over datasets and models: fork hands it to the workers without pickling; its results must pickle."""
    global _TASK
    items = list(items)
    if workers <= 1 or len(items) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [function(item) for item in progress(items, total=len(items), description=description)]
    import cv2

    # OpenCV's thread pool does not survive a fork (a child that touches it waits forever): stop it before
    # forking, so each worker runs OpenCV on its one thread (the processes share the cores, not each image).
    opencv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    _TASK = function
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(items))) as pool:
            return list(progress(pool.imap(_call, items, chunksize=2), total=len(items), description=description))
    finally:
        _TASK = None
        cv2.setNumThreads(opencv_threads)


__all__ = ["cpu_workers", "process_map"]
