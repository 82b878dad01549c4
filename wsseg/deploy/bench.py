"""Throughput benchmarks: PyTorch eager vs ONNX Runtime, map methods against each other, U-Net training steps.

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
        rows += timed_in_turns(calls, batch, warmup, iters, rounds)
    return rows


def timed_in_turns(calls: Dict[str, Callable[[], object]], batch: int, warmup: int, iters: int,
                   rounds: int) -> List[BenchRow]:
    """One row per call: the calls take turns `rounds` times, each timed over `iters` calls after `warmup`.
    A row holds the median time over rounds; its ratio is the median of the per-round ratios to the first
    call, with their range."""
    seconds: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            seconds[name].append(time_calls(call, warmup, iters))
    first = seconds[next(iter(seconds))]
    rows = []
    for name, times in seconds.items():
        row = _row(name, batch, float(np.median(times)))
        ratios = [base / t for base, t in zip(first, times)]
        row.ratio, row.ratio_range = float(np.median(ratios)), (float(min(ratios)), float(max(ratios)))
        rows.append(row)
    return rows


def bench_training(variants: Dict[str, Dict], encoder: str, image_size: int, batch_size: int,
                   warmup: int = 1, iters: int = 3, rounds: int = 3, model: str = "unet") -> List[BenchRow]:
    """Training images/s of model variants (`name -> {"decoder_channels": ..., "channels_last": ...,
    "cpu_amp": ...}`): one forward, backward and AdamW step on a fixed random batch, the loss the stage trains
    with. `model` is the U-Net (`encoder` its smp name) or the image classifier (`encoder` a timm name, two
    classes; `decoder_channels` does not apply). The variants take turns `rounds` times (`timed_in_turns`);
    ratios are to the first variant."""
    from torch.nn import functional as F

    from wsseg.device import autocast
    from wsseg.models.classifier import build_classifier
    from wsseg.models.segmenter import build_unet
    from wsseg.stages.segment import segmentation_loss

    if rounds < 1 or iters < 1:
        raise ValueError(f"rounds and iters must be at least 1, got rounds={rounds}, iters={iters}")
    if model not in ("unet", "classifier"):
        raise ValueError(f"model must be unet or classifier, got {model!r}")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    masks = (torch.rand(batch_size, image_size, image_size, generator=generator) > 0.5).to(torch.uint8)
    labels = torch.arange(batch_size) % 2
    if model == "classifier":
        def build(options):
            return build_classifier(encoder, "none", 2)

        def loss_of(output):
            return F.cross_entropy(output.float(), labels)
    else:
        def build(options):
            return build_unet(encoder, "none", options.get("decoder_channels"))

        def loss_of(output):
            return segmentation_loss(output[:, 0].float(), masks)

    steps = {}
    for name, options in variants.items():
        torch.manual_seed(0)
        net = build(options).train()
        x = images
        if options.get("channels_last"):
            net, x = net.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(net.parameters(), 1e-3)

        def step(net=net, x=x, optimizer=optimizer, cpu_amp=options.get("cpu_amp", "off")):
            with autocast(torch.device("cpu"), True, cpu_amp):
                output = net(x)
            loss = loss_of(output)  # outside autocast, as the stages compute it
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        steps[name] = step
    return timed_in_turns(steps, batch_size, warmup, iters, rounds)


@dataclass
class LabelAgreement:
    backend: str
    seconds_per_image: float
    mean_dice: float  # of each image's mask against the eager PyTorch one
    min_dice: float
    pixel_agreement: float
    max_probability_difference: float


def backend_label_agreement(model: torch.nn.Module, meta, dataset, n_images: int,
                            backends: Sequence[str] = ("torch", "onnx", "onnx_int8"), batch_size: int = 8,
                            threshold: float = 0.5) -> List[LabelAgreement]:
    """How far each `segment.inference_backend` moves a U-Net's masks (at `threshold`, before refinement: what
    the self-training labels start from) from eager PyTorch's, and its time per image, on `n_images` spread
    over `dataset`, predicted as `meta` says (size, flips). INT8 calibrates on the same dataset."""
    from wsseg.metrics import dice
    from wsseg.stages.common import eval_loader
    from wsseg.stages.unet_predict import unet_predictor

    picks = dataset.spread(n_images)
    batches = [b["image"] for b in eval_loader(dataset, meta.input_size, meta.mean, meta.std, batch_size, picks)]
    probabilities = {}
    for backend in ("torch", *[b for b in backends if b != "torch"]):
        predict = unet_predictor(model, meta, "cpu", backend, dataset)
        try:
            predict(batches[0][:1])  # warm-up (ONNX Runtime plans its graph on the first call)
            start = time.perf_counter()
            probs = np.concatenate([predict(batch) for batch in batches])
            probabilities[backend] = (probs, (time.perf_counter() - start) / len(picks))
        finally:
            getattr(predict, "close", lambda: None)()
    reference = probabilities["torch"][0]
    rows = []
    for backend, (probs, seconds) in probabilities.items():
        dices = [dice(a >= threshold, b >= threshold) for a, b in zip(probs, reference)]
        rows.append(LabelAgreement(backend, seconds, float(np.mean(dices)), float(np.min(dices)),
                                   float(((probs >= threshold) == (reference >= threshold)).mean()),
                                   float(np.abs(probs - reference).max())))
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
