"""Export the segmenter and CCAM map models to ONNX with dynamic batch/height/width and metadata.

The ONNX model outputs probabilities (B, 1, H, W); preprocessing (resize, mean/std) and the
threshold are stored in the model's metadata so the torch-free runtime needs nothing else.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import onnx
import torch

from wsseg import __version__
from wsseg.config_schema import UNET_SIZE_MULTIPLE, unet_size_problems
from wsseg.errors import ConfigError
from wsseg.models.segmenter import ProbabilityHead, probability_model  # noqa: F401 (ProbabilityHead: public here too)

log = logging.getLogger("wsseg")


@dataclass
class ExportReport:
    path: Path
    max_abs_diff: float
    parity_shape: tuple
    opset: int

    def as_dict(self) -> Dict:
        return {"path": str(self.path), "max_abs_diff": self.max_abs_diff, "parity_shape": list(self.parity_shape),
                "opset": self.opset}


def _export(module: torch.nn.Module, path: Path, image_size: int, opset: int, metadata: Dict[str, str],
            tolerance: float = 1e-3) -> ExportReport:
    module = module.eval().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.randn(1, 3, image_size, image_size)
    tmp = path.with_name(f".{path.name}.tmp")
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(module, (dummy,), str(tmp), input_names=["image"], output_names=["probability"],
                      dynamic_axes={"image": axes, "probability": axes}, opset_version=opset,
                      do_constant_folding=True, dynamo=False)
    model = onnx.load(str(tmp))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    tmp.replace(path)
    # Parity on a batch and size other than the traced ones proves the dynamic axes work.
    shape = (2, 3, image_size + 2 * UNET_SIZE_MULTIPLE, image_size + UNET_SIZE_MULTIPLE)
    diff = parity(module, path, shape)
    if not diff <= tolerance:
        raise RuntimeError(f"ONNX parity check failed for {path}: max |onnx - torch| = {diff:.2e} > {tolerance}")
    log.info("exported %s (opset %d), parity at %s: max abs diff %.2e", path, opset, shape, diff)
    return ExportReport(path, diff, shape, opset)


def parity(module: torch.nn.Module, path: Path, shape: tuple, seed: int = 0) -> float:
    import onnxruntime as ort

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = module(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    return float(np.abs(got - expected).max())


def _metadata(kind: str, image_size: int, mean, std, threshold: float, classes, extra: Optional[Dict] = None):
    data = {"wsseg_kind": kind, "wsseg_version": __version__, "input_size": str(image_size),
            "size_multiple": str(UNET_SIZE_MULTIPLE), "mean": json.dumps([float(m) for m in mean]),
            "std": json.dumps([float(s) for s in std]), "threshold": str(threshold),
            "class_names": json.dumps(list(classes)), "input_layout": "NCHW float32 RGB, (x/255 - mean) / std"}
    data.update(extra or {})
    return data


def export_segmenter(checkpoint: Path, out_path: Path, opset: int = 17, size: Optional[int] = None,
                     flips: Optional[Sequence[str]] = None, threshold: Optional[float] = None) -> ExportReport:
    """Export a trained U-Net checkpoint (`checkpoints/unet.pth`) to ONNX, predicting as the checkpoint does
    unless told otherwise: input `size`, `flips` averaged inside the graph ([] for none), mask `threshold`
    (e.g. a plain, faster model from a run that predicts at a larger size over flips)."""
    from wsseg.models.segmenter import FLIP_DIMS, load_segmenter

    model, meta = load_segmenter(checkpoint)
    unknown = sorted(set(flips or ()) - set(FLIP_DIMS))
    if unknown:
        raise ConfigError(f"export flips: unknown {', '.join(unknown)} (valid: {', '.join(FLIP_DIMS)})")
    problems = unet_size_problems("export size", size) if size is not None else []
    if problems:
        raise ConfigError(problems[0])
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"export threshold: must lie in [0, 1], got {threshold}")
    meta = replace(meta, predict_size=meta.predict_size if size is None else size,
                   flips=meta.flips if flips is None else [name for name in FLIP_DIMS if name in flips],
                   threshold=meta.threshold if threshold is None else threshold)
    return export_segmenter_model(model, meta, out_path, opset)


def export_segmenter_model(model: torch.nn.Module, meta, out_path: Path, opset: int = 17) -> ExportReport:
    """Export a U-Net (logits out) with its `SegmenterMeta`; the model itself is left unchanged. The graph
    predicts as the meta says: its flips are averaged inside it, its `input_size` is the runtime's."""
    from wsseg.deploy.static_padding import with_static_same_padding

    # Inputs are multiples of UNET_SIZE_MULTIPLE (the runtime enforces it), so TF-style 'same' padding is constant.
    model, n_static = with_static_same_padding(model)
    metadata = _metadata("segmenter", meta.input_size, meta.mean, meta.std, meta.threshold, meta.classes,
                         {"encoder": meta.encoder, "trained_on": meta.trained_on, "trained_size": str(meta.image_size),
                          "flips_averaged": ",".join(meta.flips) or "none",
                          "static_same_padding_convs": str(n_static)})
    return _export(probability_model(model, meta), out_path, meta.input_size, opset, metadata)


def export_ccam(checkpoint: Path, out_path: Path, opset: int = 17, threshold: float = 0.58) -> ExportReport:
    """Export a CCAM map model (forward only, polarity buffer included) for fast pseudo-labelling."""
    from wsseg.stages.ccam import load_ccam

    model, meta = load_ccam(checkpoint)
    metadata = _metadata("ccam", meta["image_size"], meta["mean"], meta["std"], threshold,
                         ["background", "foreground"], {"backbone": meta["backbone"], "flip": str(float(model.flip))})
    return _export(model, out_path, meta["image_size"], opset, metadata)


def export_run_models(layout, config, artifacts: Dict[str, Path], calibration_set=None,
                      map_exports: Optional[Dict[str, Callable]] = None) -> Dict:
    """Export what a run trained (`layout`: its wsseg.pipeline.RunLayout): `model.onnx` (U-Net) and
    `model.int8.onnx` if asked, calibrated on `calibration_set` (the run's U-Net training images), and each
    trained map method's model as `<name>.onnx` through its export hook (`map_exports`: name -> fn(out, opset))."""
    report: Dict = {}
    if "unet" in artifacts:
        report["unet"] = export_segmenter(artifacts["unet"], layout.model_onnx, config.opset).as_dict()
        if config.int8:
            from wsseg.deploy.quantize import quantize_from_run

            report["unet_int8"] = quantize_from_run(layout.root, config.calibration_images, None,
                                                    config.int8_keep_float, layout.model_onnx, calibration_set)
    for name, export in (map_exports or {}).items():
        report[name] = export(layout.map_model_onnx(name), config.opset)
    return report


def read_metadata(path: Path) -> Dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
