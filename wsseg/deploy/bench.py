"""Throughput benchmarks: PyTorch eager vs ONNX Runtime, and map methods against each other.

Same model, same inputs, warm-up first; returns rows of plain data for the CLI to print.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass
class BenchRow:
    name: str
    batch_size: int
    images_per_s: float
    latency_ms: float
    ratio: Optional[float] = None  # images/s relative to the first row of the same batch size
    ratio_range: Optional[Tuple[float, float]] = None  # lowest and highest per-round ratio, when timed in rounds


def time_calls(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median seconds per call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _row(name: str, batch: int, seconds: float) -> BenchRow:
    return BenchRow(name, batch, batch / seconds, seconds * 1000)


def add_ratios(rows: List[BenchRow]) -> List[BenchRow]:
    base: Dict[int, float] = {}
    for row in rows:
        base.setdefault(row.batch_size, row.images_per_s)
        row.ratio = row.images_per_s / base[row.batch_size]
    return rows


def bench_inference(torch_model: torch.nn.Module, onnx_paths: Dict[str, Path], image_size: int,
                    batch_sizes: Sequence[int] = (1, 8), warmup: int = 3, iters: int = 10,
                    threads: Optional[int] = None, rounds: int = 3) -> List[BenchRow]:
    """images/s of PyTorch eager and each ONNX model on identical random inputs.

    The backends take turns `rounds` times, each timed over `iters` calls after `warmup`: a shared
    machine's speed drifts between minutes, and timing each backend in one block puts that drift
    into the ratios. A row holds the median time over rounds; its ratio is the median of the
    per-round ratios to eager, with their range.
    """
    import onnxruntime as ort

    from wsseg_infer.runtime import session_options

    if rounds < 1 or iters < 1:
        raise ValueError(f"rounds and iters must be at least 1, got rounds={rounds}, iters={iters}")
    torch_model = torch_model.eval()
    sessions = {name: ort.InferenceSession(str(p), session_options(threads), providers=["CPUExecutionProvider"])
                for name, p in onnx_paths.items()}

    def eager(x: torch.Tensor) -> None:
        with torch.inference_mode():
            torch_model(x)

    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(batch))
        feed = x.numpy()
        calls = {"pytorch eager": lambda: eager(x)}
        calls.update({name: (lambda s=session: s.run(None, {"image": feed})) for name, session in sessions.items()})
        seconds: Dict[str, List[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                seconds[name].append(time_calls(call, warmup, iters))
        for name, times in seconds.items():
            row = _row(name, batch, float(np.median(times)))
            ratios = [base / t for base, t in zip(seconds["pytorch eager"], times)]
            row.ratio, row.ratio_range = float(np.median(ratios)), (float(min(ratios)), float(max(ratios)))
            rows.append(row)
    return rows


def bench_maps(methods: Dict[str, Callable[[torch.Tensor], object]], image_size: int, batch_size: int,
               warmup: int = 2, iters: int = 5) -> List[BenchRow]:
    """images/s of map methods (`name -> fn(images)`) on one random batch."""
    x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    rows = [_row(name, batch_size, time_calls(lambda f=fn: f(x), warmup, iters)) for name, fn in methods.items()]
    return add_ratios(rows)


def map_method_callables(backbone: str, weights: str, names: Sequence[str], stages=(-2, -1),
                         output_stride: int = 16, image_size: int = 224,
                         threads: Optional[int] = None) -> Dict[str, Callable]:
    """Map methods on the same backbone: a method that trains its own model (CCAM) through PyTorch and ONNX
    Runtime (its model as initialised: the speed does not depend on training), the others on a classifier."""
    import tempfile

    from wsseg.cams import MAP_METHODS, create_map_method, is_trained
    from wsseg.cams.ccam import CCAMOnnxMaps
    from wsseg.deploy.onnx_export import _export, _metadata
    from wsseg.models.classifier import build_classifier

    out: Dict[str, Callable] = {}
    classifier = None
    for name in names:
        if is_trained(name):
            entry = MAP_METHODS.get(name)
            options = entry.options_type(stages=list(stages), output_stride=output_stride, image_size=image_size)
            model = entry.untrained_model(backbone, weights, options)
            path = Path(tempfile.mkdtemp()) / f"{name}.onnx"
            _export(model, path, image_size, 17, _metadata(name, image_size, (0.5,) * 3, (0.5,) * 3, 0.5, []))
            onnx_maps = CCAMOnnxMaps(path, threads, device="cpu")
            out[f"{name} (onnxruntime)"] = lambda x, m=onnx_maps: m.compute(x)
            torch_maps = entry(model=model)
            out[f"{name} (pytorch)"] = lambda x, m=torch_maps: m.compute(x)
        else:
            classifier = classifier or build_classifier(backbone, weights, 2).eval()
            method = create_map_method(name, model=classifier)
            out[name] = lambda x, m=method: m.compute(x, [1] * len(x))
    return out
